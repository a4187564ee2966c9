"""Reward-model judgements: accuracy on held-out preference pairs, the mean reward of generated answers, and
the win rate of one model's answers over another's on the same questions. All scores come from
`RewardModelScorer`, so they are exactly what `medgpt score` and the RL stages see."""

from __future__ import annotations

import logging
from pathlib import Path

from medgpt.data.records import Message, PreferencePair
from medgpt.evaluation.answers import answer_rows, match_by_question, prompt_messages
from medgpt.evaluation.intervals import wilson
from medgpt.evaluation.judges import summary
from medgpt.models.reward import RewardModelScorer

logger = logging.getLogger(__name__)


def reward_accuracy(scorer: RewardModelScorer, pairs: list[PreferencePair]) -> dict:
    """Share of pairs whose chosen reply scores strictly above the rejected one (chance: 0.5)."""
    chosen, rejected = scorer.score_pairs(pairs)
    margins = [c - r for c, r in zip(chosen, rejected)]
    right = sum(m > 0 for m in margins)
    return {"reward_accuracy": right / len(pairs), "reward_accuracy_ci": wilson(right, len(pairs)),
            "reward_margin": sum(margins) / len(pairs), "reward_n": len(pairs)}


def score_answers(scorer: RewardModelScorer, rows: list[dict], prompts: list[dict] | None = None) -> list[float]:
    """The reward of each row's answer to its prompt (`prompts[i]`'s conversation when given, else its own)."""
    prompts = prompts or rows
    conversations = [prompt_messages(p) + [Message("assistant", r["answer"])] for p, r in zip(prompts, rows)]
    return scorer.score(conversations, [p.get("tools") for p in prompts])


def reward_outcomes(scorer: RewardModelScorer, rows_a: list[dict], rows_b: list[dict]) -> list[float]:
    """Per matched question: 1 when A's answer scores above B's, 0 below, 0.5 for identical answers or equal
    rewards. Both answers are scored against A's prompt, so a system prompt on one side does not decide."""
    rewards = score_answers(scorer, rows_a + rows_b, rows_a + rows_a)
    outcomes = []
    for a, b, reward_a, reward_b in zip(rows_a, rows_b, rewards[: len(rows_a)], rewards[len(rows_a):]):
        if a["answer"].strip() == b["answer"].strip() or reward_a == reward_b:
            outcomes.append(0.5)
        else:
            outcomes.append(1.0 if reward_a > reward_b else 0.0)
    return outcomes


def matched_answers(answers_a: Path | str | list, answers_b: Path | str | list) -> tuple[list[dict], list[dict]]:
    """The rows of two answer sets on the questions both answered (the rest are left out, and logged)."""
    a, b = answer_rows(answers_a), answer_rows(answers_b)
    pairs = match_by_question(a, b)
    if len(pairs) < max(len(a), len(b)):
        logger.warning("win rate over the %d questions both sides answered (A has %d, B has %d)",
                       len(pairs), len(a), len(b))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def reward_win_rate(answers_a: Path | str | list, answers_b: Path | str | list,
                    reward_model: str | RewardModelScorer, batch_size: int = 8, max_length: int | None = None,
                    torch_dtype: str = "auto", seed: int = 0) -> dict:
    """Win rate of A over B on the questions both answered, judged by the reward model (a directory, or a
    scorer already loaded), with its interval (`medgpt.evaluation.judges.summary`). Answers are files written by
    `evaluate_model` (or `medgpt predict`) or their rows; questions only one side answered are left out."""
    rows_a, rows_b = matched_answers(answers_a, answers_b)
    name = str(reward_model) if not isinstance(reward_model, RewardModelScorer) else "reward model"
    if not isinstance(reward_model, RewardModelScorer):
        reward_model = RewardModelScorer.load(reward_model, torch_dtype=torch_dtype, batch_size=batch_size,
                                              max_length=max_length)
    return summary(reward_outcomes(reward_model, rows_a, rows_b), name, seed)
