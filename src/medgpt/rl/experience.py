"""One step's rollouts as tensors: [left-padded prompt | right-padded reply] rows, and minibatches cut from them
trimmed to their own longest prompt and reply (padding columns cost a forward and a backward each)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Experience:
    """One step's rollouts, all (B, R) over response positions unless noted."""

    batch: dict  # input_ids, attention_mask, position_ids: (B, P + R)
    responses: torch.Tensor  # token ids
    mask: torch.Tensor  # 1.0 on reply tokens that train (rows without any reward are all 0)
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None  # kept when the KL is a loss term (GRPO), else None
    values: torch.Tensor | None  # None without a critic
    advantages: torch.Tensor
    returns: torch.Tensor | None

    def minibatch(self, rows: torch.Tensor) -> "Experience":
        """`rows` of this experience, with the padding columns no row of them uses cut off."""
        batch = select(self.batch, rows)
        first, end, length = used_columns(batch["attention_mask"], self.responses.shape[1])
        batch = {key: value[:, first:end] for key, value in batch.items()}

        def cut(tensor):
            return None if tensor is None else tensor[rows][:, :length]

        return Experience(batch, cut(self.responses), cut(self.mask), cut(self.logprobs), cut(self.ref_logprobs),
                          cut(self.values), cut(self.advantages), cut(self.returns))


def used_columns(attention: torch.Tensor, response_width: int) -> tuple[int, int, int]:
    """(first column, end column, reply length) of the [prompt | reply] columns that some row attends to."""
    width = attention.shape[1] - response_width
    used = attention[:, :width].any(0).nonzero()
    first = int(used[0]) if len(used) else width
    length = max(int(attention[:, width:].sum(-1).max()), 1)  # the longest reply of these rows
    return first, width + length, length


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                  device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """[left-padded prompt | right-padded reply] rows; positions count real tokens only, as in generation."""
    width, length = max(len(p) for p in prompts), max(max(len(r) for r in responses), 1)
    ids = torch.full((len(prompts), width + length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        ids[row, width - len(prompt):width] = torch.tensor(prompt)
        ids[row, width:width + len(response)] = torch.tensor(response, dtype=torch.long)
        mask[row, width - len(prompt):width + len(response)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}
    return batch, ids[:, width:].to(device), mask[:, width:].float().to(device)


def select(batch: dict, rows) -> dict:
    return {key: value[rows] for key, value in batch.items()}


def trimmed(batch: dict, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A (sub)batch without the padding columns none of its rows uses, as (batch, tokens, mask)."""
    first, end, length = used_columns(batch["attention_mask"], tokens.shape[1])
    return {key: value[:, first:end] for key, value in batch.items()}, tokens[:, :length], mask[:, :length]
