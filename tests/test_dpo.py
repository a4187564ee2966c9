"""The DPO family (DPO, IPO, hinge, SimPO, ORPO) on tiny random Llamas: each loss learns a toy preference, the DPO
loss equals a hand computation, the reference model is the policy as the stage started (also from an unmerged SFT
adapter), every option reaches the trainer, resume equals an uninterrupted run, and the output merges."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import medgpt.stages.dpo as dpo
from conftest import DEMO
from resume_parity import assert_resume_parity
from medgpt.config import ConfigError, bf16_default, build_config, training_kwargs
from medgpt.report import read_metrics
from medgpt.stages import get_stage

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


def lone_logps(model, features: list[dict]) -> torch.Tensor:
    """Σ log p(reply token) of every chosen, then every rejected reply, each sequence run alone through the stock
    forward (full logits, no packing, no fused head): (2B,)."""
    values = []
    for side in ("chosen_ids", "rejected_ids"):
        for f in features:
            ids = torch.tensor([f["prompt_ids"] + f[side]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].float()
            logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            values.append(logps[len(f["prompt_ids"]) - 1:].sum())
    return torch.stack(values)


def features_of(trainer, n: int = 2) -> list[dict]:
    return [trainer.train_dataset[i] for i in range(n)]


def first_batch(trainer) -> dict:
    return trainer.data_collator(features_of(trainer))


def move_away_from_reference(model, seed: int = 1) -> None:
    """A new adapter starts equal to its reference: give lora_B weights so that policy and reference differ."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


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
    # the packed row is the pair's two sequences whole: nothing is cut again
    assert batch["input_ids"][0].tolist() == (cut["prompt_ids"] + cut["chosen_ids"]
                                              + cut["prompt_ids"] + cut["rejected_ids"])
    assert int((batch["labels"] != -100).sum()) == len(cut["chosen_ids"]) + len(cut["rejected_ids"])


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
    trainer, _, _ = setup_stage("dpo", {**options, "beta": beta, "bf16": False})
    model = trainer.model
    move_away_from_reference(model)
    batch = first_batch(trainer)
    model.train()
    loss = trainer.compute_loss(model, batch)

    policy = lone_logps(model.eval(), features_of(trainer))
    with model.disable_adapter():
        reference = lone_logps(model, features_of(trainer))
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    expected = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    assert not torch.allclose(policy, reference, atol=1e-3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)


# TRL's loss types with the settings each needs; several trainer attributes are read by both paths per call.
TRL_CASES = [
    ({"loss_types": ["sigmoid"]}), ({"loss_types": ["hinge"]}), ({"loss_types": ["ipo"]}),
    ({"loss_types": ["exo_pair"], "label_smoothing": 1e-3}), ({"loss_types": ["nca_pair"]}),
    ({"loss_types": ["robust"], "label_smoothing": 0.1}), ({"loss_types": ["bco_pair"]}),
    ({"loss_types": ["sppo_hard"]}), ({"loss_types": ["aot"], "label_smoothing": 0.1}),
    ({"loss_types": ["aot_unpaired"]}), ({"loss_types": ["apo_zero"]}), ({"loss_types": ["apo_down"]}),
    ({"loss_types": ["discopop"]}), ({"loss_types": ["sft"]}), ({"loss_types": ["sigmoid_norm"]}),
    ({"loss_types": ["sigmoid", "sft"], "loss_weights": [0.8, 0.2]}),
    ({"loss_types": ["sigmoid"], "f_divergence_type": "js_divergence"}),
    ({"loss_types": ["hinge"], "f_divergence_type": "forward_kl"}),
    ({"loss_types": ["ipo"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}),
    ({"loss_types": ["sigmoid"], "ld_alpha": 0.5}),
]
PARITY_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                  "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")


def trl_batch(trainer, features: list[dict]) -> dict:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=trainer.processing_class.pad_token_id)(features)


def loss_grads_metrics(trainer, compute, batch) -> tuple[float, dict[str, torch.Tensor], dict[str, float]]:
    model = trainer.model
    model.zero_grad()
    trainer._metrics["train"].clear()
    loss = compute(trainer, model, batch, False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def assert_matches_trl(trainer, features, case: str) -> None:
    from trl import DPOTrainer

    packed, padded = trainer.data_collator(features), trl_batch(trainer, features)
    ours = loss_grads_metrics(trainer, type(trainer)._compute_loss, packed)
    theirs = loss_grads_metrics(trainer, DPOTrainer._compute_loss, padded)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-4, abs=1e-6), case
    for name, grad in theirs[1].items():
        assert torch.allclose(ours[1][name], grad, rtol=1e-3, atol=1e-6), f"{case}: {name}"
    assert any(g.abs().sum() > 0 for g in theirs[1].values()), case  # a real gradient was compared
    for key in PARITY_METRICS:
        assert ours[2][key] == pytest.approx(theirs[2][key], rel=1e-4, abs=1e-5), f"{case}: {key}"


def test_per_pair_log_probs_equal_trls_dpo_trainer_on_the_same_pairs(options):
    from trl import DPOTrainer

    trainer, _, _ = setup_stage("dpo", {**options, "bf16": False})
    model = trainer.model
    move_away_from_reference(model)
    features = features_of(trainer, 3)
    packed, padded = trainer.data_collator(features), trl_batch(trainer, features)
    with torch.no_grad():
        ours = trainer.sequence_logps(trainer.score(model, packed), 6)
        labels = padded["input_ids"].masked_fill(padded["completion_mask"] == 0, -100)
        theirs = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=labels,
                       fused_lm_head=True).log_probs.sum(-1)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    assert torch.allclose(ours, lone_logps(model.eval(), features), rtol=1e-5, atol=1e-4)
    ref_ours = torch.cat(trainer.compute_ref_log_probs(model, packed))
    ref_theirs = torch.cat(DPOTrainer.compute_ref_log_probs(trainer, model, padded))
    assert torch.allclose(ref_ours, ref_theirs, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(ref_ours, ours, atol=1e-2)  # the reference is not the moved policy


def test_every_trl_loss_type_gives_trls_loss_gradients_and_metrics(options):
    trainer, _, _ = setup_stage("dpo", {**options, "bf16": False})
    move_away_from_reference(trainer.model)
    trainer.model.train()
    features = features_of(trainer, 3)
    for case in TRL_CASES:
        trainer.loss_types, trainer.loss_weights = case["loss_types"], case.get("loss_weights", [1.0] * len(case["loss_types"]))
        trainer.label_smoothing = case.get("label_smoothing", 0.0)
        trainer.f_divergence_type = case.get("f_divergence_type", "reverse_kl")
        trainer.f_alpha_divergence_coef = case.get("f_alpha_divergence_coef", 1.0)
        trainer.ld_alpha = case.get("ld_alpha")
        assert_matches_trl(trainer, features, str(case))


def test_wpo_weighting_and_a_padded_batch_give_trls_values_too(options):
    trainer, _, _ = setup_stage("dpo", {**options, "bf16": False, "use_weighting": True, "loss_type": "ipo"})
    move_away_from_reference(trainer.model)
    trainer.model.train()
    assert_matches_trl(trainer, features_of(trainer, 3), "wpo")
    trainer.data_collator.packing = False  # our padded layout: same values
    assert trainer.data_collator(features_of(trainer, 3))["input_ids"].shape[0] == 6
    assert_matches_trl(trainer, features_of(trainer, 3), "wpo, padded")


def test_packed_pairs_never_attend_to_each_other(options):
    trainer, _, _ = setup_stage("dpo", {**options, "bf16": False})
    model = trainer.model.eval()
    move_away_from_reference(model)
    features = features_of(trainer, 2)
    changed = [features[0], {**features[1], "rejected_ids": features[1]["rejected_ids"][::-1],
                             "prompt_ids": features[1]["prompt_ids"][:-2] + features[1]["prompt_ids"][-1:]}]
    with torch.no_grad():
        before = trainer.sequence_logps(trainer.score(model, trainer.data_collator(features)), 4)
        after = trainer.sequence_logps(trainer.score(model, trainer.data_collator(changed)), 4)
    # pair 0 (sequences 0 and 2) did not move when pair 1's prompt and reply changed next to it in the row
    assert torch.allclose(before[[0, 2]], after[[0, 2]], atol=1e-6)
    assert not torch.allclose(before[[1, 3]], after[[1, 3]], atol=1e-3)
    assert torch.allclose(after, lone_logps(model, changed), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("stage,loss_type", [("dpo", "simpo"), ("orpo", None)])
def test_simpo_and_orpo_equal_our_previous_padded_fused_head_path(options, stage, loss_type):
    from medgpt.training.preference_loss import orpo_loss, simpo_loss

    run = {**options, "bf16": False, "beta": 2.0 if loss_type else 0.5, **({"loss_type": loss_type} if loss_type else {})}
    trainer, _, _ = setup_stage(stage, run)
    model = trainer.model
    move_away_from_reference(model)
    model.train()
    features = features_of(trainer, 3)
    ours = loss_grads_metrics(trainer, type(trainer)._compute_loss, trainer.data_collator(features))

    def previous(trainer, model, batch, return_outputs):  # what this stage computed before packing (padded, fused)
        mask = batch["completion_mask"]
        labels = batch["input_ids"].masked_fill(mask == 0, -100)
        per_token = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                          fused_lm_head=True).log_probs * mask[:, 1:]
        lengths = mask[:, 1:].sum(1)
        chosen_avg, rejected_avg = (per_token.sum(1) / lengths).chunk(2)
        if stage == "orpo":
            chosen_tokens, _ = lengths.chunk(2)
            return orpo_loss(-per_token.sum(1).chunk(2)[0].sum() / chosen_tokens.sum(), chosen_avg, rejected_avg,
                             trainer.beta)[0]
        return simpo_loss(chosen_avg, rejected_avg, trainer.beta, trainer.simpo_gamma).mean()

    theirs = loss_grads_metrics(trainer, previous, trl_batch(trainer, features))
    assert ours[0] == pytest.approx(theirs[0], rel=1e-4, abs=1e-6)
    for name, grad in theirs[1].items():
        assert torch.allclose(ours[1][name], grad, rtol=1e-3, atol=1e-6), name


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
    trainer, _, _ = setup_stage("dpo", {**options, "model_name_or_path": str(sft), "bf16": False})
    batch = first_batch(trainer)
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    reference = torch.cat([ref_chosen, ref_rejected])

    sft_policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert torch.allclose(reference, lone_logps(sft_policy, features_of(trainer)), atol=1e-4)
    assert not torch.allclose(reference, lone_logps(base, features_of(trainer)), atol=1e-2)
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
    assert kwargs["bf16"] is bf16_default()

    config = build_config(get_stage("dpo"), {k: v for k, v in given.items() if k != "deepspeed"})
    assert config.training.beta == 0.25 and config.training.loss_type == ["ipo"]
    trainer, _, _ = dpo.setup(config)
    assert trainer.beta == 0.25 and trainer.loss_types == ["ipo"] and trainer.args.num_train_epochs == 3
    assert trainer.precompute_ref_logps and "ref_chosen_logps" in trainer.train_dataset.column_names
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
    ("dpo", {"padding_free": True}, "packing: true"),
    ("orpo", {"pad_to_multiple_of": 8}, "pad_to_multiple_of"),
    ("dpo", {"truncation_mode": "keep_start"}, "cuts the prompt from the left"),
], ids=["orpo-as-loss", "simpo-mixed", "simpo-precompute", "orpo-loss-type", "orpo-ld-alpha", "full-from-adapter",
        "padding-free", "pad-multiple", "truncation-mode"])
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
    assert_resume_parity("dpo", {**options, "seed": 7}, tmp_path, steps=4, every=2)


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


def test_two_processes_with_two_pairs_each_train_as_one_process_with_four(options, tmp_path):
    from test_rm import torchrun_stage

    run = {**options, "max_steps": 2, "bf16": False, "learning_rate": 1e-2, "seed": 3}
    torchrun_stage("dpo", {**run, "output_dir": tmp_path / "dp", "per_device_train_batch_size": 2}, tmp_path)
    run_stage("dpo", {**run, "output_dir": str(tmp_path / "one"), "per_device_train_batch_size": 4})
    saved = json.loads((tmp_path / "dp" / "train_results.json").read_text())
    assert saved["world_size"] == 2 and saved["global_step"] == 2
    # the packed rows of both ranks together are the single process's batch: same gradients, same adapter
    a, b = load_file(str(tmp_path / "dp" / "adapter_model.safetensors")), load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    start = {k: v for k, v in a.items() if "lora_B" in k}
    assert any(v.abs().sum() > 0 for v in start.values())  # it trained
    # to float rounding: 2- and 1-process reductions sum in another order, and Adam's first steps (~lr = 1e-2 each)
    # scale a rounding difference in a near-zero gradient up (measured up to 1.2e-5 on an AVX512 CPU)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4), (key, float((a[key] - b[key]).abs().max()))
    two, one = logged(tmp_path / "dp", "rewards/margins"), logged(tmp_path / "one", "rewards/margins")
    assert two[2] == pytest.approx(one[2], abs=1e-5)  # metrics gathered over both ranks


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
