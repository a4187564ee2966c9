"""Evaluate a model: perplexity on held-out text, multiple-choice accuracy by option log-likelihood,
reward-model accuracy on held-out pairs, greedy answers to open questions (scored by a reward model), and the
reward-judged win rate against another model's answers. `medgpt eval` and the pipeline report both call
`evaluate_model`; every data file is read and checked before any model loads."""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medgpt.config import ConfigError
from medgpt.data.readers import ReadOptions, read_records
from medgpt.data.records import MCQRecord, PreferencePair, TextRecord
from medgpt.evaluation.answers import answer_rows, generate_answers
from medgpt.evaluation.mcq import REPLIES, mcq_accuracy
from medgpt.evaluation.perplexity import perplexity
from medgpt.evaluation.rewards import reward_accuracy, reward_win_rate, score_answers
from medgpt.rl.prompts import Prompt, records_to_prompts

__all__ = ["EvalSpec", "evaluate_model", "reward_win_rate", "format_metrics"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ANSWERS_FILE = "answers.jsonl"  # question, answer, reward (when a reward model scored it) per open question
MCQ_FILE = "mcq.jsonl"  # per question: answer, predicted option, each option's score
COMPARE_FILE = "compare_answers.jsonl"  # the compared model's answers, when --compare-with names a model


@dataclass
class EvalSpec:
    """What to evaluate; each file is optional, and what is left out is not run."""

    perplexity_file: str | None = None  # held-out text (.txt a document per line, or .jsonl with `text`)
    mcq_file: str | None = None  # question, options {A..}, answer
    few_shot: int = 0  # solved examples from the same file (never the question itself) as earlier turns
    mcq_reply: str = "text"  # the reply scored per option: its text, or "letter" ("B. its text")
    preference_file: str | None = None  # held-out pairs: reward-model accuracy
    reward_model: str | None = None  # `medgpt rm` output: preference accuracy, answers' rewards, win rate
    open_file: str | None = None  # open questions (question/answer or conversation files): answers saved
    compare_with: str | None = None  # answers file or model: win rate of this model's answers over its answers
    limit: int | None = None  # first N items of each set
    open_limit: int | None = None  # first N open questions (default: limit); generation is the slow part
    max_new_tokens: int = 128
    max_length: int = 1024  # tokens per scored sequence (documents keep their start, MCQ prompts their end)
    batch_size: int = 8
    template: str | None = None  # named chat template (default: the one saved with the model)
    text_separator: str = "line"  # perplexity .txt: a document per line, or per blank-line paragraph
    torch_dtype: str = "auto"  # fp32 on CPU, bf16 (fp16 on old GPUs) on a GPU
    trust_remote_code: bool = False
    seed: int = 0  # picks the few-shot examples

    def check(self) -> None:
        """Refuse options that would silently do nothing, before anything is read."""
        if not (self.perplexity_file or self.mcq_file or self.preference_file or self.open_file):
            raise ConfigError("nothing to evaluate: give a perplexity, mcq, preference or open-question file")
        if self.preference_file and not self.reward_model:
            raise ConfigError("reward accuracy on a preference file needs a reward model (`medgpt rm` output)")
        if self.compare_with and not (self.open_file and self.reward_model):
            raise ConfigError("a win rate needs open questions to answer and a reward model to judge the answers")
        if self.few_shot and not self.mcq_file:
            raise ConfigError("few_shot applies to multiple-choice questions: give an mcq file")
        if self.reward_model and not (self.preference_file or self.open_file):
            raise ConfigError("the reward model scores preference pairs or open answers: give one of those files")
        if self.mcq_reply not in REPLIES:
            raise ConfigError(f"mcq_reply '{self.mcq_reply}' is not one of {', '.join(REPLIES)}")
        if self.few_shot < 0 or self.batch_size < 1 or any(n is not None and n < 1 for n in (self.limit, self.open_limit)):
            raise ConfigError("few_shot must be >= 0, limit, open_limit and batch_size >= 1")


@dataclass
class EvalData:
    texts: list[TextRecord] = field(default_factory=list)
    mcq: list[MCQRecord] = field(default_factory=list)  # the whole file: few-shot examples come from all of it
    pairs: list[PreferencePair] = field(default_factory=list)
    prompts: list[Prompt] = field(default_factory=list)
    compare_answers: list[dict] | None = None  # an answers file given as compare_with


def read_eval_data(spec: EvalSpec) -> EvalData:
    """Every evaluation file, read and validated (errors as file:line: field) and cut to `limit`."""
    data, limit = EvalData(), spec.limit
    if spec.perplexity_file:
        options = ReadOptions(text_separator=spec.text_separator)
        data.texts = read_records(spec.perplexity_file, ("text",), options, limit=limit).records
    if spec.mcq_file:
        data.mcq = read_records(spec.mcq_file, ("mcq",)).records
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
    return flat metrics; with `output_dir`, also write metrics.json, answers.jsonl and mcq.jsonl there."""
    spec.check()
    data = read_eval_data(spec)
    began = time.perf_counter()
    asks_model = bool(data.texts or data.mcq or data.prompts)  # a reward-accuracy-only run never loads it
    metrics, answers, mcq_rows = _policy_metrics(model, spec, data) if asks_model else ({}, [], [])
    compared = None  # the other side of the win rate: an answers file's rows, or the compared model's answers
    if spec.compare_with:
        compared = data.compare_answers or _answers_of(spec.compare_with, data.prompts, spec)
    if spec.reward_model:
        metrics.update(_judge(spec, data.pairs, answers, compared))
    metrics["eval_seconds"] = round(time.perf_counter() - began, 1)
    if output_dir is not None:
        _write_outputs(Path(output_dir), metrics, {ANSWERS_FILE: answers, MCQ_FILE: mcq_rows,
                                                   COMPARE_FILE: None if data.compare_answers else compared})
    return metrics


def _policy_metrics(model: str, spec: EvalSpec, data: EvalData) -> tuple[dict, list[dict], list[dict]]:
    """(metrics, open answers, MCQ rows): everything the evaluated model itself computes, loaded once."""
    engine = _load_engine(model, spec)
    metrics, answers, mcq_rows = {}, [], []
    if data.texts:
        logger.info("perplexity on %d held-out documents", len(data.texts))
        metrics.update(perplexity(engine.model, engine.tokenizer, data.texts, spec.max_length, spec.batch_size))
    if data.mcq:
        logger.info("multiple choice: %d questions, %d-shot", len(data.mcq[:spec.limit]), spec.few_shot)
        scores, mcq_rows = mcq_accuracy(engine.model, engine.chat_format, data.mcq, spec.limit, spec.few_shot,
                                        spec.max_length, spec.batch_size, spec.seed, spec.mcq_reply)
        metrics.update(scores)
    if data.prompts:
        logger.info("answering %d open questions (greedy, up to %d tokens)", len(data.prompts), spec.max_new_tokens)
        answers = generate_answers(engine, data.prompts, spec.max_new_tokens, spec.batch_size)
        metrics["open_n"] = len(answers)
    return metrics, answers, mcq_rows


def _load_engine(model: str, spec: EvalSpec):
    from medgpt.serve.engine import GenerationEngine

    _free_memory()  # the previous model, dropped by its caller, before the next one loads
    return GenerationEngine.load(model, template=spec.template, torch_dtype=spec.torch_dtype,
                                 trust_remote_code=spec.trust_remote_code)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _answers_of(model: str, prompts: list[Prompt], spec: EvalSpec) -> list[dict]:
    logger.info("answering the same %d questions with %s for the win rate", len(prompts), model)
    return generate_answers(_load_engine(model, spec), prompts, spec.max_new_tokens, spec.batch_size)


def _judge(spec: EvalSpec, pairs: list[PreferencePair], answers: list[dict], compared: list[dict] | None) -> dict:
    """Everything the reward model decides, with the reward model loaded once (answers get their `reward`)."""
    from medgpt.models.reward import RewardModelScorer

    _free_memory()
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
        result = reward_win_rate(answers, compared, scorer)
        metrics.update(win_rate=result["win_rate"], wins=result["wins"], losses=result["losses"],
                       ties=result["ties"], win_n=result["n"])
    return metrics


def _write_outputs(directory: Path, metrics: dict, files: dict[str, list[dict] | None]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    for name, rows in files.items():
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
    """A two-column table for the terminal."""
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
