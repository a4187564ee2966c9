"""Evaluate a model: perplexity on held-out text, multiple-choice accuracy on the medical benchmarks as they are
published (MedQA, MedMCQA, PubMedQA, CMExam, CMB, MMLU, CMMLU) by likelihood or by generation, reward-model
accuracy on held-out pairs, greedy answers to open questions, and win rates judged by reward models or an
OpenAI-compatible endpoint — every accuracy and win rate with a 95% interval.

`medgpt eval` and the pipeline call `evaluate_model` (in `run`); the names below load on first use, so the light
parts (the answer-letter extractor in `choices`, the intervals) import without torch."""

from __future__ import annotations

import importlib

_EXPORTS = {"EvalSpec": "spec", "evaluate_model": "run", "format_metrics": "run", "reward_win_rate": "rewards"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"medgpt.evaluation.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'medgpt.evaluation' has no attribute {name!r}")
