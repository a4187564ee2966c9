"""`evaluate_model`: read and check every file an `EvalSpec` names (errors as file:line: field) before any model
loads, then run what it asks with each model loaded once, and write the outputs:

  metrics.json          flat metrics; every accuracy and win rate with `<metric>_ci` = [low, high] (95%)
  mcq.jsonl             per question: answer letter(s), predicted, correct, category, scores or completion
  answers.jsonl         per open question: question, answer (and reward when a reward model scored it)
  perplexity.jsonl      per held-out document: NLL sum and tokens (for paired comparisons between models)
  compare_answers.jsonl the compared model's answers, when compare_with names a model
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medgpt.data.readers import ReadOptions, read_records
from medgpt.data.records import PreferencePair, TextRecord
from medgpt.evaluation.answers import answer_rows, generate_answers
from medgpt.evaluation.benchmarks import Question, read_questions
from medgpt.evaluation.judges import make_judge, summary
from medgpt.evaluation.mcq import MCQItem, likelihood_rows, mcq_metrics
from medgpt.evaluation.mcq_prompts import few_shot_examples
from medgpt.evaluation.perplexity import perplexity
from medgpt.evaluation.rewards import matched_answers, reward_accuracy, reward_outcomes, score_answers
from medgpt.evaluation.spec import EvalSpec
from medgpt.rl.prompts import Prompt, records_to_prompts

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ANSWERS_FILE = "answers.jsonl"
MCQ_FILE = "mcq.jsonl"
PERPLEXITY_FILE = "perplexity.jsonl"
COMPARE_FILE = "compare_answers.jsonl"


@dataclass
class EvalData:
    texts: list[TextRecord] = field(default_factory=list)
    mcq: list[MCQItem] = field(default_factory=list)
    mcq_formats: list[str] = field(default_factory=list)
    pairs: list[PreferencePair] = field(default_factory=list)
    prompts: list[Prompt] = field(default_factory=list)
    compare_answers: list[dict] | None = None  # an answers file given as compare_with


def read_mcq(spec: EvalSpec) -> tuple[list[MCQItem], list[str]]:
    read = read_questions(spec.mcq_file, spec.mcq_format, spec.mcq_split, spec.mcq_subset, spec.medmcqa_numbering,
                          spec.subjects)
    questions = read.questions[:spec.limit]
    pool: list[Question] = []
    if spec.few_shot_file:
        pool = read_questions(spec.few_shot_file, spec.mcq_format, medmcqa_numbering=spec.medmcqa_numbering,
                              subjects=spec.subjects).questions
    elif spec.few_shot_from_eval_set:
        pool = read.questions
    items = [MCQItem(q, few_shot_examples(pool, q, spec.few_shot)) for q in questions]
    return items, sorted(set(read.formats.values()))


def read_eval_data(spec: EvalSpec) -> EvalData:
    """Every evaluation file, read and validated and cut to `limit`."""
    data, limit = EvalData(), spec.limit
    if spec.perplexity_file:
        options = ReadOptions(text_separator=spec.text_separator)
        data.texts = read_records(spec.perplexity_file, ("text",), options, limit=limit).records
    if spec.mcq_file:
        data.mcq, data.mcq_formats = read_mcq(spec)
    if spec.preference_file:
        data.pairs = read_records(spec.preference_file, ("preference",), limit=limit).records
    if spec.open_file:
        records = read_records(spec.open_file, ("qa", "conversation"), limit=spec.open_limit or limit).records
        data.prompts = records_to_prompts(records)
    if spec.compare_with and (Path(spec.compare_with).is_file() or spec.compare_with.endswith((".jsonl", ".json"))):
        data.compare_answers = answer_rows(spec.compare_with)  # else it names a model
    return data


def evaluate_model(model: str, spec: EvalSpec, output_dir: str | Path | None = None) -> dict:
    """Run what `spec` asks for on `model` (a model or adapter directory, the embedded alias or a hub name) and
    return the metrics; with `output_dir`, also write the files listed in the module docstring there."""
    spec.check()
    data = read_eval_data(spec)
    began = time.perf_counter()
    files: dict[str, list[dict] | None] = {}
    metrics: dict = {}
    if data.texts or data.mcq or data.prompts:  # a reward-accuracy-only run never loads the policy
        metrics, files = _policy_metrics(model, spec, data)
    answers = files.get(ANSWERS_FILE) or []
    compared = None  # the other side of the win rate: an answers file's rows, or the compared model's answers
    if spec.compare_with:
        compared = data.compare_answers or _answers_of(spec.compare_with, data.prompts, spec)
    if spec.reward_model:
        metrics.update(_reward_model_metrics(spec, data.pairs, answers, compared))
    if spec.judges and compared is not None:
        metrics["judges"] = _judged(spec, answers, compared)
    metrics["eval_seconds"] = round(time.perf_counter() - began, 1)
    if output_dir is not None:
        files[COMPARE_FILE] = None if data.compare_answers else compared
        _write_outputs(Path(output_dir), metrics, files)
    return metrics


def _policy_metrics(model: str, spec: EvalSpec, data: EvalData) -> tuple[dict, dict[str, list[dict]]]:
    """Everything the evaluated model itself computes, loaded once."""
    engine = _load_engine(model, spec)
    metrics, files = {}, {}
    if data.texts:
        logger.info("perplexity on %d held-out documents", len(data.texts))
        scores, files[PERPLEXITY_FILE] = perplexity(engine.model, engine.tokenizer, data.texts, spec.max_length,
                                                    spec.batch_size)
        metrics.update(scores)
    if data.mcq:
        metrics.update(_mcq(engine, spec, data, files))
    if data.prompts:
        logger.info("answering %d open questions (greedy, up to %d tokens)", len(data.prompts), spec.max_new_tokens)
        files[ANSWERS_FILE] = generate_answers(engine, data.prompts, spec.max_new_tokens, spec.batch_size)
        metrics["open_n"] = len(files[ANSWERS_FILE])
    return metrics, files


def _mcq(engine, spec: EvalSpec, data: EvalData, files: dict) -> dict:
    logger.info("multiple choice (%s): %d questions, %d-shot, scored by %s with %s prompts",
                ", ".join(data.mcq_formats), len(data.mcq), spec.few_shot, spec.mcq_scoring, spec.mcq_prompt)
    if spec.mcq_scoring == "generate":
        from medgpt.evaluation.mcq_generate import generation_rows

        rows, truncated = generation_rows(engine, data.mcq, spec.mcq_prompt, spec.mcq_cot, spec.mcq_max_new_tokens,
                                          spec.max_length, spec.batch_size)
    else:
        rows, truncated = likelihood_rows(engine.model, data.mcq, spec.mcq_scoring, spec.mcq_prompt, engine.chat_format,
                                          engine.tokenizer, spec.max_length, spec.batch_size)
    files[MCQ_FILE] = rows
    metrics = mcq_metrics(data.mcq, rows, spec.seed)
    metrics.update(mcq_format=",".join(data.mcq_formats), mcq_scoring=spec.mcq_scoring, mcq_prompt=spec.mcq_prompt,
                   mcq_few_shot=spec.few_shot, mcq_truncated=truncated)
    if spec.mcq_scoring == "generate":
        metrics["mcq_unanswered"] = sum(r["predicted"] is None for r in rows)
    return metrics


def _load_engine(model: str, spec: EvalSpec):
    from medgpt.serve.engine import GenerationEngine

    free_memory()  # the previous model, dropped by its caller, before the next one loads
    template = spec.template
    if spec.mcq_prompt == "plain" and not template and not _has_chat_template(model, spec):
        template = "chatml"  # plain prompts use no template; a base model without one still loads
    return GenerationEngine.load(model, template=template, torch_dtype=spec.torch_dtype,
                                 trust_remote_code=spec.trust_remote_code)


def _has_chat_template(model: str, spec: EvalSpec) -> bool:
    from medgpt.arguments import ModelArguments
    from medgpt.models.load import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=resolve_model_path(model),
                                              trust_remote_code=spec.trust_remote_code))
    return bool(getattr(tokenizer, "chat_template", None))


def free_memory() -> None:
    """Give back what the last dropped model held, before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _answers_of(model: str, prompts: list[Prompt], spec: EvalSpec) -> list[dict]:
    logger.info("answering the same %d questions with %s for the win rate", len(prompts), model)
    return generate_answers(_load_engine(model, spec), prompts, spec.max_new_tokens, spec.batch_size)


def _reward_model_metrics(spec: EvalSpec, pairs: list[PreferencePair], answers: list[dict],
                          compared: list[dict] | None) -> dict:
    """Everything the reward model decides, with it loaded once (answers get their `reward`)."""
    from medgpt.models.reward import RewardModelScorer

    free_memory()
    scorer = RewardModelScorer.load(spec.reward_model, torch_dtype=spec.torch_dtype, batch_size=spec.batch_size,
                                    max_length=spec.max_length, trust_remote_code=spec.trust_remote_code)
    metrics = {}
    if pairs:
        logger.info("reward accuracy on %d held-out pairs", len(pairs))
        metrics.update(reward_accuracy(scorer, pairs))
    if answers:
        for row, reward in zip(answers, score_answers(scorer, answers)):
            row["reward"] = reward
        metrics["reward_mean"] = sum(row["reward"] for row in answers) / len(answers)
    if compared is not None:
        rows_a, rows_b = matched_answers(answers, compared)
        metrics.update(summary(reward_outcomes(scorer, rows_a, rows_b), spec.reward_model, spec.seed))
    return metrics


def _judged(spec: EvalSpec, answers: list[dict], compared: list[dict]) -> dict[str, dict]:
    """The win rate once per extra judge, keyed by the judge as given."""
    rows_a, rows_b = matched_answers(answers, compared)
    results = {}
    for given in spec.judges:
        free_memory()
        judge = make_judge(given, model_name=spec.judge_model_name, torch_dtype=spec.torch_dtype,
                           batch_size=spec.batch_size, max_length=spec.max_length)
        results[given] = summary(judge.outcomes(rows_a, rows_b), judge.name, spec.seed)
    return results


def _write_outputs(directory: Path, metrics: dict, files: dict[str, list[dict] | None]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / METRICS_FILE, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    for name in (ANSWERS_FILE, MCQ_FILE, PERPLEXITY_FILE, COMPARE_FILE):
        rows = files.get(name)
        if rows:
            _write_atomic(directory / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        else:  # left by an earlier evaluation that asked for more: it would pass for this run's
            (directory / name).unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    """Write next to the target, then rename over it: a reader never sees half a file."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def format_metrics(metrics: dict) -> str:
    """A two-column table for the terminal; an interval follows its metric, per-category rows are indented."""
    lines = []
    for key, value in metrics.items():
        if key.endswith("_ci") and key[:-3] in metrics:
            continue
        if isinstance(value, dict):
            for name, sub in value.items():
                lines.append((f"{key}: {name}", _shown(sub)))
        else:
            lines.append((key, _shown(value, metrics.get(f"{key}_ci"))))
    width = max(len(k) for k, _ in lines)
    return "\n".join([f"{'metric':<{width}}  value", f"{'-' * width}  -----",
                      *[f"{k:<{width}}  {v}" for k, v in lines]])


def _shown(value, interval=None) -> str:
    if isinstance(value, dict):  # a category or a judge: its main number, interval and size
        main = next((k for k in ("accuracy", "win_rate") if k in value), None)
        if main:
            n = value.get("n", value.get("win_n"))
            return f"{_shown(value[main], value.get(f'{main}_ci'))} (n={n})"
        return json.dumps(value, ensure_ascii=False)
    shown = f"{value:.4f}" if isinstance(value, float) else str(value)
    if interval:
        shown += f"  [{interval[0]:.4f}, {interval[1]:.4f}]"
    return shown
