"""Rewards of one batch of replies: each reward function's values (None = does not apply), their weighted sum,
normalised over every process, clipped, and penalised for replies cut off at `max_new_tokens`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from medgpt.rl import ppo_core as core
from medgpt.rl.distributed import gather, rank
from medgpt.rl.prompts import Prompt
from medgpt.rl.trl_prompts import encode_conversation


@dataclass
class Replies:
    """One batch of rollouts as the rewards see them (row i answers prompts[i])."""

    prompts: list[Prompt]
    prompt_ids: list[list[int]]  # what the policy was given (its template, truncated to max_prompt_length)
    ids: list[list[int]]  # the sampled tokens, through the end-of-turn token when the reply ended
    texts: list[str]  # decoded, special tokens dropped, stripped


def rule_reward(fn: Callable) -> Callable[[Replies], list]:
    """A function with TRL's signature f(prompts, completions, completion_ids, **columns) as a reward of Replies."""
    def call(replies: Replies) -> list:
        prompts = replies.prompts
        return fn(prompts=[p.to_openai() for p in prompts], completions=replies.texts, completion_ids=replies.ids,
                  reference=[p.reference for p in prompts], reference_kind=[p.reference_kind for p in prompts],
                  conversation=[encode_conversation(p.messages, p.tools) for p in prompts])
    return call


@dataclass
class RewardFunction:
    """A named, weighted reward: Replies -> one float (or None: does not apply) per reply."""

    name: str
    weight: float
    fn: Callable[[Replies], list]

    def __call__(self, replies: Replies) -> torch.Tensor:
        """(N,) float64, NaN where the function does not apply."""
        values = self.fn(replies)
        if len(values) != len(replies.ids):
            raise ValueError(f"reward {self.name} returned {len(values)} values for {len(replies.ids)} replies")
        return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)


def combine(rewards: list[RewardFunction], replies: Replies) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(weighted sum (N,), valid (N,): some function applies, {reward_<name>: mean where it applies})."""
    total = torch.zeros(len(replies.ids), dtype=torch.float64)
    valid = torch.zeros(len(replies.ids), dtype=torch.bool)
    parts = {}
    for reward in rewards:
        values = reward(replies)
        applies = ~values.isnan()
        if applies.any():
            parts[f"reward_{reward.name}"] = values[applies].mean().item()
        total += reward.weight * values.nan_to_num(0.0)
        valid |= applies
    return total, valid, parts


def shape_scores(raw: torch.Tensor, valid: torch.Tensor, ended: torch.Tensor, ppo,
                 moments: core.RunningMoments) -> torch.Tensor:
    """This process's scores after normalisation over every process's valid replies, clipping and the
    missing-EOS penalty; 0 for invalid replies."""
    everyone, everyone_valid = gather(raw), gather(valid)
    normalised = torch.zeros_like(everyone)
    if everyone_valid.any():
        normalised[everyone_valid] = core.normalise_scores(everyone[everyone_valid], ppo.reward_normalization, moments)
    mine = core.clip_scores(normalised, ppo.reward_clip)[rank() * len(raw):(rank() + 1) * len(raw)]
    if ppo.missing_eos_penalty is not None:
        mine = mine - ppo.missing_eos_penalty * (1 - ended)
    return mine * valid
