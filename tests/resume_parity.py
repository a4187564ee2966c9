"""Resume parity for the Trainer stages: a run killed after a checkpoint and resumed ends where the
uninterrupted run ends (same adapter weights, the remaining steps logged once, the same losses)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from medgpt.config import build_config
from medgpt.report import read_metrics
from medgpt.stages import get_stage
from medgpt.training.checkpoints import COMPLETE


def losses(output: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(output / "metrics.jsonl") if "loss" in row}


def run(stage: str, options: dict, torch_seed: int) -> dict:
    torch.manual_seed(torch_seed)
    spec = get_stage(stage)
    return spec.run(build_config(spec, dict(options)))


def assert_resume_parity(stage: str, options: dict, tmp_path: Path, steps: int, every: int) -> dict:
    """`steps` steps of `stage` with a checkpoint every `every` are run once uninterrupted and
    once killed after the first checkpoint (later checkpoints and the final files removed) and resumed under
    another torch seed. Returns the resumed run's adapter tensors."""
    options = {**options, "max_steps": steps, "save_steps": every}
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run(stage, {**options, "output_dir": str(uninterrupted)}, torch_seed=0)
    shutil.copytree(uninterrupted, resumed)
    kept = f"checkpoint-{every}"
    for path in list(resumed.iterdir()):
        if path.name not in (kept, "metrics.jsonl"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert (resumed / kept / COMPLETE).is_file()
    metrics = run(stage, {**options, "output_dir": str(resumed), "resume_from_checkpoint": "auto"}, torch_seed=123)
    assert metrics["global_step"] == steps
    a = load_file(str(uninterrupted / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    start = load_file(str(resumed / kept / "adapter_model.safetensors"))
    assert any(not torch.equal(start[k], b[k]) for k in start)  # the resumed steps trained
    before, after = losses(uninterrupted), losses(resumed)
    assert sorted(after) == list(range(1, steps + 1))  # the killed run's steps, then the resumed ones, once each
    for step in range(every + 1, steps + 1):
        assert abs(after[step] - before[step]) < 1e-6, step
    return b
