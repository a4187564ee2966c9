"""Batch features for causal-LM training: padding-free (flattened, one row) or padded to the longest sample;
for the preference stages, their sequences (chosen and rejected, examples and their KL pairs) the same way."""

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


# ------------------------------------------------------------------------------------------------ preference


def pack_sequences(sequences: list[tuple[list[int], list[int]]], pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """(context, reply) token lists -> model inputs that label the reply tokens and number the sequences.

    `pad_token_id` None: one padding-free row `(1, T)`, position ids restarting at every sequence (so sequences
    attend only to themselves, see `PaddingFreeCollator`), no attention mask. Otherwise one right-padded row per
    sequence `(S, W)` with an attention mask. Either way:
    - `labels`: the reply tokens' ids, IGNORE elsewhere (context, padding, each sequence's first token);
    - `sequence_ids`: for every position the index (0 … S-1, the order given) of the sequence it belongs to;
    - `sequence_ends`: (S,) the flat index (into the `B * T` positions) of each sequence's last token.
    """
    ids, labels, positions, owner, ends = [], [], [], [], []
    width = max(len(c) + len(r) for c, r in sequences)
    for index, (context, reply) in enumerate(sequences):
        tokens = list(context) + list(reply)
        row_labels = [IGNORE] * len(context) + list(reply)
        row_labels[0] = IGNORE  # never predicted from the previous sequence
        if pad_token_id is not None:
            pad = width - len(tokens)
            ends.append(index * width + len(tokens) - 1)
            ids.append(tokens + [pad_token_id] * pad)
            labels.append(row_labels + [IGNORE] * pad)
            positions.append(list(range(len(tokens))) + [0] * pad)
            owner.append([index] * width)
        else:
            ids += tokens
            labels += row_labels
            positions += range(len(tokens))
            owner += [index] * len(tokens)
            ends.append(len(ids) - 1)
    if pad_token_id is None:
        ids, labels, positions, owner = [ids], [labels], [positions], [owner]
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions),
             "sequence_ids": torch.tensor(owner), "sequence_ends": torch.tensor(ends)}
    if pad_token_id is not None:
        lengths = torch.tensor([len(c) + len(r) for c, r in sequences])
        batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return batch


def _copy_floats(features: list[dict], batch: dict, keys: tuple[str, ...]) -> dict:
    """Per-example numbers the collated batch carries as they are (precomputed reference log-probs)."""
    for key in keys:
        if key in features[0]:
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
    return batch


@dataclass
class PreferencePairCollator:
    """DPO-family pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`) -> the B chosen sequences, then the B rejected
    ones (sequences 0 … B-1 and B … 2B-1), each prompt + reply, packed into one row (`packing`) or padded."""

    pad_token_id: int
    packing: bool = True

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [(f["prompt_ids"], f["chosen_ids"]) for f in features]
        sequences += [(f["prompt_ids"], f["rejected_ids"]) for f in features]
        batch = pack_sequences(sequences, None if self.packing else self.pad_token_id)
        return _copy_floats(features, batch, ("ref_chosen_logps", "ref_rejected_logps"))


@dataclass
class CompletionCollator:
    """KTO examples (`prompt_ids`, `completion_ids`, `label`, and `KL_completion_ids`: the neighbour's completion)
    -> the examples, and (keys prefixed `KL_`) the mismatched pairs, each group packed into one row or padded."""

    pad_token_id: int
    packing: bool = True

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pad = None if self.packing else self.pad_token_id
        batch = pack_sequences([(f["prompt_ids"], f["completion_ids"]) for f in features], pad)
        if "KL_completion_ids" in features[0]:
            mismatched = pack_sequences([(f["prompt_ids"], f["KL_completion_ids"]) for f in features], pad)
            batch.update({"KL_" + k: v for k, v in mismatched.items()})
        batch["label"] = torch.tensor([bool(f["label"]) for f in features])
        return _copy_floats(features, batch, ("ref_logps", "ref_KL_logps"))


@dataclass
class RewardPairCollator:
    """Reward-model pairs (`input_ids_chosen`, `input_ids_rejected`: prompt + reply) -> the B chosen sequences,
    then the B rejected ones, packed into one row or padded; the reward is read at `sequence_ends`."""

    pad_token_id: int
    packing: bool = True

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [(f["input_ids_chosen"], []) for f in features] + [(f["input_ids_rejected"], []) for f in features]
        batch = pack_sequences(sequences, None if self.packing else self.pad_token_id)
        del batch["labels"]  # nothing is predicted: one score per sequence
        return batch
