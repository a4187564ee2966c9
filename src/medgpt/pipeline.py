"""`medgpt pipeline`: run stages in order, wire each stage's model from earlier outputs, evaluate, report.

A pipeline file names its stages in run order, each a flat mapping of the stage's own options (optionally on
top of a stage YAML given as `config:`), plus shared `defaults` and an `evaluation` section:

    output_dir: outputs/demo
    defaults: {seed: 42}                      # given to every stage; an option a stage lacks is an error
    stages:
      sft: {config: configs/sft.yaml, model_name_or_path: smollm2-135m}
      rm:  {config: configs/rm.yaml, model_name_or_path: "${sft.output}"}
      dpo: {config: configs/dpo.yaml, model_name_or_path: "${sft.output}"}   # branches are fine
    evaluation: {perplexity_file: …, mcq_file: …, open_file: …, reward_model: "${rm.output}",
                 compare: {dpo: sft},
                 judges: {rm_b: "${rm_b.output}", big: {url: "http://127.0.0.1:8000/v1", model: qwen}}}

`${NAME.output}` is NAME's model: its LoRA merged into a plain model when a later stage uses it (`merge: auto`,
the default; `true`/`false` force it), else its output directory. `${NAME.adapter}` is the output directory
itself. A stage's key is its stage name unless it says `stage:`.

Everything (every stage's config and every data file) is checked before the first stage trains. Progress lives
in `OUTPUT/.pipeline/NAME.json`: a stage whose resolved options (and whose inputs) are unchanged and that
finished is skipped; one that was interrupted resumes from its newest complete checkpoint; `--from NAME` reruns
NAME and everything after it.

Win rates (`OUTPUT/eval/win_rates.json`, one entry per compared pair and judge: `ppo_vs_sft` for the evaluation's
reward model, `ppo_vs_sft_by_NAME` for each extra judge) carry `win_rate_ci`; an entry whose judge is the reward
model one of the compared stages was trained against (`reward_model_name_or_path`) names those stages in
`trained_against`, and the report says it is not an independent judge. Extra judges are reward models (any
directory, or `${stage.output}` of another reward stage, e.g. one trained on a disjoint half of the preference
data) or OpenAI-compatible endpoints (`medgpt.evaluation.judges`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from medgpt.config import OWN_SECTIONS, ConfigError, build_config, normalise_keys, read_yaml
from medgpt.stages import Stage, get_stage

logger = logging.getLogger(__name__)

REFERENCE = re.compile(r"\$\{([A-Za-z_][\w-]*)\.(output|adapter)\}")
PIPELINE_KEYS = {"output_dir", "defaults", "stages", "evaluation", "description"}
STAGE_KEYS = {"config", "stage", "merge"}  # pipeline-level keys of a stage entry (not stage options)
REWARD_STAGES = {"rm"}  # their output scores answers; they are not evaluated as chat models
STATE_DIR = ".pipeline"


@dataclasses.dataclass
class PlannedStage:
    name: str
    stage: Stage
    values: dict[str, Any]  # resolved options, as the stage receives them
    output: Path
    inputs: list[str]  # names of earlier stages it reads
    merge: str  # auto | true | false, as written
    config: Any = None  # the built RunConfig
    fingerprint: str = ""
    referenced: bool = False  # a later stage or the evaluation reads `${name.output}`: `merge: auto` merges

    @property
    def merged(self) -> Path:
        return self.output.with_name(self.output.name + "-merged")

    @property
    def uses_lora(self) -> bool:
        return bool(self.config.adapter.use_peft)

    @property
    def is_reward_model(self) -> bool:
        """Its output scores answers: it is measured on held-out pairs, not evaluated as a chat model."""
        return self.stage.name in REWARD_STAGES


@dataclasses.dataclass
class Pipeline:
    file: Path
    output_dir: Path
    stages: list[PlannedStage]
    evaluation: dict[str, Any]
    compare: dict[str, str]  # stage -> the stage it is compared with (win rates)
    judges: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # name -> {model} or {url, model}

    def stage(self, name: str) -> PlannedStage:
        return next(s for s in self.stages if s.name == name)

    def model_of(self, name: str) -> Path:
        """What `${name.output}` means once the stage has run."""
        planned = self.stage(name)
        return planned.merged if merges(planned, self) else planned.output

    def state(self, name: str) -> dict[str, Any]:
        return stage_state(self, name)

    @property
    def state_dir(self) -> Path:
        return self.output_dir / STATE_DIR

    @property
    def base_model(self) -> str:
        return str(self.stages[0].values["model_name_or_path"])


# ------------------------------------------------------------------------------------------------ planning


def load_pipeline(path: str | Path) -> Pipeline:
    """Read the pipeline file, resolve references and build every stage's config (no model, no data yet)."""
    path = Path(path)
    raw = read_yaml(path, flat=False)
    unknown = sorted(set(raw) - PIPELINE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)} (known: {', '.join(sorted(PIPELINE_KEYS))})")
    if not raw.get("output_dir"):
        raise ConfigError(f"{path}: output_dir is required (every stage writes under it)")
    entries = raw.get("stages")
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{path}: `stages` must map stage names to their options, in run order")
    output_dir = Path(raw["output_dir"])
    defaults = normalise_keys(raw.get("defaults") or {}, f"{path}: defaults")
    pipeline = Pipeline(path, output_dir, [], {}, {})
    for name, entry in entries.items():
        pipeline.stages.append(_plan_stage(pipeline, str(name), entry or {}, defaults))
    evaluation = dict(raw.get("evaluation") or {})
    compare = evaluation.pop("compare", None) or {}
    if not isinstance(compare, dict):
        raise ConfigError(f"{path}: evaluation.compare maps a stage to the stage it is compared with")
    names = ["base"] + [s.name for s in pipeline.stages]
    for a, b in compare.items():
        for n in (a, b):
            if n not in names:
                raise ConfigError(f"{path}: evaluation.compare names '{n}', which is not a stage ({', '.join(names)})")
    pipeline.compare = {str(a): str(b) for a, b in compare.items()}
    pipeline.judges = _plan_judges(pipeline, evaluation.pop("judges", None) or {})
    pipeline.evaluation = {k: _resolve(v, pipeline, f"{path}: evaluation.{k}", [])[0] for k, v in evaluation.items()}
    _check_evaluation_keys(pipeline)
    return pipeline


def _plan_judges(pipeline: Pipeline, judges: Any) -> dict[str, dict[str, str]]:
    where = f"{pipeline.file}: evaluation.judges"
    if not isinstance(judges, dict):
        raise ConfigError(f"{where} maps a name to a reward model (a directory or ${{stage.output}}) or to "
                          "{url: …, model: …} of an OpenAI-compatible endpoint")
    planned = {}
    for name, judge in judges.items():
        judge = {"url": judge} if isinstance(judge, str) and judge.startswith(("http://", "https://")) else \
            {"model": judge} if isinstance(judge, str) else judge
        if not isinstance(judge, dict) or not (set(judge) <= {"url", "model"}) or \
                ("url" not in judge and "model" not in judge):
            raise ConfigError(f"{where}.{name}: give a reward model (string) or {{url: …, model: …}}")
        planned[str(name)] = {k: str(_resolve(v, pipeline, f"{where}.{name}.{k}", [])[0]) for k, v in judge.items()}
    return planned


def _plan_stage(pipeline: Pipeline, name: str, entry: dict, defaults: dict) -> PlannedStage:
    where = f"{pipeline.file}: stages.{name}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping of options")
    if any(s.name == name for s in pipeline.stages):
        raise ConfigError(f"{where}: the name is used twice")
    values: dict[str, Any] = {}
    if entry.get("config"):
        values.update(normalise_keys(read_yaml(entry["config"]), str(entry["config"])))
    stage_name = entry.get("stage") or values.get("stage") or name
    try:
        stage = get_stage(stage_name)
    except KeyError as err:
        raise ConfigError(f"{where}: {err.args[0]}") from None
    known = {f.name for cls in (*OWN_SECTIONS, *stage.extra_classes, stage.training_class)
             for f in dataclasses.fields(cls) if f.init}
    lacking = sorted(set(defaults) - known)
    if lacking:
        raise ConfigError(f"{where}: stage '{stage.name}' has no option(s) {', '.join(lacking)} given in `defaults` "
                          "(set them per stage instead)")
    values.update(defaults)
    values.update(normalise_keys({k: v for k, v in entry.items() if k not in STAGE_KEYS}, where))
    if "output_dir" in entry:
        raise ConfigError(f"{where}: output_dir is set by the pipeline ({pipeline.output_dir / name})")
    merge = str(entry.get("merge", "auto")).lower()
    if merge not in ("auto", "true", "false"):
        raise ConfigError(f"{where}: merge must be auto, true or false")
    inputs: list[str] = []
    resolved = {}
    for key, value in values.items():
        resolved[key], used = _resolve(value, pipeline, f"{where}.{key}", inputs)
        inputs += [u for u in used if u not in inputs]
    resolved.update(stage=stage.name, output_dir=str(pipeline.output_dir / name))
    planned = PlannedStage(name, stage, resolved, pipeline.output_dir / name, inputs, merge)
    try:
        planned.config = build_config(stage, dict(resolved))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    upstream = "".join(pipeline.stage(n).fingerprint for n in inputs)
    planned.fingerprint = hashlib.sha256((json.dumps(resolved, sort_keys=True, default=str) + upstream).encode()).hexdigest()[:16]
    return planned


def _resolve(value: Any, pipeline: Pipeline, where: str, seen: list[str]) -> tuple[Any, list[str]]:
    """Replace `${name.output|adapter}` in a string value; returns the value and the stages it names."""
    if not isinstance(value, str):
        return value, []
    used = []

    def replace(match: re.Match) -> str:
        name, what = match.groups()
        if not any(s.name == name for s in pipeline.stages):
            later = "a later or unknown stage"
            raise ConfigError(f"{where}: ${{{name}.{what}}} refers to {later}; a stage can use only earlier stages "
                              f"({', '.join(s.name for s in pipeline.stages) or 'none yet'})")
        used.append(name)
        planned = pipeline.stage(name)
        if what == "adapter":
            return str(planned.output)
        planned.referenced = True
        return str(planned.merged if merges(planned, pipeline) else planned.output)

    return REFERENCE.sub(replace, value), used


def merges(planned: PlannedStage, pipeline: Pipeline) -> bool:
    if planned.merge == "false" or not planned.uses_lora:
        return False
    return planned.merge == "true" or planned.referenced


def _check_evaluation_keys(pipeline: Pipeline) -> None:
    from medgpt.evaluation import EvalSpec

    known = {f.name for f in dataclasses.fields(EvalSpec)} - {"judges", "judge_model_name", "compare_with"}
    unknown = sorted(set(pipeline.evaluation) - known)
    if unknown:
        raise ConfigError(f"{pipeline.file}: evaluation has unknown key(s) {', '.join(unknown)} "
                          f"(known: compare, judges, {', '.join(sorted(known))})")


def check_data(pipeline: Pipeline) -> None:
    """Read every stage's training data and every evaluation file now, so a bad line fails before hour one."""
    from medgpt.data.check import check_paths
    from medgpt.data.readers import ReadOptions
    from medgpt.data.records import InvalidDataError

    problems = []
    for planned in pipeline.stages:
        d = planned.config.data
        paths = [p for p in [d.train_file_dir, d.validation_file_dir] if p]
        if not paths or d.streaming:
            continue  # hub datasets and streams are read by the stage itself
        checks = check_paths(paths, planned.stage.name, ReadOptions(d.data_format, d.text_separator))
        errors = [e for c in checks for e in c.errors]
        if errors and not d.skip_invalid_records:
            problems += errors
    spec = pipeline.evaluation
    for key, kind in (("perplexity_file", "pt"), ("preference_file", "rm"), ("open_file", "eval")):
        if spec.get(key):
            problems += [e for c in check_paths([spec[key]], kind) for e in c.errors]
    if spec.get("mcq_file"):  # benchmarks as published: their own readers
        from medgpt.evaluation import EvalSpec
        from medgpt.evaluation.run import read_mcq

        values = EvalSpec(**spec)
        values.limit = None
        try:
            read_mcq(values)
        except InvalidDataError as err:
            problems += err.errors
    if problems:
        raise InvalidDataError(problems)


# ------------------------------------------------------------------------------------------------ running


def run_pipeline(path: str | Path, from_stage: str | None = None) -> Path:
    """Run (or continue) the pipeline; returns the report's path."""
    from medgpt.pipeline_evaluation import compare_answers, evaluate, evaluate_reward_model
    from medgpt.pipeline_report import write_pipeline_report

    pipeline = load_pipeline(path)
    names = [s.name for s in pipeline.stages]
    if from_stage is not None and from_stage not in names:
        raise ConfigError(f"--from {from_stage}: no such stage ({', '.join(names)})")
    check_data(pipeline)
    logger.info("pipeline %s: %s", pipeline.file, " -> ".join(names))
    state = pipeline.output_dir / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    forced = set(names[names.index(from_stage):]) if from_stage else set()

    evaluate(pipeline, "base", pipeline.base_model, fingerprint="base")
    write_pipeline_report(pipeline)
    for planned in pipeline.stages:
        run_stage(pipeline, planned, force=planned.name in forced)
        # The run's finish time is part of the key: a rerun stage is evaluated again.
        fingerprint = f"{planned.fingerprint}-{stage_state(pipeline, planned.name).get('finished')}"
        if planned.is_reward_model:
            evaluate_reward_model(pipeline, planned.name, fingerprint)
        else:
            evaluate(pipeline, planned.name, str(planned.output), fingerprint=fingerprint)
        write_pipeline_report(pipeline)
    compare_answers(pipeline)
    return write_pipeline_report(pipeline)


def stage_state(pipeline: Pipeline, name: str) -> dict[str, Any]:
    path = pipeline.output_dir / STATE_DIR / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_state(pipeline: Pipeline, name: str, state: dict[str, Any]) -> None:
    path = pipeline.output_dir / STATE_DIR / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")
    tmp.replace(path)


def run_stage(pipeline: Pipeline, planned: PlannedStage, force: bool = False) -> None:
    from medgpt.metrics_files import RESULTS_FILE
    from medgpt.models.merge import merge_adapter

    state = stage_state(pipeline, planned.name)
    same = state.get("fingerprint") == planned.fingerprint
    if same and state.get("status") == "done" and not force and (planned.output / RESULTS_FILE).is_file():
        logger.info("stage %s: finished earlier with the same options, skipped", planned.name)
    else:
        resume = same and state.get("status") == "running" and not force
        values = dict(planned.values)
        values.update(overwrite_output_dir=not resume, resume_from_checkpoint="auto" if resume else None)
        config = build_config(planned.stage, values)
        logger.info("stage %s (%s): %s", planned.name, planned.stage.name, "resuming" if resume else "starting")
        _write_state(pipeline, planned.name, {"fingerprint": planned.fingerprint, "status": "running",
                                              "stage": planned.stage.name, "started": time.time()})
        started = time.perf_counter()
        planned.stage.run(config)
        seconds = time.perf_counter() - started
        _write_state(pipeline, planned.name, {"fingerprint": planned.fingerprint, "status": "done",
                                              "stage": planned.stage.name, "seconds": round(seconds, 1),
                                              "finished": time.time()})
        _release_memory()
    state = stage_state(pipeline, planned.name)
    if merges(planned, pipeline) and (state.get("merged") != state.get("finished")
                                      or not (planned.merged / "config.json").is_file()):
        import shutil

        logger.info("stage %s: merging its LoRA adapter into %s for the stages that use it", planned.name, planned.merged)
        shutil.rmtree(planned.merged, ignore_errors=True)
        merge_adapter(planned.output, planned.merged)
        _write_state(pipeline, planned.name, {**state, "merged": state.get("finished")})
        _release_memory()


def _release_memory() -> None:
    from medgpt.evaluation.run import free_memory

    free_memory()
