"""Log-probabilities and entropy of sampled tokens straight from hidden states, a chunk of the LM head at a time.

The stock path (`model(...).logits`) makes (B, R, V) fp32 logits for every response position, padding included,
and autograd keeps them (and the softmax) for the backward pass: 8 x 512 x 151,936 x 4 bytes = 2.5 GB a copy
for Qwen at PPO's usual shapes. Here only the real reply tokens' hidden states (n, H) are projected, `chunk_size`
positions at a time; under gradients each chunk runs under activation checkpointing, so the backward recomputes
that chunk's logits instead of keeping them. What is kept: (n,) log-probs and entropies, and the (n, H) inputs.

The logits are the model's own: divided by the sampling temperature, after the architecture's final
transformation (Gemma's soft-capping, Cohere's `logit_scale`, Granite's `logits_scaling`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_SIZE = 256  # positions per LM-head chunk: 256 x 151,936 x 4 bytes = 156 MB of logits at a time


@dataclass(frozen=True)
class LogitTransform:
    """What turns `lm_head(h)` into the distribution sampled from: the model's final scaling, then temperature."""

    temperature: float = 1.0
    softcap: float | None = None  # Gemma 2/3: tanh(z / cap) * cap
    multiply: float = 1.0  # Cohere: logit_scale
    divide: float = 1.0  # Granite: logits_scaling

    @classmethod
    def of(cls, config, temperature: float) -> "LogitTransform":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(temperature=temperature, softcap=getattr(text, "final_logit_softcapping", None),
                   multiply=float(getattr(text, "logit_scale", None) or 1.0),
                   divide=float(getattr(text, "logits_scaling", None) or 1.0))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits  # at least fp32
        if self.multiply != 1.0:
            logits = logits * self.multiply
        if self.divide != 1.0:
            logits = logits / self.divide
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits / self.temperature


ENTROPY_MODES = ("none", "value", "grad")  # not computed | computed without gradient | trained (entropy bonus)


def _chunk(hidden: torch.Tensor, tokens: torch.Tensor, head: torch.nn.Module, transform: LogitTransform,
           entropy: str) -> tuple[torch.Tensor, torch.Tensor]:
    logits = transform(head(hidden))  # (n, V), this chunk only
    normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - normaliser
    if entropy == "none":
        return logprobs, torch.zeros_like(logprobs).detach()
    if entropy == "value":
        logits, normaliser = logits.detach(), normaliser.detach()
    return logprobs, normaliser - (logits.softmax(-1) * logits).sum(-1)


def token_stats(hidden: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, head: torch.nn.Module,
                transform: LogitTransform, entropy: str = "value",
                chunk_size: int = CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(token_t), entropy_t), both (B, R) fp32 and 0 on padding (entropy 0 everywhere when "none").

    hidden: (B, R, H) the hidden state before each response token (position t predicts token t); tokens and mask:
    (B, R). `entropy`: one of ENTROPY_MODES; "grad" only when an entropy bonus is trained.
    """
    if entropy not in ENTROPY_MODES:
        raise ValueError(f"entropy '{entropy}' is not one of {', '.join(ENTROPY_MODES)}")
    keep = mask.bool()
    selected, targets = hidden[keep], tokens[keep]  # (n, H), (n,)
    logprobs, entropies = [], []
    for start in range(0, len(targets), chunk_size):
        piece = (selected[start:start + chunk_size], targets[start:start + chunk_size])
        if torch.is_grad_enabled() and selected.requires_grad:
            lp, ent = checkpoint(_chunk, *piece, head, transform, entropy, use_reentrant=False)
        else:
            lp, ent = _chunk(*piece, head, transform, entropy)
        logprobs.append(lp)
        entropies.append(ent)
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    full_lp = hidden.new_zeros(mask.shape, dtype=dtype)
    full_ent = hidden.new_zeros(mask.shape, dtype=dtype)
    if logprobs:
        full_lp = full_lp.masked_scatter(keep, torch.cat(logprobs))
        full_ent = full_ent.masked_scatter(keep, torch.cat(entropies))
    return full_lp, full_ent
