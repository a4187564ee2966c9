"""Causal-LM loss that never materialises the full logits: only labelled positions, a chunk at a time.

The stock path computes `(B, T, vocab)` fp32 logits for every position, padding and prompt included (4 x 512 x
49,152 x 4 bytes = 400 MB a copy on the embedded model, several copies alive in the backward). Here the
hidden states of the positions that have a label are gathered first, then projected through the LM head in
chunks; each chunk is recomputed in the backward pass (activation checkpointing), so peak memory holds one
chunk of logits instead of all of them. The value equals the plain loss (a test pins it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from medgpt.data.processors import IGNORE
from medgpt.models.output_head import OutputHead


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, output: OutputHead) -> torch.Tensor:
    logits = output.logits(head(hidden).float())  # (n, V) for this chunk only, scaled/softcapped as the model does
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss(hidden_states: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module,
                    chunk_size: int = 1024, output: OutputHead | None = None,
                    num_items: int | torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions. Returns (loss, number of labelled tokens).

    hidden_states: (B, T, H) final hidden states; labels: (B, T) with IGNORE where no loss is taken; `output`: the
    model's steps after the head (`models/output_head.py`). `num_items` divides the summed loss instead of this
    batch's count (gradient accumulation across micro-batches must average over all of them, not average the
    averages). A batch with no labelled token (a 1-token last PT block, a fully truncated sample) gives a zero loss
    that still runs through the head and the model, so backward works and every parameter gets its (zero)
    gradient: DDP's all-reduce waits for every parameter, on every process.
    """
    output = output or OutputHead()
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != IGNORE
    selected = hidden_states[:, :-1][keep]  # (n, H): only positions that are trained on
    targets = targets[keep]
    count = int(targets.numel())
    total = hidden_states.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and hidden_states.requires_grad
    empty = count == 0 and grad
    if empty:  # one position, weighted 0: the graph reaches the head and the model, the loss stays 0
        selected = hidden_states.reshape(-1, hidden_states.shape[-1])[:1]
        targets = torch.zeros(1, dtype=torch.long, device=selected.device)
    calls = -(-len(targets) // chunk_size)
    if _sharded(head):
        # Each call of a ZeRO-3 (or resharding FSDP) head gathers its weight, in the forward and again when the
        # backward recomputes the chunk: every process must make as many calls, or the collectives mismatch.
        calls = _most_over_processes(calls, hidden_states.device)
    for index in range(calls):
        piece = (selected[index * chunk_size:(index + 1) * chunk_size],
                 targets[index * chunk_size:(index + 1) * chunk_size])  # empty past this process's own chunks
        if grad:
            total = total + checkpoint(_chunk_loss, *piece, head, output, use_reentrant=False)
        else:
            total = total + _chunk_loss(*piece, head, output)
    if empty:
        return total * 0.0, 0
    denominator = num_items if num_items is not None else count
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device).clamp(min=1)  # every micro-batch of the step may be empty
    else:
        denominator = max(denominator, 1)
    return total / denominator, count


def _sharded(head: torch.nn.Module) -> bool:
    """True when the head's weight is gathered on use: DeepSpeed ZeRO-3 partitions, FSDP2 DTensor shards."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.tensor import DTensor

    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in head.parameters())


def _most_over_processes(value: int, device: torch.device) -> int:
    import torch.distributed as dist

    wire = device if dist.get_backend() != "gloo" else torch.device("cpu")  # NCCL moves CUDA tensors only
    most = torch.tensor([value], device=wire)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())
