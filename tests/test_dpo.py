"""The DPO family (DPO, IPO, hinge, SimPO, ORPO) on tiny random Llamas: each loss learns a toy preference, the DPO
loss equals a hand computation, the reference model is the policy as the stage started (also from an unmerged SFT
adapter), every option reaches the trainer, resume equals an uninterrupted run, and the output merges."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import medgpt.stages.dpo as dpo
from conftest import DEMO
from medgpt.config import ConfigError, build_config, training_kwargs
from medgpt.report import read_metrics
from medgpt.stages import get_stage
from medgpt.training.checkpoints import COMPLETE

QUESTIONS = ["What is a fever?", "Name the largest bone.", "What does insulin do?", "Is aspirin a painkiller?",
             "What is anaemia?", "Where is the liver?", "What is asthma?", "What do kidneys do?"]


def toy_pairs(n: int = 16) -> list[dict]:
    """Chosen replies always end with the word 'certainly'; rejected replies never contain it."""
    rows = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        rows.append({"conversations": [{"from": "human", "value": q}],
                     "chosen": f"Answer {i % 3} certainly", "rejected": f"Answer {i % 3} maybe"})
    return rows


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_stage(stage: str, options: dict) -> dict:
    torch.manual_seed(0)
    spec = get_stage(stage)
    return spec.run(build_config(spec, dict(options)))


def setup_stage(stage: str, options: dict):
    spec = get_stage(stage)
    return dpo.setup(build_config(spec, dict(options)))


def logged(output: Path, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(output / "metrics.jsonl") if key in row}


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def options(tmp_path, tiny_model_dir) -> dict:
    return {
        "model_name_or_path": str(tiny_model_dir),
        "train_file_dir": str(write_pairs(tmp_path / "data" / "pairs.jsonl", toy_pairs(8))),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_steps": 100,
        "max_length": 128,
        "lora_dropout": 0.0,
        "learning_rate": 1e-3,
        "report_to": "none",
    }


def sequence_logps(model, batch) -> torch.Tensor:
    """Sum of log p(token) over the completion tokens, from plain logits (no fused head): (2B,)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def first_batch(trainer) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(2)])


# ------------------------------------------------------------------------------------------------ outputs


def test_dpo_run_leaves_adapter_metrics_reward_plots_and_truncation_counts(options, tmp_path):
    metrics = run_stage("dpo", {**options, "max_steps": 3})
    out = tmp_path / "out"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "run_config.yaml", "metrics.jsonl", "loss.png", "rewards.png", "accuracy.png", "logps.png",
                 "README.md", "train_results.json"):
        assert (out / name).is_file(), name
    assert not (out / "ref").exists()  # no reference adapter in the result
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert all(math.isfinite(r[key]) for r in rows), key
    saved = json.loads((out / "train_results.json").read_text())
    assert saved["pairs_kept"] == 8 and saved["global_step"] == 3 and saved["loss_type"] == "sigmoid"
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # a new adapter starts as its reference


def test_long_pairs_are_cut_from_the_left_counted_and_not_cut_again_by_the_collator(options, tmp_path):
    long_prompt = " ".join(["please explain the kidney"] * 40)
    rows = toy_pairs(4) + [{"conversations": [{"from": "human", "value": long_prompt}],
                            "chosen": "Kidneys filter blood certainly", "rejected": "No idea"}]
    data = write_pairs(tmp_path / "data" / "long.jsonl", rows)
    trainer, job, _ = setup_stage("dpo", {**options, "train_file_dir": str(data), "max_length": 64})
    assert job.stats["pairs_prompt_truncated"] == 1 and job.stats["pairs_kept"] == 4
    features = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    cut = max(features, key=lambda f: len(f["prompt_ids"]))
    assert len(cut["prompt_ids"]) + max(len(cut["chosen_ids"]), len(cut["rejected_ids"])) <= 64
    batch = trainer.data_collator([cut])
    # the collator's own max_length truncation (keep the start) takes nothing away from our features
    assert batch["input_ids"][0, : int(batch["attention_mask"][0].sum())].tolist() == cut["prompt_ids"] + cut["chosen_ids"]
    assert int(batch["completion_mask"][1].sum()) == len(cut["rejected_ids"])


# ------------------------------------------------------------------------------------------------ losses learn


@pytest.mark.parametrize("stage,loss_type,extra", [
    ("dpo", "sigmoid", {"beta": 0.5}),
    ("dpo", "ipo", {"beta": 0.5, "learning_rate": 5e-3}),  # a squared loss: a large step overshoots its target
    ("dpo", "hinge", {"beta": 0.5}),
    ("dpo", "simpo", {"beta": 2.0, "simpo_gamma": 0.5}),
    ("orpo", None, {"beta": 0.5}),
], ids=["dpo", "ipo", "hinge", "simpo", "orpo"])
def test_each_loss_decreases_and_the_reward_margin_grows_on_a_learnable_toy_set(
        options, learnable_model_dir, tmp_path, stage, loss_type, extra):
    data = write_pairs(tmp_path / "data" / "toy.jsonl", toy_pairs(16))
    run = {**options, "model_name_or_path": str(learnable_model_dir), "train_file_dir": str(data), "max_steps": 10,
           "per_device_train_batch_size": 4, "learning_rate": 2e-2, "lr_scheduler_type": "constant",
           "warmup_steps": 0, **extra}
    if loss_type:
        run["loss_type"] = loss_type
    run_stage(stage, run)
    out = tmp_path / "out"
    loss, margin = logged(out, "loss"), logged(out, "rewards/margins")
    assert len(loss) == 10 and all(math.isfinite(v) for v in loss.values())
    early, late = loss[1] + loss[2], loss[9] + loss[10]
    assert late < 0.7 * early, loss
    assert margin[9] + margin[10] > margin[1] + margin[2] + 0.1, margin
    assert logged(out, "rewards/accuracies")[10] == 1.0


# ------------------------------------------------------------------------------------------------ golden


def test_dpo_loss_equals_the_hand_computation_from_log_probabilities(options, tmp_path):
    beta = 0.3
    trainer, _, _ = setup_stage("dpo", {**options, "beta": beta})
    model = trainer.model
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy away from its reference (a new adapter starts equal to it)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = first_batch(trainer)
    model.train()
    loss = trainer.compute_loss(model, batch)

    policy = sequence_logps(model.eval(), batch)
    with model.disable_adapter():
        reference = sequence_logps(model, batch)
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    expected = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    assert not torch.allclose(policy, reference, atol=1e-3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


def test_simpo_and_orpo_losses_equal_the_hand_computation(options):
    from medgpt.training.preference_loss import orpo_loss, simpo_loss

    chosen, rejected = torch.tensor([-0.5, -1.0]), torch.tensor([-2.0, -0.8])
    expected = -F.logsigmoid(2.0 * (chosen - rejected) - 0.5)
    assert torch.allclose(simpo_loss(chosen, rejected, 2.0, 0.5), expected)
    odds = lambda lp: lp.exp() / (1 - lp.exp())  # noqa: E731
    log_odds = torch.log(odds(chosen) / odds(rejected))
    loss, got_odds = orpo_loss(torch.tensor(0.7), chosen, rejected, 0.1)
    assert torch.allclose(got_odds, log_odds, atol=1e-6)
    assert loss.item() == pytest.approx(0.7 - 0.1 * F.logsigmoid(log_odds).mean().item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------ reference


def _sft_adapter(base_dir: Path, directory: Path, tokenizer) -> Path:
    """An 'SFT' LoRA adapter with non-zero weights, saved as our SFT stage saves it (adapter + tokenizer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_unmerged_sft_adapter_start_uses_the_sft_policy_as_reference(options, tiny_model_dir, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft = _sft_adapter(tiny_model_dir, tmp_path / "sft", tokenizer)
    trainer, _, _ = setup_stage("dpo", {**options, "model_name_or_path": str(sft)})
    batch = first_batch(trainer)
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    reference = torch.cat([ref_chosen, ref_rejected])

    sft_policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert torch.allclose(reference, sequence_logps(sft_policy, batch), atol=1e-4)
    assert not torch.allclose(reference, sequence_logps(base, batch), atol=1e-2)
    # the SFT adapter is what trains, starting from its SFT weights
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(".default." in n for n in trained)


def test_unmerged_sft_adapter_output_is_an_adapter_of_the_original_base(options, tiny_model_dir, tokenizer, tmp_path):
    sft = _sft_adapter(tiny_model_dir, tmp_path / "sft", tokenizer)
    metrics = run_stage("dpo", {**options, "model_name_or_path": str(sft)})
    out = tmp_path / "out"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert not (out / "ref").exists()
    assert metrics["global_step"] == 2
    trained, start = load_file(str(out / "adapter_model.safetensors")), load_file(str(sft / "adapter_model.safetensors"))
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_full_training_keeps_a_frozen_copy_or_precomputes_the_reference(options):
    trainer, _, _ = setup_stage("dpo", {**options, "use_peft": False})
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())

    trainer, _, _ = setup_stage("dpo", {**options, "use_peft": False, "precompute_ref_log_probs": True,
                                        "overwrite_output_dir": True})
    assert trainer.ref_model is None
    assert "ref_chosen_logps" in trainer.train_dataset.column_names


def test_reference_free_full_training_loads_no_reference_model(options):
    trainer, _, _ = setup_stage("orpo", {**options, "use_peft": False})
    assert trainer.ref_model is None and trainer.args.precompute_ref_log_probs is False
    assert "ref_chosen_logps" not in trainer.train_dataset.column_names


# ------------------------------------------------------------------------------------------------ options


def test_options_reach_the_trainer_arguments_including_deepspeed(options, tmp_path):
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    given = {**options, "beta": 0.25, "num_train_epochs": 3, "loss_type": "ipo", "deepspeed": str(ds),
             "max_length": 96, "precompute_ref_log_probs": True, "gradient_checkpointing": True, "warmup_ratio": 0.1}
    kwargs = training_kwargs(get_stage("dpo"), given)  # built, TrainingArguments would need deepspeed installed
    assert kwargs["beta"] == 0.25 and kwargs["num_train_epochs"] == 3 and kwargs["loss_type"] == ["ipo"]
    assert kwargs["deepspeed"] == str(ds) and kwargs["max_length"] == 96 and kwargs["precompute_ref_log_probs"]
    assert kwargs["activation_checkpointing"] is True and kwargs["warmup_steps"] == 0.1
    assert kwargs["bf16"] is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())

    config = build_config(get_stage("dpo"), {k: v for k, v in given.items() if k != "deepspeed"})
    assert config.training.beta == 0.25 and config.training.loss_type == ["ipo"]
    trainer, _, _ = dpo.setup(config)
    assert trainer.beta == 0.25 and trainer.loss_types == ["ipo"] and trainer.args.num_train_epochs == 3
    assert trainer.data_collator.max_length == 96 and trainer.precompute_ref_logps
    assert trainer.args.activation_checkpointing is True


def test_gradient_checkpointing_stays_off_unless_asked(options):
    trainer, _, _ = setup_stage("dpo", options)  # DPOConfig's own default would turn it on
    assert trainer.args.activation_checkpointing is False and trainer.args.gradient_checkpointing is False


def test_simpo_gamma_reaches_the_trainer_and_is_refused_for_other_losses(options):
    trainer, _, _ = setup_stage("dpo", {**options, "loss_type": "simpo", "simpo_gamma": 0.8, "beta": 2.0})
    assert trainer.reference_free == "simpo" and trainer.simpo_gamma == 0.8 and trainer.beta == 2.0
    with pytest.raises(ConfigError, match="simpo_gamma"):
        setup_stage("dpo", {**options, "simpo_gamma": 0.8})


@pytest.mark.parametrize("stage,bad,match", [
    ("dpo", {"loss_type": "orpo"}, "stage: orpo"),
    ("dpo", {"loss_type": "simpo,sigmoid"}, "cannot be combined"),
    ("dpo", {"loss_type": "simpo", "precompute_ref_log_probs": True}, "reference-free"),
    ("orpo", {"loss_type": "ipo"}, "own loss"),
    ("orpo", {"ld_alpha": 0.5}, "reference-free"),
    ("dpo", {"use_peft": False, "peft_path": "x"}, "merge it first"),
], ids=["orpo-as-loss", "simpo-mixed", "simpo-precompute", "orpo-loss-type", "orpo-ld-alpha", "full-from-adapter"])
def test_options_that_would_do_nothing_are_refused_before_loading(options, stage, bad, match, monkeypatch):
    monkeypatch.setattr(dpo, "load_tokenizer", lambda *a, **k: pytest.fail("loaded a tokenizer"))
    with pytest.raises(ConfigError, match=match):
        setup_stage(stage, {**options, **bad})


def test_resume_from_checkpoint_reaches_the_train_call(options, tmp_path, monkeypatch):
    run_stage("dpo", {**options, "max_steps": 2, "save_steps": 1})
    calls = []

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("resume_from_checkpoint"))
        raise KeyboardInterrupt  # enough: we only look at the call

    monkeypatch.setattr(dpo.PreferenceTrainer, "train", spy)
    with pytest.raises(KeyboardInterrupt):
        run_stage("dpo", {**options, "max_steps": 2, "resume_from_checkpoint": "auto"})
    assert calls == [str(tmp_path / "out" / "checkpoint-2")]


# ------------------------------------------------------------------------------------------------ resume, merge


def test_resumed_dpo_run_equals_the_uninterrupted_run(options, tmp_path):
    run = {**options, "max_steps": 4, "save_steps": 2, "seed": 7}
    uninterrupted = tmp_path / "a"
    run_stage("dpo", {**run, "output_dir": str(uninterrupted)})
    resumed = tmp_path / "b"
    shutil.copytree(uninterrupted, resumed)
    for path in list(resumed.iterdir()):  # killed after checkpoint-2: the last checkpoint and final files gone
        if path.name != "checkpoint-2" and path.name != "metrics.jsonl":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert (resumed / "checkpoint-2" / COMPLETE).is_file()
    torch.manual_seed(123)
    spec = get_stage("dpo")
    metrics = spec.run(build_config(spec, {**run, "output_dir": str(resumed), "resume_from_checkpoint": "auto"}))
    assert metrics["global_step"] == 4
    a = load_file(str(uninterrupted / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    la, lb = logged(uninterrupted, "loss"), logged(resumed, "loss")
    assert sorted(lb) == [1, 2, 3, 4]
    for step in (3, 4):
        assert lb[step] == pytest.approx(la[step], abs=1e-6)


def test_dpo_adapter_merges_into_the_base_with_the_same_logits(options, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medgpt.models.merge import merge_adapter

    run_stage("dpo", {**options, "learning_rate": 1e-2})
    out = tmp_path / "out"
    merged = merge_adapter(out, tmp_path / "merged")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
        adapter_logits = adapter(input_ids=ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-4)


# ------------------------------------------------------------------------------------------------ embedded


@pytest.mark.slow
def test_dpo_runs_on_the_embedded_model_with_the_demo_pairs(tmp_path):
    metrics = run_stage("dpo", {
        "model_name_or_path": "smollm2-135m", "train_file_dir": str(DEMO / "preference"),
        "output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 2, "max_length": 256,
        "learning_rate": 5e-5, "logging_steps": 1, "save_steps": 100, "report_to": "none",
    })
    assert metrics["global_step"] == 3 and math.isfinite(metrics["train_loss"])
    rows = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["rewards/margins"]) for r in rows)
    assert (tmp_path / "out" / "rewards.png").is_file()
