"""Mixed precision and activation checkpointing on CPU: `bf16: true` (autocast) trains every stage family, full
training keeps fp32 master weights so updates below bf16's resolution survive, fp16 loss scaling finds fp32
gradients to unscale, and gradient checkpointing gives the gradients of a run without it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from medgpt.arguments import ModelArguments
from medgpt.config import build_config
from medgpt.data.processors import IGNORE
from medgpt.report import read_metrics
from medgpt.stages import get_stage
from medgpt.training.precision import keep_fp32_master_weights, upcast_to_fp32

pytestmark = pytest.mark.usefixtures("private_cache")

QUESTIONS = ["What is a fever?", "Name the largest bone.", "What does insulin do?", "Is aspirin a painkiller?"]
ANSWERS = ["A body temperature above 38 degrees Celsius.", "The femur, in the thigh.",
           "It lets cells take up glucose from the blood.", "Yes, and it also thins the blood."]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def conversations(path: Path) -> Path:
    return write_jsonl(path, [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                              for q, a in zip(QUESTIONS * 2, ANSWERS * 2)])


def pairs(path: Path) -> Path:
    return write_jsonl(path, [{"prompt": q, "chosen": a, "rejected": ANSWERS[(i + 1) % 4]}
                              for i, (q, a) in enumerate(zip(QUESTIONS * 2, ANSWERS * 2))])


def run(stage: str, options: dict) -> dict:
    torch.manual_seed(0)
    spec = get_stage(stage)
    return spec.run(build_config(spec, dict(options)))


def options_for(stage: str, tmp_path: Path, model_dir: Path, name: str, **extra) -> dict:
    data = conversations(tmp_path / "sft.jsonl") if stage == "sft" else pairs(tmp_path / "pairs.jsonl")
    return {"model_name_or_path": str(model_dir), "train_file_dir": str(data), "output_dir": str(tmp_path / name),
            "max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 100,
            "max_length": 128, "lora_dropout": 0.0, "learning_rate": 1e-3, "report_to": "none", **extra}


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])  # causal LM, reward model, preference optimisation
def test_bf16_autocast_trains_every_stage_family_on_cpu(stage, tmp_path, tiny_model_dir):
    losses = {}
    for bf16 in (False, True):
        name = f"bf16-{bf16}"
        run(stage, options_for(stage, tmp_path, tiny_model_dir, name, bf16=bf16))
        rows = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
        losses[bf16] = [r["loss"] for r in rows]
        assert len(rows) == 2 and all(torch.isfinite(torch.tensor(losses[bf16])))
        assert (tmp_path / name / "train_results.json").is_file()
    # the bf16 run really computed in bf16: its losses carry bf16's rounding, close to the fp32 ones
    assert losses[True] != losses[False]
    assert losses[True] == pytest.approx(losses[False], rel=0.02, abs=0.02)


def test_full_training_keeps_fp32_master_weights_so_tiny_updates_survive(tmp_path, tiny_model_dir, monkeypatch,
                                                                         caplog):
    import medgpt.models.load as load

    monkeypatch.setattr(load, "resolve_dtype", lambda name, purpose="train": torch.bfloat16 if name in (None, "auto") else
                        {"bf16": torch.bfloat16, "fp32": torch.float32}[name])  # `auto` giving bf16, as on GPUs
    weight = "model.layers.0.mlp.gate_proj.weight"
    start = load_file(tiny_model_dir / "model.safetensors")[weight].to(torch.bfloat16).float()  # as loaded
    changed = {}
    for name, extra in (("master", {}), ("pure", {"torch_dtype": "bf16"})):
        # lr 1e-6: Adam moves each weight by ~1e-6, far below bf16's resolution at 0.02 (~1.2e-4)
        run("sft", options_for("sft", tmp_path, tiny_model_dir, name, use_peft=False, bf16=True, max_steps=1,
                               learning_rate=1e-6, **extra))
        saved = load_file(tmp_path / name / "model.safetensors")[weight]
        step = (saved.float() - start).abs()
        changed[name] = (saved.dtype, float((step > 0).float().mean()), float(step.max()))
    dtype, fraction, largest = changed["master"]
    assert dtype == torch.float32 and fraction > 0.9 and largest < 1e-5  # every weight took its ~1e-6 step
    # the contrast the test rests on: stored in bf16 as asked, the same update rounds away almost everywhere
    # (only weights near zero, where bf16 is finer, move)
    dtype, fraction, _ = changed["pure"]
    assert dtype == torch.bfloat16 and fraction < 0.1
    assert "pure bf16 full training" in caplog.text


def test_fp16_loss_scaling_unscales_only_after_trainable_weights_are_upcast():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4).half()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(layer(torch.randn(2, 4).half()).float().sum()).backward()
    with pytest.raises(ValueError, match="unscale FP16 gradients"):
        scaler.unscale_(optimizer)  # what `fp16: true` on 16-bit trainable weights crashes with

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).half()
    model[0].requires_grad_(False)  # frozen: stays 16-bit under autocast
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(fp16=True, bf16=False, mixed_precision="fp16"),
                              is_world_process_zero=lambda: True)
    config = SimpleNamespace(adapter=SimpleNamespace(use_peft=False), given={"torch_dtype": "fp16"})
    keep_fp32_master_weights(trainer, config)
    assert model[1].weight.dtype == torch.float32 and model[0].weight.dtype == torch.float16
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(2, 4)).float().sum()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # no error now
    scaler.step(optimizer)


def test_without_autocast_every_16_bit_weight_is_upcast():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    assert upcast_to_fp32(model, trainable_only=False) == 4
    model(torch.randn(2, 4))  # frozen and trained layers agree on the dtype


def test_gradient_checkpointing_gives_the_gradients_of_a_run_without_it(tiny_model_dir, caplog):
    from medgpt.models.lean import use_lean_activations
    from medgpt.models.load import load_model
    from medgpt.training.trainer import use_chunked_loss

    grads = {}
    ids = torch.randint(5, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = IGNORE
    for checkpointing in (False, True):
        model = load_model(ModelArguments(model_name_or_path=str(tiny_model_dir),
                                          gradient_checkpointing=checkpointing))
        use_chunked_loss(model, chunk_size=7)
        use_lean_activations(model)
        model.train()
        assert model.is_gradient_checkpointing == checkpointing
        model(input_ids=ids, labels=labels).loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert any(float(g.abs().max()) > 0 for g in grads[False].values())
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)
