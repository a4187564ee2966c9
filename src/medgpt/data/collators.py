"""Batch features for causal-LM training: padding-free (flattened, one row) or padded to the longest sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medgpt.data.processors import IGNORE


def sample_lengths(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """For each token, the length of the sample (document) it belongs to; 0 on padding. Shape of input.

    Samples are found from position ids restarting at 0, so this works for packed rows and padded batches.
    """
    starts = position_ids == 0
    if attention_mask is not None:
        starts &= attention_mask.bool()
    segment = starts.long().cumsum(-1)  # (B, T): 1-based segment index per token
    lengths = torch.zeros_like(position_ids)
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(starts)
    for row in range(position_ids.shape[0]):
        ids = segment[row][valid[row]]
        counts = torch.bincount(ids)
        lengths[row][valid[row]] = counts[ids]
    return lengths


@dataclass
class PaddingFreeCollator:
    """Concatenate a batch into one row of `(1, total_tokens)` with per-sample position ids and no padding.

    transformers turns restarting position ids into a block-diagonal mask (SDPA/eager) or varlen boundaries
    (flash-attention), so samples never attend to each other. No attention_mask is passed on purpose: its
    absence is what makes transformers derive the packed mask from position_ids.
    """

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for f in features:
            ids += f["input_ids"]
            positions += f["position_ids"]
            # never predict a sample's first token from the previous sample
            labels += [IGNORE] + list(f["labels"][1:])
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
        }


@dataclass
class PaddedCollator:
    """Pad to the longest sample of the batch (right padding); padding is masked out by attention_mask."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
        for f in features:
            n, pad = len(f["input_ids"]), width - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE] * pad)
            batch["position_ids"].append(list(f["position_ids"]) + [0] * pad)
            batch["attention_mask"].append([1] * n + [0] * pad)
        return {k: torch.tensor(v) for k, v in batch.items()}
