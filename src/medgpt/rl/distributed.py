"""Data parallel without DDP wrappers: PPO runs several forward/backward passes per step over different
adapters of one model, which DDP's one-forward-one-backward bookkeeping does not fit; instead gradients are
averaged explicitly before each optimizer step (one flat all-reduce), and small numbers are reduced or gathered
for normalisation and logs. Parameters sharded by FSDP2 (DTensors) are left to FSDP2, which reduce-scatters
their gradients in the backward pass; the helpers here handle both kinds. With one process they are no-ops."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    """NCCL moves only CUDA tensors, gloo any: where a tensor must be to be sent."""
    if dist.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a float tensor over all processes."""
    if world_size() == 1:
        return values.detach().double()
    total = _wire(values.detach().double().clone())
    dist.all_reduce(total)
    return (total / world_size()).to(values.device)


def global_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a tensor over all processes (a copy; the input is not changed)."""
    if world_size() == 1:
        return values.detach().clone()
    total = _wire(values.detach().clone())
    dist.all_reduce(total)
    return total.to(values.device)


def gather(values: torch.Tensor) -> torch.Tensor:
    """The (N,) tensors of all processes, concatenated in rank order."""
    if world_size() == 1:
        return values
    sent = _wire(values.contiguous())
    parts = [torch.empty_like(sent) for _ in range(world_size())]
    dist.all_gather(parts, sent)
    return torch.cat(parts).to(values.device)


def _flat_apply(tensors: list[torch.Tensor], operation) -> None:
    flat = torch.cat([t.detach().flatten() for t in tensors])
    operation(flat)
    offset = 0
    for tensor in tensors:
        tensor.data.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor, or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def _replicated(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if not is_sharded(p)]


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of replicated parameters over processes (sharded ones are FSDP2's)."""
    params = _replicated(params)
    if world_size() > 1 and params:
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        _flat_apply([p.grad for p in params], lambda flat: (dist.all_reduce(flat), flat.div_(world_size())))


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so their global L2 norm is at most `max_norm`; sharded and replicated alike."""
    squares = torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in params if p.grad is not None]
    for grad in grads:
        square = grad.detach().double().pow(2).sum()
        squares = squares + (square.full_tensor() if is_sharded(square) else square).cpu()
    norm = squares.sqrt().item()
    if norm > max_norm:
        for grad in grads:
            grad.mul_(max_norm / (norm + 1e-6))
    return norm


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    params = _replicated(params)
    if world_size() > 1 and params:
        _flat_apply(params, lambda flat: dist.broadcast(flat, src=0))


def check_in_sync(params: list[torch.nn.Parameter]) -> None:
    """Every process must end with the same weights (same start, same averaged gradients); say so if not."""
    params = _replicated(params)
    if world_size() > 1 and params:
        checksums = gather(torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1))
        if not torch.allclose(checksums, checksums[:1].expand_as(checksums), rtol=1e-9, atol=1e-9):
            raise RuntimeError(f"processes ended with different weights (checksums {checksums.tolist()}): "
                               "gradient averaging failed; please report this")
