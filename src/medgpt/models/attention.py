"""Attention for padding-free packed rows: scaled-dot-product attention run once per document.

transformers turns restarting `position_ids` into one block-diagonal mask over the whole packed row. That is
correct but wasteful: PyTorch's SDPA cannot use its fused causal kernels with an arbitrary mask, computes the
full (T, T) score matrix of which most is masked out, and on CUDA falls back from the flash kernel. Splitting
the row at the document starts and calling SDPA with `is_causal=True` on each document computes only the
blocks on the diagonal, with the fastest kernel, and gives the same result (tests/test_packing.py).

Registered under the name `sdpa_packed` in transformers' attention and mask registries; the trainer switches a
model from `sdpa` to it while it trains on packed rows. Anything that is not a packed row (padded batches,
generation with a cache, attention softcapping) goes to the stock SDPA path unchanged; sliding windows apply per
document. On CUDA with flash-attn installed the trainer uses flash-attention's varlen kernel instead
(`flash_packed_kwargs`: the document boundaries computed once per batch, not in every layer).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from medgpt.models.lean import Recompute

PACKED_SDPA = "sdpa_packed"


_last_row: tuple = (None, -1, None)  # (weak reference to position_ids, its version, its document starts)


def document_starts(position_ids: torch.Tensor | None) -> list[int] | None:
    """Offsets where documents start in a single packed row, or None when the input is not such a row.

    Reading them needs the values on the host (a device sync on GPUs); every layer of one forward gets the same
    `position_ids` tensor, so the answer for the last tensor seen is kept and the sync happens once per batch.
    """
    global _last_row
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    version = -1 if position_ids.is_inference() else position_ids._version  # inference tensors have none
    ref, seen_version, starts = _last_row
    if ref is not None and ref() is position_ids and seen_version == version:
        return starts
    starts = _row_starts(position_ids[0])
    _last_row = (weakref.ref(position_ids), version, starts)
    return starts


def _row_starts(row: torch.Tensor) -> list[int] | None:
    if row.numel() < 2 or int(row[0]) != 0:
        return None
    starts = (row == 0).nonzero().flatten().tolist()
    return starts if len(starts) > 1 else None


def _window_mask(length: int, window: int, device) -> torch.Tensor:
    """(length, length) boolean mask: causal, and a query sees only the `window` newest keys (itself included),
    transformers' sliding-window rule `kv > q - window`."""
    q = torch.arange(length, device=device)[:, None]
    kv = torch.arange(length, device=device)[None, :]
    return (kv <= q) & (kv > q - window)


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention-function signature: (B, heads, T, d) in, ((B, T, heads, d), None) out.

    A sliding window (Mistral, Mixtral, Phi-3, Starcoder2 pass `sliding_window`) applies inside each document: a
    document no longer than the window is plain causal attention, a longer one gets the window mask.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    starts = document_starts(kwargs.get("position_ids"))
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    plain = starts is None or query.shape[2] != key.shape[2] or kwargs.get("softcap") is not None
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    bounds = [*starts, query.shape[2]]
    dropout = dropout if module.training else 0.0
    pieces = []
    with Recompute() as saved:  # SDPA keeps its inputs: keep the unexpanded keys and values, expand again
        for a, b in zip(bounds, bounds[1:]):
            keys, values = key[:, :, a:b], value[:, :, a:b]
            if groups > 1:  # enable_gqa is slow on CPU: expand explicitly, one document at a time
                keys = saved.derive(repeat_kv(keys, groups), repeat_kv, keys, groups)
                values = saved.derive(repeat_kv(values, groups), repeat_kv, values, groups)
            if window and b - a > window:
                mask = _window_mask(b - a, int(window), query.device)
                pieces.append(F.scaled_dot_product_attention(query[:, :, a:b], keys, values, attn_mask=mask,
                                                             dropout_p=dropout, scale=scaling))
            else:
                pieces.append(F.scaled_dot_product_attention(query[:, :, a:b], keys, values, dropout_p=dropout,
                                                             scale=scaling, is_causal=True))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def register_packed_attention() -> str:
    """Make `sdpa_packed` known to transformers (idempotent); its masks are SDPA's, for the fallback path."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def set_attention(model, name: str) -> str:
    """Switch the attention of a (possibly peft-wrapped) model; returns the previous name."""
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    previous = config._attn_implementation
    for module in model.modules():  # the top model and any sub-model config (e.g. text_config) follow
        sub = getattr(module, "config", None)
        if sub is not None and getattr(sub, "_attn_implementation", None) == previous:
            sub._attn_implementation = name
    return previous


def flash_packed_kwargs(position_ids: torch.Tensor | None) -> dict:
    """The varlen arguments flash-attention takes for a packed row (cumulative document lengths, longest one), from
    `position_ids` once per batch; transformers would derive them again in every layer, each time with a sync."""
    starts = document_starts(position_ids)
    if starts is None:
        return {}
    total = position_ids.shape[1]
    bounds = [*starts, total]
    cumulative = torch.tensor(bounds, dtype=torch.int32, device=position_ids.device)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    return {"cu_seq_lens_q": cumulative, "cu_seq_lens_k": cumulative, "max_length_q": longest, "max_length_k": longest}
