"""The pipeline's evaluations: each chat model once per fingerprint (`OUTPUT/eval/NAME/`), each reward stage on
the held-out pairs, and the win rates of the compared pairs under every judge (`OUTPUT/eval/win_rates.json`).
It works on the `Pipeline` object it is given (medgpt.pipeline) and imports nothing of it."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from medgpt.metrics_files import read_json

logger = logging.getLogger(__name__)

WIN_RATES_FILE = "win_rates.json"
COPIED = ("max_length", "batch_size", "torch_dtype", "seed")  # evaluation options a reward-model run also takes


def evaluate(pipeline, name: str, model: str, fingerprint: str) -> dict[str, Any] | None:
    """Evaluate one chat model (cached by fingerprint), writing `OUTPUT/eval/NAME/`. Held-out preference pairs
    measure the reward model, not this model: they are scored once per reward stage (`evaluate_reward_model`),
    or with the base model when the reward model comes from outside the pipeline."""
    spec_values = dict(pipeline.evaluation)
    reward_model = spec_values.get("reward_model")
    trained_here = reward_stage_of(pipeline, reward_model)
    if trained_here is not None or not reward_model or name != "base":
        spec_values.pop("preference_file", None)
    if not any(k in spec_values for k in ("perplexity_file", "mcq_file", "open_file", "preference_file")):
        return None
    names = [s.name for s in pipeline.stages]
    if not ("open_file" in spec_values or "preference_file" in spec_values):
        spec_values.pop("reward_model", None)  # nothing here for it to score
    elif trained_here is not None and (name not in names or names.index(name) < names.index(trained_here)):
        # Trained later in this run (maybe again, after --from): a reward model from an earlier run must not
        # score these answers; compare_answers scores them with the final one.
        spec_values.pop("reward_model")
    elif trained_here is not None:  # answers scored by a reward model that was retrained are scored again
        state = pipeline.state(trained_here)
        fingerprint += f"-{state.get('fingerprint')}-{state.get('finished')}"
    return _cached_evaluation(pipeline, name, model, spec_values, fingerprint)


def judged_stages(pipeline) -> set[str]:
    """Reward stages whose model judges something: the evaluation's reward model and the extra judges."""
    models = [pipeline.evaluation.get("reward_model"), *[j.get("model") for j in pipeline.judges.values()]]
    return {stage for stage in (reward_stage_of(pipeline, m) for m in models) if stage}


def evaluate_reward_model(pipeline, name: str, fingerprint: str) -> dict[str, Any] | None:
    """Accuracy of the reward stage NAME on the evaluation's held-out preference pairs (when it judges
    something, or nothing does), writing `OUTPUT/eval/NAME/`."""
    pairs = pipeline.evaluation.get("preference_file")
    judges = judged_stages(pipeline)
    if not pairs or ((pipeline.evaluation.get("reward_model") or judges) and name not in judges):
        return None
    model = str(pipeline.model_of(name))
    spec_values = {"preference_file": pairs, "reward_model": model,
                   **{k: v for k, v in pipeline.evaluation.items() if k in COPIED}}
    return _cached_evaluation(pipeline, name, model, spec_values, fingerprint)


def reward_stage_of(pipeline, reward_model: str | None) -> str | None:
    """The pipeline stage whose model `reward_model` is (`${rm.output}`), if any."""
    for planned in pipeline.stages:
        if reward_model and planned.is_reward_model and \
                str(reward_model) in (str(pipeline.model_of(planned.name)), str(planned.output)):
            return planned.name
    return None


def _cached_evaluation(pipeline, name: str, model: str, spec_values: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    from medgpt.evaluation import EvalSpec, evaluate_model

    done_key = hashlib.sha256((fingerprint + json.dumps(spec_values, sort_keys=True, default=str)).encode()).hexdigest()[:16]
    directory = pipeline.output_dir / "eval" / name
    marker = pipeline.state_dir / f"eval-{name}.json"
    if read_json(marker).get("key") == done_key and (directory / "metrics.json").is_file():
        return read_json(directory / "metrics.json")
    logger.info("evaluating %s (%s)", name, model)
    started = time.perf_counter()
    metrics = evaluate_model(model, EvalSpec(**spec_values), output_dir=directory)
    metrics["eval_seconds"] = round(time.perf_counter() - started, 1)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    marker.write_text(json.dumps({"key": done_key}), encoding="utf-8")
    _release_memory()
    return metrics


# ------------------------------------------------------------------------------------------------ win rates


def trained_against(pipeline, stages: tuple[str, ...], judge_model: str | None) -> list[str]:
    """The stages among `stages` and everything they were built from that trained against `judge_model`
    (their `reward_model_name_or_path` is it)."""
    if not judge_model:
        return []
    judge = reward_stage_of(pipeline, judge_model)
    accepted = {str(judge_model)} | ({str(pipeline.model_of(judge)), str(pipeline.stage(judge).output)} if judge else set())
    names = {s.name for s in pipeline.stages}
    found, todo = [], [s for s in stages if s in names]
    while todo:
        planned = pipeline.stage(todo.pop())
        if str(planned.values.get("reward_model_name_or_path")) in accepted and planned.name not in found:
            found.append(planned.name)
        todo += planned.inputs
    return sorted(found)


def judges_of(pipeline) -> dict[str, dict[str, str]]:
    """name -> {model} or {url, model}: the evaluation's reward model first (named after its stage), then the
    extra judges."""
    judges = {}
    reward_model = pipeline.evaluation.get("reward_model")
    if reward_model:
        judges[reward_stage_of(pipeline, reward_model) or "reward_model"] = {"model": str(reward_model)}
    return {**judges, **pipeline.judges}


def compare_answers(pipeline) -> None:
    """Win rates of each compared pair under each judge, from the answers their evaluations saved."""
    from medgpt.evaluation.judges import EndpointJudge, RewardModelJudge, summary
    from medgpt.evaluation.rewards import matched_answers

    judges = judges_of(pipeline)
    if not pipeline.compare or not judges:
        return
    settings = {k: v for k, v in pipeline.evaluation.items() if k in ("max_length", "batch_size", "torch_dtype")}
    seed = pipeline.evaluation.get("seed", 0)
    results = {}
    for index, (judge_name, judge) in enumerate(judges.items()):
        loaded = None
        for a, b in pipeline.compare.items():
            files = [pipeline.output_dir / "eval" / n / "answers.jsonl" for n in (a, b)]
            if not all(f.is_file() for f in files):
                continue
            if loaded is None:
                _release_memory()
                loaded = EndpointJudge(judge["url"], judge.get("model"), judge_name) if "url" in judge else \
                    RewardModelJudge.load(judge["model"], judge_name, **settings)
            key = f"{a}_vs_{b}" if index == 0 and pipeline.evaluation.get("reward_model") else f"{a}_vs_{b}_by_{judge_name}"
            outcome = summary(loaded.outcomes(*matched_answers(files[0], files[1])), judge_name, seed)
            results[key] = {**outcome, "a": a, "b": b,
                            "trained_against": trained_against(pipeline, (a, b), judge.get("model"))}
    (pipeline.output_dir / "eval" / WIN_RATES_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    _release_memory()


def _release_memory() -> None:
    from medgpt.evaluation.run import free_memory

    free_memory()
