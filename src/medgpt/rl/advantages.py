"""Advantage estimators of the one RL loop: GAE with a critic (PPO), and three critic-free ones that need
several replies per prompt or none: GRPO, RLOO and REINFORCE++.

Shapes: N = B replies (a prompt's `group_size` replies are consecutive rows), T response positions; `scores`
(N,) the shaped sequence scores, `kl` (N, T) the per-token KL estimate, `mask` (N, T) 1.0 on tokens that train;
`valid` (N,) False for replies no reward applied to (no advantage, left out of every group statistic).

| estimator      | advantage of each token of reply i                                  | KL to the reference     |
|----------------|---------------------------------------------------------------------|-------------------------|
| `gae`          | GAE(gamma, lam) of per-token rewards over the critic's values, whitened | per-token reward    |
| `grpo`         | (R_i - mean of its group) / (std of its group + 1e-4)                | loss term (k3)          |
| `rloo`         | R_i - mean of the other replies of its group                         | in R_i (sum over tokens)|
| `reinforce_pp` | return-to-go of the per-token rewards (discount gamma), whitened     | per-token reward        |

GRPO is Shao et al. 2024 (DeepSeekMath), RLOO Ahmadian et al. 2024, REINFORCE++ Hu 2025: the per-token KL
shaping of PPO without a critic, whitened over the whole (global) batch. Whitening statistics are taken over
every process, so N processes with B / N replies each compute what one process with B replies computes.
"""

from __future__ import annotations

import torch

from medgpt.rl import ppo_core as core
from medgpt.rl.distributed import global_sum

ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
CRITIC_ESTIMATORS = ("gae",)
GROUP_ESTIMATORS = ("grpo", "rloo")
GRPO_EPSILON = 1e-4  # TRL's and DeepSeekMath's guard for groups whose rewards are all alike


def global_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(values - mean) / std over the masked positions of every process (unbiased variance); padding stays 0."""
    sums = global_sum(torch.stack([(values * mask).sum(), (values ** 2 * mask).sum(), mask.sum()]).double())
    total, squares, count = sums.tolist()
    mean = total / max(count, 1.0)
    variance = max(squares / max(count, 1.0) - mean ** 2, 0.0) * (count / (count - 1) if count > 1 else 1.0)
    return (values - mean) * (variance + 1e-8) ** -0.5 * mask


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{k >= t} gamma^(k - t) r_k over each reply's real tokens; 0 on padding."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    following = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = rewards[:, t] + gamma * following
        returns[:, t] = following
    return returns * mask


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, group_size: int, estimator: str) -> torch.Tensor:
    """(N,) one advantage per reply from its group's other rewards; 0 for invalid replies and for groups with
    fewer than two valid replies (no baseline)."""
    r = rewards.double().view(-1, group_size)
    v = valid.double().view(-1, group_size)
    count = v.sum(1, keepdim=True)
    total = (r * v).sum(1, keepdim=True)
    if estimator == "grpo":
        mean = total / count.clamp(min=1)
        variance = (((r - mean) ** 2) * v).sum(1, keepdim=True) / (count - 1).clamp(min=1)
        advantages = (r - mean) / (variance.sqrt() + GRPO_EPSILON)
    elif estimator == "rloo":
        advantages = r - (total - r) / (count - 1).clamp(min=1)
    else:
        raise ValueError(f"'{estimator}' is not a group estimator ({', '.join(GROUP_ESTIMATORS)})")
    advantages = advantages * v * (count > 1)
    return advantages.view(-1).to(rewards.dtype)


def estimate(estimator: str, scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor,
             valid: torch.Tensor, values: torch.Tensor | None = None, gamma: float = 1.0, lam: float = 1.0,
             group_size: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages (N, T), returns (N, T) for the critic or None)."""
    if estimator == "gae":
        rewards = core.token_rewards(scores, kl, kl_coef, mask)
        advantages, returns = core.gae(rewards, values, mask, gamma, lam)
        return global_whiten(advantages, mask), returns
    if estimator == "reinforce_pp":
        rewards = core.token_rewards(scores, kl, kl_coef, mask)
        return global_whiten(returns_to_go(rewards, mask, gamma), mask), None
    if estimator in GROUP_ESTIMATORS:
        sequence = scores - (kl_coef * (kl * mask).sum(-1) if estimator == "rloo" else 0.0)
        return group_advantages(sequence, valid, group_size, estimator)[:, None] * mask, None
    raise ValueError(f"unknown advantage estimator '{estimator}' ({', '.join(ESTIMATORS)})")


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 = the critic predicts the returns,
    0 = no better than their mean, below 0 = worse."""
    variance = core.masked_var(returns, mask, unbiased=False)
    if variance.item() == 0:
        return float("nan")
    return 1.0 - (core.masked_var(returns - values, mask, unbiased=False) / variance).item()
