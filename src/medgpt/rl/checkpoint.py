"""checkpoint-N of the RL loop: trainable weights, optimizer, scheduler, KL and score state, every process's RNG;
the completion marker is written last, so a checkpoint cut short is never resumed from.

Replicated weights are saved once by rank 0; weights sharded by FSDP2 are saved by every process as its own
shard (`*_rank{r}`), so a resume needs as many processes as the run had (as the RNG states do anyway).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from medgpt.rl import ppo_core as core
from medgpt.rl.distributed import is_sharded, local_tensor, rank
from medgpt.training.checkpoints import COMPLETE, checkpoints

logger = logging.getLogger(__name__)

STATE_FILE = "ppo_state.json"
WEIGHTS_FILE = "trainable.safetensors"


def _local_optimizer_state(optimizer) -> dict:
    state = optimizer.state_dict()
    state["state"] = {key: {name: local_tensor(value) if isinstance(value, torch.Tensor) else value
                            for name, value in entry.items()} for key, entry in state["state"].items()}
    return state


def _files(path: Path, sharded: bool) -> tuple[Path, Path]:
    suffix = f"_rank{rank()}" if sharded else ""
    return path / WEIGHTS_FILE.replace(".safetensors", f"{suffix}.safetensors"), path / f"optimizer{suffix}.pt"


def save_checkpoint(trainer) -> Path:
    path = trainer.output / f"checkpoint-{trainer.step}"
    sharded = any(is_sharded(p) for p in trainer.network.trainable)
    if trainer.is_world_process_zero():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    weights, optimizer = _files(path, sharded)
    if sharded or trainer.is_world_process_zero():
        save_file({name: local_tensor(p.detach()).contiguous().cpu() for name, p in trainer.network.named_trainable},
                  str(weights))
        torch.save(_local_optimizer_state(trainer.optimizer), optimizer)
    if trainer.is_world_process_zero():
        torch.save(trainer.scheduler.state_dict(), path / "scheduler.pt")
        moments = trainer.score_moments
        state = {"step": trainer.step, "kl_controller": trainer.kl.state_dict(),
                 "score_moments": {"mean": moments.mean, "var": moments.var, "count": moments.count}}
        (path / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               path / f"rng_state_{rank()}.pth")
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        (path / COMPLETE).write_text(json.dumps({"global_step": trainer.step}), encoding="utf-8")
        _rotate(trainer.output, trainer.args.save_total_limit)
    return path


def _rotate(output: Path, limit: int | None) -> None:
    complete = [path for _, path, done in checkpoints(output) if done]
    for path in complete[: max(len(complete) - limit, 0)] if limit else []:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(trainer, path: str | Path) -> None:
    path = Path(path)
    sharded = any(is_sharded(p) for p in trainer.network.trainable)
    weights, optimizer = _files(path, sharded)
    for needed in (weights, path / f"rng_state_{rank()}.pth"):
        if not needed.is_file():
            raise ValueError(f"{path} has no {needed.name}: resume with as many processes (and the same sharding) "
                             "as the run had")
    named = dict(trainer.network.named_trainable)
    state = load_file(str(weights))
    missing, unexpected = sorted(set(named) - set(state)), sorted(set(state) - set(named))
    if missing or unexpected:
        raise ValueError(f"{path} does not match this model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                         "resume with the options the run started with")
    with torch.no_grad():
        for name, param in named.items():
            local_tensor(param).copy_(state[name])
    saved = torch.load(optimizer, weights_only=True)
    _restore_optimizer(trainer.optimizer, saved)
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    ppo_state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    trainer.step = ppo_state["step"]
    trainer.kl.load_state_dict(ppo_state["kl_controller"])
    trainer.score_moments = core.RunningMoments(**ppo_state["score_moments"])
    rng = torch.load(path / f"rng_state_{rank()}.pth", weights_only=False)  # our own file: pickled RNG states
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    logger.info("resumed at step %d from %s", trainer.step, path)


def _restore_optimizer(optimizer, saved: dict) -> None:
    """Load a state saved by `_local_optimizer_state`: sharded parameters get their moments back as shards."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.load_state_dict({**saved, "state": {}})  # hyper-parameters and group layout
    for index, entry in saved["state"].items():
        param = params[int(index)]
        optimizer.state[param] = {
            name: _like(value, param) if isinstance(value, torch.Tensor) and value.dim() > 0 else value
            for name, value in entry.items()}


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if is_sharded(param):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(value.to(param.device), param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())
    return value.to(param.device)
