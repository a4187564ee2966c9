"""The parameter manual, generated so it cannot drift: docs/parameters.md from the help texts of the option
dataclasses (every stage in the registry, so new stages appear by themselves) and of the commands' flags, and
the VRAM table in docs/memory.md from `medgpt.plan.memory`. `make docs` (`python -m medgpt.docs`) rewrites both;
tests/test_docs.py fails when either is stale or an option has no help.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARAMETERS = ROOT / "docs" / "parameters.md"
PARAMETERS_ZH = ROOT / "docs" / "parameters_zh.md"
MEMORY = ROOT / "docs" / "memory.md"
REGENERATE = "make docs  (or: .venv/bin/python -m medgpt.docs)"

# The TrainingArguments fields users touch, with our one-line help where upstream's says too little (None keeps
# upstream's). `medgpt STAGE --help` lists all of them.
TRAINING_FIELDS = {
    "output_dir": "Where checkpoints and the final model go. A non-empty directory is refused unless resuming "
                  "(resume_from_checkpoint) or overwrite_output_dir is set.",
    "num_train_epochs": None,
    "max_steps": None,
    "per_device_train_batch_size": "Samples per GPU (or CPU process) per forward pass: the micro-batch. Memory grows "
                                   "with it; when it does not fit, lower it and raise gradient_accumulation_steps "
                                   "(`medgpt plan` tells what fits).",
    "per_device_eval_batch_size": None,
    "gradient_accumulation_steps": "Micro-batches summed before each optimizer step: the effective batch is "
                                   "per_device_train_batch_size × this × GPUs. Raise it to keep the effective batch "
                                   "when the micro-batch must shrink.",
    "learning_rate": "Peak learning rate. Typical: 2e-5 for full SFT, 1e-4 to 2e-4 for LoRA, 5e-7 to 5e-6 for "
                     "DPO/KTO/RL. Too high shows as a loss that jumps or goes to NaN.",
    "lr_scheduler_type": "How the learning rate moves after warm-up: linear (to 0), cosine, constant, "
                         "constant_with_warmup, …",
    "warmup_steps": None,
    "weight_decay": None,
    "max_grad_norm": "Clip the gradient norm to this (0 = off). 1.0 protects against loss spikes, especially in fp16.",
    "optim": "Optimizer. adamw_torch_fused (default) keeps two states per trainable weight; paged_adamw_8bit "
             "(bitsandbytes) stores them in 8 bits, a quarter of the memory, for full training of large models.",
    "bf16": "bf16 mixed-precision compute. medgpt turns it on unless you set it where the hardware does bf16: GPUs "
            "of Ampere and newer, and CPUs with AMX or AVX512-BF16 matrix units (the run logs which); off on "
            "other CPUs. false forces fp32. Preferred over fp16: fp32's range, no loss scaling.",
    "fp16": "fp16 mixed precision with loss scaling, for GPUs without bf16 (V100, T4). Needs CUDA; refused on CPU. "
            "If the loss goes to 0 or NaN, lower learning_rate, or use bf16/fp32.",
    "tf32": None,
    "seed": None,
    "data_seed": None,
    "logging_steps": None,
    "logging_first_step": None,
    "eval_strategy": None,
    "eval_steps": None,
    "save_strategy": None,
    "save_steps": None,
    "save_total_limit": None,
    "save_only_model": "Save only weights in checkpoints, no optimizer, scheduler or RNG state: smaller, but the "
                       "run can no longer resume exactly.",
    "load_best_model_at_end": None,
    "metric_for_best_model": None,
    "resume_from_checkpoint": "Continue a run: `auto` (or true / True / yes / latest, MedicalGPT's "
                              "`--resume_from_checkpoint True`) takes the newest complete checkpoint in output_dir, "
                              "or starts fresh if there is none; false / no starts fresh; a path must be a complete "
                              "checkpoint. Restores weights, optimizer, scheduler, RNG and data position.",
    "do_train": "MedicalGPT's flag, accepted as `true` (every training command trains); `false` is refused: evaluate a "
                "model without training with `medgpt eval`.",
    "do_eval": "MedicalGPT's flag: evaluate on the validation data after training (eval_loss, and perplexity for PT/SFT, "
               "in train_results.json). medgpt evaluates exactly when there is validation data, so `true` needs "
               "validation_file_dir or validation_split_percentage, and `false` with validation data is refused.",
    "do_predict": "Accepted as `false`; `true` is refused: answer a data file with `medgpt predict`.",
    "report_to": "Where metrics go besides metrics.jsonl and the plots: none (default), tensorboard, wandb, …",
    "run_name": None,
    "deepspeed": "A DeepSpeed config file (configs/deepspeed/zero1|zero2|zero3.json) to split optimizer states, "
                 "gradients and (ZeRO-3) weights across GPUs; launch with torchrun or accelerate.",
    "ddp_timeout": "Seconds processes wait for each other (default 1800). Raise it when tokenising a large corpus "
                   "on the main process takes longer.",
    "ddp_find_unused_parameters": None,
    "dataloader_num_workers": None,
    "neftune_noise_alpha": "NEFTune: uniform noise on the embeddings during SFT, scaled by alpha / sqrt(length × "
                           "hidden) per sample (packed samples too). 5-15 often helps instruction tuning; off by "
                           "default.",
    "torch_compile": None,
    "full_determinism": None,
    "adam_beta1": None,
    "adam_beta2": None,
}
# Fields the TRL configs of our stages add, with our help where theirs is long or assumes TRL's own data path.
TRL_FIELDS = {
    "DPOConfig": {
        "beta": "Strength of the pull towards the reference model: higher stays closer (0.1 typical; SimPO uses "
                "2-2.5).",
        "loss_type": "sigmoid (DPO), ipo, hinge, robust, … (TRL's losses), or simpo (ours, reference-free).",
        "max_length": "Longest prompt + reply in tokens; the prompt loses its oldest tokens first, then the reply its "
                      "tail (counts logged). Memory grows with it.",
        "label_smoothing": None,
        "precompute_ref_log_probs": "Compute the reference log-probabilities once before training, so full training "
                                    "keeps no second model in memory.",
        "use_weighting": None,
    },
    "KTOConfig": {
        "beta": "Strength of the pull towards the reference model (0.1 typical).",
        "desirable_weight": "Loss weight of thumbs-up examples; raise it when they are fewer than thumbs-down.",
        "undesirable_weight": "Loss weight of thumbs-down examples; raise it when they are fewer than thumbs-up.",
        "max_length": "Longest prompt + completion in tokens; longer ones are cut (counts logged).",
        "loss_type": "kto (the KTO paper's loss) or apo_zero_unpaired.",
    },
    "DistillationConfig": {
        "teacher_model_name_or_path": "The teacher: a model directory or hub name (merge an adapter first); only read, "
                                      "never trained (its memory comes on top of the student's).",
        "max_completion_length": "Longest answer the student samples per prompt, in tokens.",
        "temperature": None,
        "beta": None,
        "top_p": None,
        "disable_dropout": None,
    },
}


@dataclass(frozen=True)
class Option:
    name: str
    default: str
    help: str
    owner: str  # Class.field or `medgpt COMMAND`: where the help text lives


@dataclass
class Section:
    title: str
    intro: str
    options: list[Option]


def clean(text) -> str:
    return " ".join(str(text or "").replace("%%", "%").split())


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default) if isinstance(f.default, str) and not f.default else str(f.default)
    return str(f.default_factory()) if f.default_factory is not dataclasses.MISSING else "required"


def dataclass_options(cls: type, names=None, helps: dict | None = None, skip: set | None = None) -> list[Option]:
    """Fields of `cls` (all, or `names` in that order), our help text where `helps` gives one."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    options = []
    for name in names if names is not None else fields:
        if name in fields and name not in (skip or set()):
            f = fields[name]
            text = (helps or {}).get(name) or clean(f.metadata.get("help"))
            if f.metadata.get("stages"):
                text += f" Only in stage {', '.join(f.metadata['stages'])}; refused elsewhere."
            options.append(Option(name, default_of(f), text, f"{cls.__name__}.{name}"))
    return options


def own_sections() -> list[Section]:
    from medgpt.config import OWN_SECTIONS

    titles = {"ModelArguments": "Model", "DataArguments": "Data", "AdapterArguments": "Adapter: LoRA, QLoRA, full",
              "RunArguments": "Run"}
    return [Section(f"{titles.get(cls.__name__, cls.__name__)} (`{cls.__name__}`, every stage)",
                    clean(cls.__doc__), dataclass_options(cls)) for cls in OWN_SECTIONS]


def training_section() -> Section:
    from transformers import TrainingArguments

    intro = ("The trainer options every Trainer-based stage shares (transformers' `TrainingArguments`, upstream "
             "names), the ones users touch. The rest, about a hundred more, are listed with their help by "
             "`medgpt sft --help` (or any other stage's `--help`).")
    return Section("Training (`TrainingArguments`)", intro, dataclass_options(TrainingArguments, TRAINING_FIELDS,
                                                                               TRAINING_FIELDS))


def stage_sections(shared: set[str]) -> list[Section]:
    """One section per registered stage: its own option classes (all fields, each class once) and what its
    trainer config adds to or changes from `TrainingArguments`; names of the shared sections are not repeated."""
    from transformers import TrainingArguments

    from medgpt.stages import load_stages

    base = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    sections, seen_classes = [], {}  # class -> the first stage that documents it
    for stage in load_stages().values():
        options, notes = [], []
        for cls in stage.extra_classes:
            if cls in seen_classes:
                notes.append(f"`{cls.__name__}`: see stage {seen_classes[cls]}.")
                continue
            seen_classes[cls] = stage.name
            options += dataclass_options(cls, skip=shared | {option.name for option in options})
        training = stage.training_class
        if training is not TrainingArguments and training not in seen_classes:
            seen_classes[training] = stage.name
            added = [f.name for f in dataclasses.fields(training) if f.name not in base]
            curated = TRL_FIELDS.get(training.__name__)
            names = list(curated) if curated is not None and not training.__module__.startswith("medgpt") else added
            options += dataclass_options(training, names, curated, skip=shared | {option.name for option in options})
            changed = [f"{f.name} {default_of(f)}" for f in dataclasses.fields(training)  # medgpt sets bf16/fp16
                       if f.name in base and f.name not in ("bf16", "fp16")
                       and default_of(f) != default_of(base[f.name])]
            if changed:
                notes.append(f"`{training.__name__}` defaults that differ from `TrainingArguments`: "
                             + ", ".join(changed) + ".")
        elif training is not TrainingArguments:
            notes.append(f"Trainer options: `{training.__name__}`, see stage {seen_classes[training]}.")
        intro = " ".join([stage.summary[:1].upper() + stage.summary[1:] + ".", *notes])
        sections.append(Section(f"Stage `{stage.name}`", intro, options))
    return sections


def fixed_section() -> Section:
    """The options a stage accepts only at the value it always runs with (config.FIXED_OPTIONS)."""
    from medgpt.config import ANY_STAGE, FIXED_OPTIONS, _yaml_value

    intro = ("Options medgpt accepts only at the value a stage always runs with, because it sets them itself or its "
             "trainer does not read them; any other value is refused with the reason.")
    options = []
    for name, rules in FIXED_OPTIONS.items():
        parts = [f"{'every stage' if stage == ANY_STAGE else stage}: `{_yaml_value(value)}` ({why})"
                 for stage, (value, why) in rules.items()]
        options.append(Option(name, "fixed", "; ".join(dict.fromkeys(parts)) + ".", f"config.FIXED_OPTIONS[{name}]"))
    return Section("Fixed per stage (`config.FIXED_OPTIONS`)", intro, options)


def command_sections() -> list[Section]:
    """The flags of every tool command (data, chat, merge, score, plan, …), from the CLI's own parser."""
    from medgpt.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    sections = []
    for name, parser in commands.choices.items():
        if parser.get_default("training_stage") is not None or name == "train":
            continue
        for path, sub in _leaf_parsers(name, parser):
            options = [Option(action.option_strings[0] if action.option_strings else action.dest,
                              "required" if action.required else _argparse_default(action),
                              clean(action.help), f"medgpt {path}")
                       for action in sub._actions if not isinstance(action, (argparse._HelpAction,
                                                                             argparse._SubParsersAction))
                       and action.help != argparse.SUPPRESS]
            sections.append(Section(f"`medgpt {path}`", clean(helps.get(name)), options))
    return sections


def _leaf_parsers(path: str, parser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaf_parsers(f"{path} {name}", sub)


def _argparse_default(action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    return "none" if action.default is None else str(action.default)


def sections() -> list[Section]:
    own = own_sections()
    training = training_section()
    shared = {option.name for section in [*own, training] for option in section.options}
    return [*own, training, fixed_section(), *stage_sections(shared), *command_sections()]


def render_parameters(all_sections: list[Section]) -> str:
    out = ["# Parameter manual", "",
           "<!-- Generated from the help texts in the code by `make docs`; edit those, not this page. -->", "",
           "Every training stage reads a YAML file and `key=value` / `--key value` overrides with these names "
           "(`medgpt sft config.yaml learning_rate=1e-4`); unknown names are errors. Each option shows its "
           "default and what it does. `medgpt STAGE --help` prints the same texts plus every upstream trainer "
           "option not listed here; `medgpt plan` estimates the memory of a setting before you spend GPU time "
           "(formulas in [memory.md](memory.md)). 中文版: [parameters_zh.md](parameters_zh.md).",
           "", "## Contents", ""]
    out += [f"- [{s.title.replace('`', '')}](#{_anchor(s.title)})" for s in all_sections]
    for section in all_sections:
        out += ["", f"## {section.title}", ""]
        if section.intro:
            out += [section.intro, ""]
        for option in section.options:
            default = option.default if option.default in ("required", "fixed") else f"default: `{option.default}`"
            out.append(f"- **`{option.name}`** ({default}): {option.help}")
    return "\n".join(out) + "\n"


def _anchor(title: str) -> str:
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


# ------------------------------------------------------------------------------------------------ memory


# Llama 2 shapes, the models of the public tables (LLaMA-Factory's README, copied by MedicalGPT's)
REFERENCE_MODELS = {
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
# (row label, their GB for 7B / 13B / 70B, our Setup fields)
REFERENCE_ROWS = (
    ("Full, AMP (fp32 weights)", (120, 240, 1200), dict(method="full", bits=32)),
    ("Full, 16-bit", (60, 120, 600), dict(method="full", bits=16)),
    ("Freeze (top 2 layers), 16-bit", (20, 40, 200), dict(method="freeze", bits=16)),
    ("LoRA, 16-bit", (16, 32, 160), dict(method="lora", bits=16)),
    ("QLoRA, 8-bit", (10, 20, 80), dict(method="qlora", bits=8)),
    ("QLoRA, 4-bit", (6, 12, 48), dict(method="qlora", bits=4)),
)
TABLE_START, TABLE_END = "<!-- memory-table:start -->", "<!-- memory-table:end -->"


def memory_table() -> str:
    """Our estimate next to the public table: SFT, batch 1 × 1024 tokens, gradient checkpointing on, one H100."""
    from transformers import LlamaConfig

    from medgpt.plan.memory import GiB, Setup, estimate, model_shape
    from medgpt.plan.verdict import find_gpu

    shapes = {size: model_shape(LlamaConfig(vocab_size=32000, **values)) for size, values in REFERENCE_MODELS.items()}
    gpu = find_gpu("H100")
    out = ["| method | public 7B | ours 7B | public 13B | ours 13B | public 70B | ours 70B |",
           "|---|---|---|---|---|---|---|"]
    for label, public, fields in REFERENCE_ROWS:
        setup = Setup(stage="sft", batch=1, max_length=1024, gradient_checkpointing=True, **fields)
        cells = [f"{theirs} GB | {estimate(shapes[size], setup, gpu).total / GiB:.0f} GiB"
                 for size, theirs in zip(REFERENCE_MODELS, public)]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    params = ", ".join(f"{size} = {shape.total / 1e9:.2f} B" for size, shape in shapes.items())
    return "\n".join(out) + f"\n\nParameters (Llama 2 shapes, vocabulary 32,000): {params}."


def render_memory(current: str) -> str:
    """`current` with the text between the table markers regenerated."""
    head, start, rest = current.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        raise ValueError(f"{MEMORY} lacks the markers {TABLE_START} … {TABLE_END}")
    return f"{head}{TABLE_START}\n{memory_table()}\n{TABLE_END}{tail}"


# ------------------------------------------------------------------------------------------------ checks


def undocumented(all_sections: list[Section]) -> list[str]:
    """Where an option's help text is missing: `Class.field` or `medgpt COMMAND --flag`."""
    return [f"{option.owner} ({option.name})" for section in all_sections for option in section.options
            if not option.help]


def missing_translations(all_sections: list[Section], chinese: str) -> dict[str, list[str]]:
    """Option names, by section, that the hand-written Chinese page does not mention as `name`."""
    missing = {}
    for section in all_sections:
        names = [option.name for option in section.options if f"`{option.name}`" not in chinese]
        if names:
            missing[section.title] = names
    return missing


def main(argv: list[str] | None = None) -> int:
    all_sections = sections()
    PARAMETERS.write_text(render_parameters(all_sections), encoding="utf-8")
    MEMORY.write_text(render_memory(MEMORY.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {PARAMETERS.relative_to(ROOT)} and the table in {MEMORY.relative_to(ROOT)}")
    for owner in undocumented(all_sections):
        print(f"no help text: {owner}")
    for title, names in missing_translations(all_sections, PARAMETERS_ZH.read_text(encoding="utf-8")).items():
        print(f"{PARAMETERS_ZH.relative_to(ROOT)} lacks, from {title}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
