"""Attention for padding-free packed rows: scaled-dot-product attention run once per document.

transformers turns restarting `position_ids` into one block-diagonal mask over the whole packed row. That is
correct but wasteful: PyTorch's SDPA cannot use its fused causal kernels with an arbitrary mask, computes the
full (T, T) score matrix of which most is masked out, and on CUDA falls back from the flash kernel. Splitting
the row at the document starts and calling SDPA with `is_causal=True` on each document computes only the
blocks on the diagonal, with the fastest kernel, and gives the same result (tests/test_packing.py).

Registered under the name `sdpa_packed` in transformers' attention and mask registries; the trainer switches a
model from `sdpa` to it while it trains on packed rows. Anything that is not a packed row (padded batches,
generation with a cache, sliding-window models) goes to the stock SDPA path unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medgpt.models.lean import Recompute

PACKED_SDPA = "sdpa_packed"


def document_starts(position_ids: torch.Tensor | None) -> list[int] | None:
    """Offsets where documents start in a single packed row, or None when the input is not such a row."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    row = position_ids[0]
    if row.numel() < 2 or int(row[0]) != 0:
        return None
    starts = (row == 0).nonzero().flatten().tolist()
    return starts if len(starts) > 1 else None


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention-function signature: (B, heads, T, d) in, ((B, T, heads, d), None) out."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    starts = document_starts(kwargs.get("position_ids"))
    plain = (starts is None or query.shape[2] != key.shape[2] or getattr(module, "sliding_window", None)
             or kwargs.get("softcap") is not None)
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
