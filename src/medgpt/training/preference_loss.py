"""Reference-free preference losses (SimPO, ORPO) as small pure functions of per-sequence log-probabilities.

TRL 1.16 has them only in `trl.experimental` (CPOTrainer, ORPOTrainer): trainers of their own that tokenise text
themselves (no pre-tokenised input, prompt truncation of their own), materialise the full (tokens x vocabulary)
logits, and — ORPO — put the prompt tokens into the SFT term. These functions run inside our DPOTrainer subclass
on the log-probabilities its fused LM head already computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024, Eq. 6), per pair: -log σ(β·(mean log p(y_w) - mean log p(y_l)) - γ).

    Length-normalised (mean over reply tokens) and reference-free; γ is a target reward margin. With
    `label_smoothing` ε, the conservative form (1-ε)·ℓ(z) + ε·ℓ(-z), as in TRL's CPO.
    """
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-7)  # a reply of probability 1 has odds ∞; keep the value finite
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """log odds(y_w|x) - log odds(y_l|x), with odds(y|x) = P/(1-P) and P the mean per-token probability."""
    return (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))


def orpo_loss(chosen_nll: torch.Tensor, chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, Eq. 6): L_SFT - β·log σ(log odds ratio), averaged over the batch.

    `chosen_nll` is the SFT term: the mean negative log-likelihood of the chosen replies' tokens (replies only,
    as in the paper). Returns (loss, per-pair log odds ratio).
    """
    log_odds = orpo_log_odds(chosen_avg_logps, rejected_avg_logps)
    return chosen_nll - beta * F.logsigmoid(log_odds).mean(), log_odds
