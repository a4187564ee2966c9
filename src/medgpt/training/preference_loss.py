"""The DPO family's losses as small pure functions of per-sequence log-probabilities: TRL's reference-based loss
types (sigmoid = DPO, IPO, hinge, robust, …) and the reference-free SimPO and ORPO.

TRL 1.16 writes its loss types inline in `DPOTrainer._compute_loss`, on the log-probabilities of its fused LM head
(which on CPU scores every padded position); they are restated here, formula for formula, so that our packed,
chunked path can use them (tests/test_dpo.py checks each against TRL's trainer on the same pairs). SimPO and ORPO
exist in TRL only as experimental trainers that tokenise on their own and build full logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Per-pair (B,) tensors: the policy's and the reference's summed reply log-probs and the reply lengths."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected


@dataclass
class DPOSettings:
    """The DPOConfig values the losses read."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    discopop_tau: float = 0.05


def divergence_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f'(π/π_ref) of f-DPO (Wang et al. 2023): log-ratios for reverse KL (plain DPO), else the f-divergence's."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        t = torch.clamp((alpha - 1.0) * logratios.float(), max=80.0)  # exp stays finite
        return (torch.exp(t) - 1.0).to(logratios.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type '{kind}'")


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def _per_token_delta(p: PairLogps, s: DPOSettings) -> torch.Tensor:
    """Δ of the scores per reply token (IPO, sigmoid_norm): length-normalised so β compares across lengths."""
    chosen = divergence_scores(p.chosen_logratios, s.f_divergence_type, s.f_alpha_divergence_coef)
    rejected = divergence_scores(p.rejected_logratios, s.f_divergence_type, s.f_alpha_divergence_coef)
    return chosen / p.chosen_tokens.clamp(min=1) - rejected / p.rejected_tokens.clamp(min=1)


def _delta(p: PairLogps, s: DPOSettings) -> torch.Tensor:
    kind, alpha = s.f_divergence_type, s.f_alpha_divergence_coef
    return divergence_scores(p.chosen_logratios, kind, alpha) - divergence_scores(p.rejected_logratios, kind, alpha)


def _exo_pair(p: PairLogps, s: DPOSettings) -> torch.Tensor:
    # EXO-pref (Ji et al. 2024, Eq. 16): KL between the policy's and the labels' (1-ε, ε) preference distributions.
    z, eps = s.beta * _delta(p, s), torch.tensor(s.label_smoothing, device=p.chosen.device)
    return torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps)) + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(eps))


def _robust(p: PairLogps, s: DPOSettings) -> torch.Tensor:
    z, eps = s.beta * _delta(p, s), s.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _aot(p: PairLogps, s: DPOSettings) -> torch.Tensor:
    # Alignment via optimal transport (Melnyk et al. 2024): compare the sorted margins of the batch.
    ratios, _ = torch.sort(p.chosen - p.rejected, dim=0)
    ref_ratios, _ = torch.sort(p.ref_chosen - p.ref_rejected, dim=0)
    return _smoothed(s.beta * (ratios - ref_ratios), s.label_smoothing)


def _aot_unpaired(p: PairLogps, s: DPOSettings) -> torch.Tensor:
    chosen, _ = torch.sort(p.chosen_logratios, dim=0)
    rejected, _ = torch.sort(p.rejected_logratios, dim=0)
    return _smoothed(s.beta * (chosen - rejected), s.label_smoothing)


def _discopop(p: PairLogps, s: DPOSettings) -> torch.Tensor:
    # DiscoPOP (Chris Lu et al. 2024, Eq. 5): a logistic / exponential blend modulated by the margin itself.
    z = s.beta * _delta(p, s)
    blend = torch.sigmoid(z / s.discopop_tau)
    return -F.logsigmoid(z) * (1 - blend) + torch.exp(-z) * blend


def _sft(p: PairLogps, s: DPOSettings) -> torch.Tensor:
    # The chosen replies' mean token NLL over the whole batch, as a (B,) tensor so weights mix it like the others.
    return (-p.chosen.sum() / p.chosen_tokens.sum().clamp(min=1)).expand(p.chosen.shape[0])


DPO_LOSSES: dict[str, Callable[[PairLogps, DPOSettings], torch.Tensor]] = {
    "sigmoid": lambda p, s: -F.logsigmoid(s.beta * _delta(p, s)),
    "hinge": lambda p, s: torch.relu(1 - s.beta * _delta(p, s)),
    # IPO (Azar et al. 2023, Eq. 17) on per-token log-ratios, as TRL (agreed with the IPO authors); β is τ.
    "ipo": lambda p, s: (_per_token_delta(p, s) - 1 / (2 * s.beta)) ** 2,
    "exo_pair": _exo_pair,
    "nca_pair": lambda p, s: (-F.logsigmoid(s.beta * p.chosen_logratios) - 0.5 * F.logsigmoid(-s.beta * p.chosen_logratios)
                              - 0.5 * F.logsigmoid(-s.beta * p.rejected_logratios)),
    "robust": _robust,
    "bco_pair": lambda p, s: -F.logsigmoid(s.beta * p.chosen_logratios) - F.logsigmoid(-s.beta * p.rejected_logratios),
    # SPPO with hard probabilities (Wu et al. 2024, Eq. 4.7 with P = 1 for the winner, 0 for the loser).
    "sppo_hard": lambda p, s: (p.chosen_logratios - 0.5 / s.beta) ** 2 + (p.rejected_logratios + 0.5 / s.beta) ** 2,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    # APO (D'Oosterlinck et al. 2024, Eqs. 7 and 8): zero raises chosen and lowers rejected; down lowers both.
    "apo_zero": lambda p, s: (1 - torch.sigmoid(s.beta * p.chosen_logratios)) + torch.sigmoid(s.beta * p.rejected_logratios),
    "apo_down": lambda p, s: (torch.sigmoid(s.beta * p.chosen_logratios)
                              + 1 - torch.sigmoid(s.beta * (p.chosen_logratios - p.rejected_logratios))),
    "discopop": _discopop,
    "sft": _sft,
    "sigmoid_norm": lambda p, s: -F.logsigmoid(s.beta * _per_token_delta(p, s)),
}
# The loss types f-DPO's reparameterisation holds for (the others need β·log Z(x) to cancel): TRL refuses the rest.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def dpo_loss(loss_types: list[str], weights: list[float], pairs: PairLogps, settings: DPOSettings,
             pair_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_k weight_k · mean over pairs of loss_k; `pair_weights` (B,) scale every pair's loss (WPO)."""
    total = pairs.chosen.new_zeros(())
    for loss_type, weight in zip(loss_types, weights, strict=True):
        per_pair = DPO_LOSSES[loss_type](pairs, settings)
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        total = total + per_pair.mean() * weight
    return total


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
