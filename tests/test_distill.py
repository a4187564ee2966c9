"""On-policy distillation on tiny random Llamas: a run leaves the usual outputs, the student's divergence from a
teacher falls, the teacher is checked before loading (same tokenizer, a full model) and may be loaded in 4-bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import medgpt.stages.distill as distill
from conftest import DEMO, make_tiny_model
from medgpt.config import ConfigError, build_config
from medgpt.data.records import Message
from medgpt.report import read_metrics
from medgpt.stages import get_stage

pytestmark = pytest.mark.usefixtures("private_cache")
QUESTIONS = ["What is a fever?", "Where is the liver?", "What does insulin do?", "What is asthma?"]


def setup_stage(options: dict):
    return distill.setup(build_config(get_stage("distill"), dict(options)))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, learnable_model_dir) -> Path:
    """The learnable tiny model with a rank-4 change to its last MLP's down projection: a teacher the student's
    LoRA on that projection can match exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(learnable_model_dir)
    weight = model.model.layers[-1].mlp.down_proj.weight
    with torch.no_grad():
        weight += 0.3 * torch.randn(weight.shape[0], 4) @ torch.randn(4, weight.shape[1])
    directory = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(learnable_model_dir).save_pretrained(directory)
    return directory


@pytest.fixture
def options(tmp_path, tiny_model_dir, teacher_dir) -> dict:
    return {
        "model_name_or_path": str(tiny_model_dir),
        "teacher_model_name_or_path": str(teacher_dir),
        "train_file_dir": str(DEMO / "sft" / "dialogues_openai.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "max_completion_length": 6,
        "logging_steps": 1,
        "save_steps": 100,
        "learning_rate": 1e-3,
        "lora_dropout": 0.0,
        "report_to": "none",
    }


def test_distill_run_leaves_adapter_metrics_and_plots(options, tmp_path):
    metrics = distill.run(build_config(get_stage("distill"), options))
    out = tmp_path / "out"
    for name in ("adapter_model.safetensors", "adapter_config.json", "chat_template.jinja", "run_config.yaml",
                 "metrics.jsonl", "loss.png", "entropy.png", "README.md", "train_results.json"):
        assert (out / name).is_file(), name
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and math.isfinite(r["entropy"]) for r in rows)
    saved = json.loads((out / "train_results.json").read_text())
    assert saved["global_step"] == 2 and saved["divergence"] == "reverse KL"
    assert saved["teacher"] == options["teacher_model_name_or_path"] and metrics["prompts"] == saved["prompts"] > 0


def reverse_kl(student, teacher, sequences: torch.Tensor, prompt_length: int) -> float:
    """Mean per-token KL(student ‖ teacher) over the completion positions of fixed sequences (plain logits)."""
    with torch.no_grad():
        s = torch.log_softmax(student(sequences).logits[:, prompt_length - 1:-1].float(), -1)
        t = torch.log_softmax(teacher(sequences).logits[:, prompt_length - 1:-1].float(), -1)
    return (s.exp() * (s - t)).sum(-1).mean().item()


def test_students_divergence_from_the_teacher_falls(options, learnable_model_dir, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in QUESTIONS * 2))
    trainer, job, _ = setup_stage({
        **options, "model_name_or_path": str(learnable_model_dir), "train_file_dir": str(data), "max_steps": 10,
        "per_device_train_batch_size": 8, "max_completion_length": 8, "target_modules": "down_proj",
        "learning_rate": 1e-2, "lr_scheduler_type": "constant"})
    prompt = torch.tensor([job.chat_format.prompt_ids([Message("user", QUESTIONS[0])])])
    torch.manual_seed(0)
    held = trainer.model.generate(prompt, do_sample=True, max_new_tokens=16, num_return_sequences=4,
                                  pad_token_id=job.tokenizer.pad_token_id)  # the student's own answers, kept fixed
    before = reverse_kl(trainer.model, trainer.teacher_model, held, prompt.shape[1])
    trainer.train()
    after = reverse_kl(trainer.model, trainer.teacher_model, held, prompt.shape[1])
    assert after < 0.85 * before, (before, after)
    loss = [r["loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert sum(loss[-3:]) < sum(loss[:3]), loss  # the logged divergence on fresh samples falls too


def test_teacher_loads_in_4bit_and_is_never_trained(options, tmp_path, tokenizer):
    teacher = make_tiny_model(tmp_path / "teacher64", tokenizer, hidden=64)  # 4-bit blocks need width 64
    trainer, _, _ = setup_stage({**options, "teacher_model_name_or_path": str(teacher), "teacher_load_in_4bit": True})
    kinds = {type(m).__name__ for m in trainer.teacher_model.modules()}
    assert "Linear4bit" in kinds
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    trainer.train()
    assert trainer.state.global_step == 2


def test_teacher_problems_are_refused_before_any_weights_load(options, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(distill, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    other = tmp_path / "other_tokenizer"
    tokenizer.save_pretrained(other)
    from transformers import AutoTokenizer

    extended = AutoTokenizer.from_pretrained(other)
    extended.add_tokens(["<new_medical_term>"])
    extended.save_pretrained(other)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    cases = [({"teacher_model_name_or_path": None}, "needs teacher_model_name_or_path"),
             ({"teacher_model_name_or_path": str(adapter)}, "merge it first"),
             ({"teacher_model_name_or_path": str(other)}, "another tokenizer"),
             ({"teacher_model_init_kwargs": {"dtype": "bfloat16"}}, "loads the teacher itself"),
             ({"teacher_load_in_4bit": True, "teacher_load_in_8bit": True}, "choose one")]
    for bad, match in cases:
        with pytest.raises(ConfigError, match=match):
            setup_stage({**options, **bad, "overwrite_output_dir": True})
