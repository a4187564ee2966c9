"""The pieces of PPO as small pure functions on (B, T) response tensors, each a few lines one can check by hand.

Shapes: B responses, T response positions (right-padded); `mask` is 1.0 on real response tokens and 0.0 on
padding. Position t of `values` is the critic's estimate before response token t is chosen; position t of
`logprobs` is log pi(token_t | prompt, tokens_<t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# ------------------------------------------------------------------------------------------------ statistics


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where mask is 1 (0 when there are none, rather than NaN)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions; `unbiased` applies Bessel's correction n / (n - 1)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


# ------------------------------------------------------------------------------------------------ rewards


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    k1 = log pi - log ref (unbiased, can be negative per token); k3 = (r - 1) - log r with r = ref / pi
    (unbiased, never negative, lower variance; Schulman's "Approximating KL divergence").
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{estimator}' (k1 or k3)")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL at every response token, plus the sequence score (B,) at its last
    real token (InstructGPT's shaping: the KL leash is paid as you go, the reward model pays at the end)."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # responses are right-padded
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores * (mask.sum(-1) > 0)
    return rewards


def clip_scores(scores: torch.Tensor, limit: float | None) -> torch.Tensor:
    return scores if limit is None else scores.clamp(-limit, limit)


@dataclass
class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel merge of batches),
    for reward normalisation that does not change meaning from batch to batch."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 1e-24

    def update(self, values: torch.Tensor) -> None:
        values = values.double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean, batch_var = values.mean().item(), values.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(self.var * self.count / max(self.count - 1, 1e-24)) if self.count > 1 else 1.0


def normalise_scores(scores: torch.Tensor, mode: str, running: RunningMoments | None = None) -> torch.Tensor:
    """none: as they are; batch: standardised within the batch; running: standardised with the running moments
    of all scores so far (updated with this batch first)."""
    if mode == "none":
        return scores
    if mode == "batch":
        return (scores - scores.mean()) / (scores.std() + 1e-8) if len(scores) > 1 else scores * 0
    if mode == "running":
        running.update(scores)
        return (scores - running.mean) / (running.std + 1e-8)
    raise ValueError(f"unknown reward normalisation '{mode}' (none, batch or running)")


# ------------------------------------------------------------------------------------------------ advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: A_t = sum_l (gamma lam)^l delta_{t+l},
    delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after each response's last token. Returns
    (advantages, returns = advantages + values), both 0 on padding."""
    values, rewards = values * mask, rewards * mask  # padding (after each response) is worth nothing
    advantages = torch.zeros_like(rewards)
    following = torch.zeros_like(rewards[:, 0])  # A_{t+1}; 0 past the end, so padding stays 0
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(following)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        following = delta + gamma * lam * following
        advantages[:, t] = following
    return advantages, (advantages + values) * mask


# ------------------------------------------------------------------------------------------------ losses


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = pi / pi_old.

    Also returns the fraction of tokens where clipping bit and the approximate KL(pi_old || pi) of the update,
    0.5 * mean((log r)^2), which tells whether the step size is sane.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
             "approx_kl": (0.5 * masked_mean(log_ratio ** 2, mask)).detach()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean(max((V - R)^2, (V_clip - R)^2)), V_clip = V_old + clip(V - V_old, +-eps):
    the critic may not move further than eps from its rollout-time estimate in one batch; eps None: plain
    0.5 * mean((V - R)^2). Returns (loss, fraction of tokens where the clipped term was the larger)."""
    unclipped_error = (values - returns) ** 2
    if cliprange_value is None:
        return 0.5 * masked_mean(unclipped_error, mask), torch.zeros((), device=values.device)
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    clipped_error = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask).detach()


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's KL term: the mean over tokens of k3 = (r - 1) - log r, r = ref / pi, with gradients through pi
    (k3 rather than k1: the gradient of k1 on the policy's own samples is zero in expectation)."""
    return masked_mean(kl_penalty(logprobs, ref_logprobs.detach(), "k3"), mask)


# ------------------------------------------------------------------------------------------------ KL control


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        return None

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): move the coefficient so the observed KL tracks `target`. The error is clipped to
    +-20% and scaled by n_steps / horizon, so the coefficient changes gently over about `horizon` samples."""

    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def kl_controller(kl_coef: float, target_kl: float | None, horizon: float):
    """Adaptive when a target KL is given, fixed otherwise."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)
