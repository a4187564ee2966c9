"""YAML + `key=value` / `--key value` overrides -> typed, validated dataclasses for one stage, strictly."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medgpt.arguments import (
    DTYPE_ALIASES,
    DTYPES,
    AdapterArguments,
    DataArguments,
    ModelArguments,
    RunArguments,
    option_stages,
)

# MedicalGPT's spellings, accepted and written back under our names.
ALIASES = {
    "template_name": "template",
    "model_max_length": "max_length",
    "train_on_inputs": "train_on_prompt",
    "neft_alpha": "neftune_noise_alpha",
    "warmup_ratio": "warmup_steps",  # transformers 5 folded the ratio into warmup_steps (a float < 1)
}
OWN_SECTIONS = (ModelArguments, DataArguments, AdapterArguments, RunArguments)
# Upstream names that transformers/TRL deprecated: ours reach the trainer under the new name, and the
# resolved config does not repeat them.
UPSTREAM_RENAMES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}
UPSTREAM_DEPRECATED = {*UPSTREAM_RENAMES, "pad_token"}
# Options MedicalGPT configs still carry that transformers 5 removed, with what to do instead.
REMOVED_UPSTREAM = {
    "logging_dir": "removed in transformers 5: set the TENSORBOARD_LOGGING_DIR environment variable",
    "evaluation_strategy": "renamed eval_strategy",
}
# The same idea under another stage's name: `max_length` given to PT means its block_size.
STAGE_EQUIVALENTS = {("pt", "max_length"): "block_size", ("sft", "block_size"): "max_length"}
# TRL's GRPOConfig / RLOOConfig names (MedicalGPT's GRPO script): `medgpt grpo` / `rloo` run our RL loop.
STAGE_EQUIVALENTS.update({(stage, trl): ours for stage in ("grpo", "rloo") for trl, ours in (
    ("num_generations", "num_samples_per_prompt"), ("beta", "kl_coef"), ("max_completion_length", "max_new_tokens"),
    ("epsilon", "cliprange"), ("num_iterations", "ppo_epochs"))})
ANY_STAGE = "*"
# Options a stage accepts only at the value it always runs with: any other value is refused with the reason
# (an accepted option without effect is a bug). {option: {stage or ANY_STAGE: (the value it runs with, why)}}.
# Trainer options that medgpt sets itself, or that an overriding trainer method no longer reads, belong here;
# tests/test_option_effects.py finds them in the code and fails while one is missing.
FIXED_OPTIONS: dict[str, dict[str, tuple[Any, str]]] = {
    "do_train": {ANY_STAGE: (True, "every training command trains; to evaluate a model without training it use "
                                   "`medgpt eval --model DIR`")},
    "do_predict": {ANY_STAGE: (False, "training commands do not predict; answer a data file with `medgpt predict`")},
    "use_fast_tokenizer": {ANY_STAGE: (True, "transformers 5 has only fast tokenizers (AutoTokenizer ignores "
                                             "use_fast), so a slow one cannot be loaded")},
    "remove_unused_columns": {stage: (False, "the features are medgpt's own columns (positions, labels, pairs), "
                                             "all of which the loss reads") for stage in ("pt", "sft", "rm")},
    "prediction_loss_only": {stage: (True, "the chunked loss computes no full logits, so evaluation reports the "
                                           "loss (and perplexity) only") for stage in ("pt", "sft")},
    "label_names": {"rm": ([], "the reward loss compares the chosen and rejected sequences of each pair; "
                               "there are no label columns")},
    "label_smoothing_factor": {"rm": (0.0, "the pairwise reward loss has no label smoothing; use margin to ask "
                                           "for a gap between chosen and rejected")},
    "dataset_num_proc": {"kto": (None, "kto's features are tokenised by medgpt in one process (examples are "
                                       "paired and shuffled across the whole set), not by TRL")},
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass
class RunConfig:
    """Every option of one stage run, by section. `training` is the stage's transformers/TRL config."""

    stage: str
    model: ModelArguments
    data: DataArguments
    adapter: AdapterArguments
    run: RunArguments
    training: Any
    extras: dict[type, Any] = field(default_factory=dict)
    given: dict[str, Any] = field(default_factory=dict)  # what the user wrote, after aliases

    def sections(self) -> list[Any]:
        return [self.model, self.data, self.adapter, self.run, *self.extras.values(), self.training]

    def extra(self, cls: type) -> Any:
        return self.extras[cls]


# ---------------------------------------------------------------------------------------------- reading


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`key=value`, `--key value`, `--key=value` and bare `--flag` (true) -> {key: value}.

    Values are read as YAML scalars (`3` -> 3, `true` -> True, `[a, b]` -> list); dataclass types fix the rest.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            if not eq:
                if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                    value, i = tokens[i + 1], i + 1
                else:
                    value = "true"
        elif "=" in token:
            key, _, value = token.partition("=")
        else:
            raise ConfigError(f"cannot read '{token}': overrides are key=value or --key value")
        out[key.replace("-", "_")] = _yaml_scalar(value)
        i += 1
    return out


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false are booleans, so `eval_strategy: no` stays the
    string "no" and `resume_from_checkpoint: true` stays a boolean (YAML 1.1 also reads yes/no/on/off as ones;
    boolean options still accept those words, `coerce` reads them)."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def read_yaml(path: str | Path, flat: bool = True) -> dict[str, Any]:
    """A YAML file's top-level mapping; `flat` (stage configs): no nested mappings except the dict options."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key, value in data.items() if flat else ():
        if isinstance(value, dict) and key not in _DICT_OPTIONS:
            raise ConfigError(f"{path}: '{key}' holds a nested mapping; options are flat (write `{key}_…: …`)")
    return data


_DICT_OPTIONS = {"lr_scheduler_kwargs", "model_init_kwargs", "generation_kwargs", "gradient_checkpointing_kwargs",
                 "optim_args", "dataset_kwargs", "chat_template_kwargs", "accelerator_config", "fsdp_config"}


def normalise_keys(raw: dict[str, Any], origin: str = "config") -> dict[str, Any]:
    """Apply MedicalGPT aliases and canonical dtype names."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if name in out:
            raise ConfigError(f"{origin}: both '{key}' and '{name}' are given; '{key}' is an alias of '{name}'")
        out[name] = value
    if "torch_dtype" in out:
        dtype = str(out["torch_dtype"]).lower()
        dtype = DTYPE_ALIASES.get(dtype, dtype)
        if dtype not in DTYPES:
            raise ConfigError(f"{origin}: torch_dtype '{out['torch_dtype']}' is not one of {', '.join(DTYPES)}")
        out["torch_dtype"] = dtype
    return out


# ---------------------------------------------------------------------------------------------- building


def build_config(stage, values: dict[str, Any]) -> RunConfig:
    """Turn flat option values into the sections of `stage` (a `medgpt.stages.Stage`); strict about names."""
    values = normalise_keys(values)
    values.setdefault("stage", stage.name)
    if values["stage"] != stage.name:
        raise ConfigError(f"the config says stage '{values['stage']}' but the command runs '{stage.name}'")
    check_names(stage, values)
    given = dict(values)
    values = _precision_defaults(stage.training_class, values)
    built = {cls: _instantiate(cls, values) for cls in OWN_SECTIONS + stage.extra_classes}
    built[stage.training_class] = _construct(stage.training_class, _training_values(stage, values))
    config = RunConfig(
        stage=stage.name,
        model=built[ModelArguments],
        data=built[DataArguments],
        adapter=built[AdapterArguments],
        run=built[RunArguments],
        training=built[stage.training_class],
        extras={cls: built[cls] for cls in stage.extra_classes},
        given=given,
    )
    validate(config)
    return config


def stage_option_names(stage) -> list[str]:
    """Every option name `stage` accepts: our sections' fields that apply to it, its extras, its trainer config."""
    names = [f.name for cls in OWN_SECTIONS for f in dataclasses.fields(cls)
             if f.init and (option_stages(f) is None or stage.name in option_stages(f))]
    return names + [f.name for cls in (*stage.extra_classes, stage.training_class) for f in dataclasses.fields(cls)
                    if f.init]


def check_names(stage, values: dict[str, Any]) -> None:
    """Unknown option names are errors that name the stages an option belongs to, or the closest valid names."""
    known = stage_option_names(stage)
    unknown = sorted(set(normalise_keys(values)) - set(known))
    if unknown:
        lines = [f"  {key} ({_unknown_hint(stage, key, known)})" for key in unknown]
        raise ConfigError(f"unknown option(s) for stage '{stage.name}':\n" + "\n".join(lines)
                          + f"\nSee `medgpt {stage.name} --help` for every option.")


def _unknown_hint(stage, key: str, known: list[str]) -> str:
    if key in REMOVED_UPSTREAM:
        return REMOVED_UPSTREAM[key]
    spelled = [alias for alias, name in ALIASES.items() if name == key]
    owners = _stages_with_option(key, stage.name)
    if owners:
        also = f"also spelled {', '.join(spelled)}: " if spelled else ""
        hint = f"{also}an option of stage {', '.join(owners)}, not {stage.name}"
        equivalent = STAGE_EQUIVALENTS.get((stage.name, key))
        return hint + (f"; {stage.name} calls it {equivalent}" if equivalent else "")
    if (stage.name, key) in STAGE_EQUIVALENTS:
        return f"{stage.name} calls it {STAGE_EQUIVALENTS[stage.name, key]}"
    close = difflib.get_close_matches(key, known + list(ALIASES), n=3, cutoff=0.6)
    return f"did you mean: {', '.join(close)}?" if close else "no such option"


def _stages_with_option(key: str, other_than: str) -> list[str]:
    from medgpt.stages import load_stages

    return [s.name for s in load_stages().values() if s.name != other_than and key in stage_option_names(s)]


def training_kwargs(stage, values: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments `build_config` passes to the stage's trainer config class, without building it
    (building e.g. `TrainingArguments(deepspeed=…)` needs deepspeed installed; this mapping does not)."""
    values = normalise_keys(values)
    check_names(stage, values)
    return _training_values(stage, _precision_defaults(stage.training_class, values))


def _training_values(stage, values: dict[str, Any]) -> dict[str, Any]:
    return section_kwargs(stage.training_class, _upstream_names(stage.training_class, values))


def load_config(stage, config_file: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    values = read_yaml(config_file) if config_file else {}
    values = normalise_keys(values, str(config_file or "config"))
    values.update(normalise_keys(parse_overrides(overrides or []), "command line"))
    return build_config(stage, values)


def bf16_default() -> bool:
    """bf16 mixed-precision compute unless the user chose: on CUDA GPUs that support it, and on CPUs whose matrix
    units do bf16 (AMX or AVX512-BF16, `medgpt.hardware.cpu_bf16`), where oneDNN runs bf16 matmuls several times
    faster than fp32; fp32 elsewhere."""
    import torch

    from medgpt.hardware import cpu_bf16

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_bf16() != "none"


def precision_reason(bf16: bool, given: bool) -> str:
    """Why the run computes in bf16 or fp32, for the log."""
    import torch

    from medgpt.hardware import cpu_bf16

    if given:
        return f"bf16: {str(bf16).lower()} as set"
    if torch.cuda.is_available():
        return "the GPU supports bf16" if bf16 else "the GPU has no bf16 (fp16: true for mixed precision)"
    kind = cpu_bf16()
    return f"the CPU has {kind.upper()} bf16 matrix units; bf16: false trains in fp32" if bf16 else \
        "the CPU has no bf16 matrix units (neither AMX nor AVX512-BF16)"


def _precision_defaults(training_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """Pick mixed precision from the hardware unless the user chose: bf16 where supported (GPU or CPU), else fp32."""
    import torch

    names = {f.name for f in dataclasses.fields(training_class)}
    values = dict(values)
    cuda = torch.cuda.is_available()
    if "fp16" in names and _truthy(values.get("fp16")) and not cuda:
        raise ConfigError("fp16 mixed precision needs a CUDA GPU; on CPU train in fp32 (remove `fp16: true`)")
    if "use_cpu" in names and "use_cpu" not in values and not cuda:
        # Without it, `accelerate launch --cpu` / `torchrun` on CPU do not form one data-parallel group.
        values["use_cpu"] = True
    if "bf16" in names and "bf16" not in values and not _truthy(values.get("fp16")):
        # transformers takes CPU bf16 only with use_cpu; `use_cpu: false` on a machine without a GPU gets fp32
        # (and, under a multi-process launch, our refusal of independent single-process runs)
        cpu_off = not cuda and "use_cpu" in names and not _truthy(values.get("use_cpu"))
        values["bf16"] = False if cpu_off else bf16_default()
    return values


def _upstream_names(training_class: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(training_class)}
    values = dict(values)
    for old, new in UPSTREAM_RENAMES.items():
        if old in values and new in names:
            values.setdefault(new, values.pop(old))
    if "activation_checkpointing" in names:  # ours (default off) decides; TRL's configs default it to on
        values.setdefault("activation_checkpointing", False)
    return values


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


def _instantiate(cls: type, values: dict[str, Any]):
    return _construct(cls, section_kwargs(cls, values))


def section_kwargs(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The values of `cls`'s fields among `values`, converted to the annotated types."""
    hints = _type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.init and f.name in values:
            value = values[f.name]
            # "none"/"null" unset an option, except where a string default means "none" is a value (report_to)
            if isinstance(value, str) and value.lower() in ("none", "null") and not isinstance(f.default, str):
                value = None
            kwargs[f.name] = coerce(value, hints.get(f.name, f.type), f.name)
    return kwargs


def _construct(cls: type, kwargs: dict[str, Any]):
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid {cls.__name__} options: {err}") from err


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - some upstream classes have unresolvable forward references
        return {f.name: f.type for f in dataclasses.fields(cls)}


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the annotated type (PyYAML reads `2e-5` as a string, CLI gives strings)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(value, bool) and bool not in (annotation, *args) and annotation is not typing.Any:
        # A boolean given to a string option (`resume_from_checkpoint: true`, `--resume_from_checkpoint True`)
        # is that word; YamlLoader keeps `no` a string, so `eval_strategy: no` never arrives here.
        value = "true" if value else "false"
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for arg in args:
            if arg is not str:
                try:
                    return coerce(value, arg, name)
                except ConfigError:
                    continue
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{name}: '{value}' is not one of {', '.join(map(str, typing.get_args(annotation)))}")
        return value
    if origin is list and isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got '{value}'")
    if annotation in (int, float) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            kind = "an integer" if annotation is int else "a number"
            raise ConfigError(f"{name}: expected {kind}, got '{value}'") from None
        if annotation is int:
            if not number.is_integer():
                raise ConfigError(f"{name}: expected an integer, got '{value}'")
            return int(number)
        return number
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------- checks


def validate(config: RunConfig) -> None:
    """Fail on impossible combinations before any model loads, with the fix in the message."""
    m, a, d, t = config.model, config.adapter, config.data, config.training
    if not m.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a hub name, a local directory, or `smollm2-135m`)")
    if a.qlora:
        if not a.use_peft:
            raise ConfigError("qlora trains a LoRA adapter on a 4-bit base: use_peft must stay true")
        m.load_in_4bit = True
    if m.load_in_4bit and m.load_in_8bit:
        raise ConfigError("choose one of load_in_4bit and load_in_8bit")
    if (m.load_in_4bit or m.load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("4/8-bit loading needs bitsandbytes: pip install 'medgpt[quant]'")
    if (m.load_in_4bit or m.load_in_8bit) and not a.use_peft:
        raise ConfigError("quantised weights cannot be trained in full: use LoRA (use_peft: true) or drop 4/8-bit")
    if a.freeze_trainable_layers and a.use_peft:
        raise ConfigError("freeze_trainable_layers applies to full training: set use_peft: false, or drop it")
    if a.freeze_trainable_layers < 0:
        raise ConfigError("freeze_trainable_layers must be >= 0 (the number of top layers to train)")
    if not (d.train_file_dir or d.dataset_name):
        raise ConfigError("no training data: set train_file_dir (file, folder or glob) or dataset_name")
    if d.streaming and getattr(t, "max_steps", -1) <= 0:
        raise ConfigError("streaming data has no known length: set max_steps")
    if d.streaming and d.validation_split_percentage > 0:
        raise ConfigError("a stream cannot be split: with streaming give validation data as validation_file_dir, "
                          "or set validation_split_percentage: 0")
    if not 0 <= d.validation_split_percentage < 100:
        raise ConfigError("validation_split_percentage must be in [0, 100)")
    if d.train_shard is not None:
        shard = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(d.train_shard))
        if not shard or not 1 <= int(shard[1]) <= int(shard[2]):
            raise ConfigError(f"train_shard must be K/N with 1 <= K <= N (e.g. 1/2), got {d.train_shard!r}")
        d.train_shard = f"{int(shard[1])}/{int(shard[2])}"
    from medgpt.data.readers import FORMATS

    if d.data_format not in FORMATS:
        raise ConfigError(f"data_format '{d.data_format}' is not one of {', '.join(FORMATS)}")
    if m.rope_scaling not in (None, "linear", "dynamic", "yarn"):
        raise ConfigError(f"rope_scaling '{m.rope_scaling}' is not one of linear, dynamic, yarn")
    if m.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("attn_implementation flash_attention_2 needs the flash-attn package (GPU only); use sdpa")
    if config.run.template:
        from medgpt.data.chat_templates import get_named_template

        get_named_template(config.run.template)
    if m.model_type and m.model_type.strip().lower() == "auto":  # MedicalGPT's default: any architecture
        m.model_type = None
    normalise_resume(t)
    check_fixed_options(config)
    check_evaluation_request(config)


RESUME_AUTO = ("auto", "true", "yes", "latest")
RESUME_OFF = ("", "false", "no", "none")


def normalise_resume(training) -> None:
    """`resume_from_checkpoint`: true / `True` / yes / latest mean auto (MedicalGPT's `--resume_from_checkpoint
    True`), false / no mean a fresh start; anything else is a checkpoint path."""
    spec = training.resume_from_checkpoint
    if isinstance(spec, str) and spec.strip().lower() in RESUME_AUTO:
        training.resume_from_checkpoint = "auto"
    elif isinstance(spec, str) and spec.strip().lower() in RESUME_OFF:
        training.resume_from_checkpoint = None


def check_fixed_options(config: RunConfig) -> None:
    """Refuse a FIXED_OPTIONS option given at a value the stage cannot run with."""
    for name in config.given:
        rules = FIXED_OPTIONS.get(name, {})
        rule = rules.get(config.stage) or rules.get(ANY_STAGE)
        if rule is None:
            continue
        value = next((getattr(s, name) for s in config.sections() if any(f.name == name for f in dataclasses.fields(s))),
                     config.given[name])
        fixed, why = rule
        if _plain(value) != _plain(fixed):
            raise ConfigError(f"{name}: {config.stage} always runs with {name}: {_yaml_value(fixed)} ({why}); "
                              f"remove {name}: {_yaml_value(value)}")


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(_plain(value), default_flow_style=True).strip().removesuffix("...").strip()


def check_evaluation_request(config: RunConfig) -> None:
    """`do_eval` (MedicalGPT's flag) says whether to evaluate on the validation data after training; medgpt
    evaluates exactly when there is validation data, so the two must agree."""
    if "do_eval" not in config.given:
        return
    has_validation = has_validation_data(config.data)
    wanted = config.training.do_eval  # transformers turns it on when eval_strategy evaluates during training
    if wanted and not has_validation:
        raise ConfigError("do_eval: true needs validation data: set validation_file_dir, or validation_split_percentage "
                          "(medgpt evaluates on it after training, and every eval_steps with eval_strategy: steps)")
    if not wanted and has_validation:
        raise ConfigError("do_eval: false, but validation data is given (validation_file_dir / "
                          "validation_split_percentage), and medgpt evaluates on validation data when there is some: "
                          "drop the validation data to skip evaluation")


def check_context_length(config: RunConfig, model_config, length: int | None) -> None:
    """A block_size / max_length past the model's context needs RoPE scaling; say so before training."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and length and length > limit and not config.model.rope_scaling:
        raise ConfigError(
            f"length {length} exceeds the model's context of {limit} tokens: lower block_size/max_length, "
            f"or set rope_scaling: linear | dynamic | yarn (factor {length / limit:.2f})"
        )


# ---------------------------------------------------------------------------------------------- writing


def resolved_options(config: RunConfig) -> dict[str, Any]:
    """All options of the run as one flat mapping (our names), loadable again with `medgpt train`."""
    flat: dict[str, Any] = {}
    for section in config.sections():
        # transformers' to_dict turns post-init objects (AcceleratorConfig, enums) back into plain values.
        values = section.to_dict() if hasattr(section, "to_dict") else dataclasses.asdict(section)
        for f in dataclasses.fields(section):
            if f.name in UPSTREAM_DEPRECATED and section is config.training:
                continue
            applies = option_stages(f) is None or config.stage in option_stages(f)
            if f.init and applies and f.name not in flat and f.name in values:
                flat[f.name] = _plain(values[f.name])
    flat.update(values_run_with(config, flat))
    flat["stage"] = config.stage
    return flat


def values_run_with(config: RunConfig, names) -> dict[str, Any]:
    """The values the stage really runs with for the options it fixes (FIXED_OPTIONS, do_eval), among `names`."""
    out = {}
    for name in names:
        rules = FIXED_OPTIONS.get(name, {})
        rule = rules.get(config.stage) or rules.get(ANY_STAGE)
        if rule is not None:
            out[name] = _plain(rule[0])
    if "do_eval" in names:
        out["do_eval"] = has_validation_data(config.data)
    return out


def has_validation_data(data: DataArguments) -> bool:
    return bool(data.validation_file_dir) or data.validation_split_percentage > 0


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def write_run_config(config: RunConfig, directory: str | Path) -> Path:
    path = Path(directory) / "run_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    options = resolved_options(config)
    given = sorted(k for k in config.given if k != "stage")
    header = "# medgpt run configuration, fully resolved. Options given by the user: " + ", ".join(given) + "\n"
    path.write_text(header + yaml.safe_dump(options, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
