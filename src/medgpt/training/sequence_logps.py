"""Per-token log-probabilities of the labelled (reply) tokens, a chunk of the LM head at a time, for the
preference stages: DPO and its family sum them per sequence, KTO per example, never building full logits.

TRL 1.16's trainers score through `add_fused_lm_head`, which on a CPU (no Triton) projects every position of the
padded batch through the head, prompt and padding included, and also computes entropy, mean logit and top-1 for
each (`trl/trainer/utils.py`, `compact = _use_triton(...)`). Here only the positions whose next token is a reply
token are gathered and projected, in chunks recomputed in the backward (as `training/loss.py` does for SFT);
the statistics TRL logs are computed once, in the forward, without gradient.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from medgpt.data.processors import IGNORE

STATISTICS = ("entropy", "mean_logit", "is_top1", "log_sum_sq")  # per token, no gradient


@dataclass
class TokenLogps(ModelOutput):
    """What a scoring forward returns. Every per-token tensor is (n,), one entry per labelled token, in row order.

    `sequence` says which sequence (0 … count-1, as numbered by the collator) each token belongs to; a ModelOutput
    so that DDP / DeepSpeed wrappers pass it back like any model output.
    """

    logps: torch.Tensor | None = None
    sequence: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def per_sequence(values: torch.Tensor, sequence: torch.Tensor, count: int) -> torch.Tensor:
    """Sum (n,) per-token values into (count,) per-sequence sums (differentiable; empty sequences give 0)."""
    return values.new_zeros(count, dtype=torch.float32).index_add(0, sequence, values.float())


def position_in_sequence(sequence: torch.Tensor, count: int) -> torch.Tensor:
    """(n,) 0-based index of each token within its sequence's labelled tokens (tokens of a sequence are contiguous)."""
    lengths = torch.bincount(sequence, minlength=count)
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(sequence.numel(), device=sequence.device) - starts[sequence]


def _chunk_logps(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, softcap: float | None,
                 statistics: dict | None, key: int, wanted: tuple[str, ...]) -> torch.Tensor:
    logits = head(hidden).float()  # (n, V) for this chunk only
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if statistics is not None and key not in statistics:  # the first (forward) call only, not the recomputation
        with torch.no_grad():
            statistics[key] = _statistics(logits, targets, wanted)
    return -F.cross_entropy(logits, targets, reduction="none")


def _statistics(logits: torch.Tensor, targets: torch.Tensor, wanted: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    log_norm = torch.logsumexp(logits, -1)
    if "entropy" in wanted:
        out["entropy"] = log_norm - (torch.softmax(logits, -1) * logits).sum(-1)
    if "mean_logit" in wanted:
        out["mean_logit"] = logits.mean(-1)
    if "is_top1" in wanted:
        out["is_top1"] = logits.argmax(-1) == targets
    if "log_sum_sq" in wanted:  # log Σ_v p_v², WPO's weight
        out["log_sum_sq"] = torch.logsumexp(2 * logits, -1) - 2 * log_norm
    return out


def token_logps(hidden_states: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor, head: torch.nn.Module,
                chunk_size: int = 1024, softcap: float | None = None, statistics: tuple[str, ...] = ()) -> TokenLogps:
    """log p(label) of every labelled next token. hidden_states (B, T, H); labels, sequence_ids (B, T).

    Position t predicts label t + 1 (labels are the input ids where trained, IGNORE elsewhere, as in SFT).
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    selected = hidden_states[:, :-1][keep]  # (n, H): only the positions that predict a reply token
    targets, sequence = targets[keep], sequence_ids[:, 1:][keep]
    saved: dict | None = {} if statistics else None
    pieces = []
    for key, start in enumerate(range(0, targets.numel(), chunk_size)):
        piece = (selected[start:start + chunk_size], targets[start:start + chunk_size], head, softcap, saved, key,
                 statistics)
        if torch.is_grad_enabled() and selected.requires_grad:
            pieces.append(checkpoint(_chunk_logps, *piece, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(*piece))
    logps = torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32) + selected.sum() * 0
    out = TokenLogps(logps=logps, sequence=sequence)
    for name in statistics:
        out[name] = torch.cat([saved[k][name] for k in range(len(pieces))]) if pieces else logps.detach()
    return out


def use_token_logps(model, chunk_size: int = 1024) -> None:
    """Make `model(..., labels=…, sequence_ids=…)` return `TokenLogps` — on this instance only, so peft, DDP and
    DeepSpeed wrappers around it all end up here. Any other call runs the forward it had.

    `token_statistics` (a tuple of STATISTICS names) asks for the no-gradient statistics; on a mixture-of-experts
    model `output_router_logits=True` adds the load-balancing loss as `aux_loss`. A bound method, so that a
    `copy.deepcopy` of the model (a frozen reference) scores with the copy's own weights.
    """
    if getattr(model, "_medgpt_token_logps", None) is not None:
        model._medgpt_token_logps = chunk_size
        return
    model._medgpt_forward_before_scoring = model.forward
    model._medgpt_token_logps = chunk_size
    model.forward = types.MethodType(_scoring_forward, model)


def _scoring_forward(self, *args, sequence_ids=None, token_statistics=(), **kwargs):
    if sequence_ids is None:
        return self._medgpt_forward_before_scoring(*args, **kwargs)
    labels = kwargs.pop("labels")
    for name in ("use_cache", "num_items_in_batch", "return_dict"):
        kwargs.pop(name, None)
    text_config = self.config.get_text_config()
    outputs = self.get_decoder()(*args, use_cache=False, **kwargs)
    # Looked up per call: peft may have wrapped the head (modules_to_save) after this patch.
    scores = token_logps(outputs.last_hidden_state, labels, sequence_ids, self.get_output_embeddings(),
                         self._medgpt_token_logps, getattr(text_config, "final_logit_softcapping", None),
                         tuple(token_statistics))
    if kwargs.get("output_router_logits"):
        scores["aux_loss"] = _load_balancing_loss(outputs.router_logits, text_config)
    return scores


def _load_balancing_loss(router_logits, text_config) -> torch.Tensor:
    # Mixtral's load-balancing loss is the one transformers' mixture-of-experts families share. Packed rows have
    # no padding, so every token counts (no attention mask).
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(router_logits, text_config.num_experts, text_config.num_experts_per_tok, None)
