"""The KTO stage on tiny random Llamas: unpaired and paired data train, the loss falls when desirable answers are
learnable, options reach TRL's trainer, the reference is the starting policy, and outputs look like every stage's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import medgpt.stages.kto as kto_stage
from medgpt.config import ConfigError, bf16_default, build_config
from medgpt.data.preference import pairs_to_kto
from medgpt.data.readers import read_records
from medgpt.report import read_metrics
from medgpt.stages import get_stage
from resume_parity import assert_resume_parity

QUESTIONS = [
    "What is a fever?", "Name the largest bone.", "What does insulin do?", "Is aspirin a painkiller?",
    "What causes anaemia?", "How is asthma treated?", "What is hypertension?", "What is a migraine?",
]
ANSWERS = [
    "A body temperature above 38 degrees.", "The femur, in the thigh.", "It lets cells take up glucose.",
    "Yes, and it thins the blood.", "Often a lack of iron.", "With inhalers that open the airways.",
    "Blood pressure that stays raised.", "A headache with throbbing pain.",
]
MARK = "Verified"  # every desirable answer ends with it, no undesirable one does


def kto_lines(copies: int = 1) -> list[dict]:
    rows = []
    for i, question in enumerate(QUESTIONS):
        rows.append({"prompt": question, "completion": f"{ANSWERS[i]} {MARK}", "label": True})
        rows.append({"prompt": question, "completion": ANSWERS[(i + 3) % len(ANSWERS)], "label": False})
    return rows * copies


def pair_lines() -> list[dict]:
    return [{"conversations": [{"from": "human", "value": q}], "chosen": f"{ANSWERS[i]} {MARK}",
             "rejected": ANSWERS[(i + 3) % len(ANSWERS)]} for i, q in enumerate(QUESTIONS)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_kto(options: dict) -> dict:
    torch.manual_seed(0)
    spec = get_stage("kto")
    return spec.run(build_config(spec, dict(options)))


def rows_with(output: Path, key: str) -> list[dict]:
    return [row for row in read_metrics(output / "metrics.jsonl") if key in row]


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def options(tmp_path, tiny_model_dir) -> dict:
    return {
        "model_name_or_path": str(tiny_model_dir),
        "train_file_dir": str(write_jsonl(tmp_path / "data" / "kto.jsonl", kto_lines())),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_steps": 100,
        "max_length": 128,
        "lora_dropout": 0.0,
        "report_to": "none",
    }


# ------------------------------------------------------------------------------------------------ data


def test_each_pair_becomes_one_desirable_and_one_undesirable_example_with_its_prompt(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", pair_lines())
    pairs = read_records(str(path), ("preference",)).records
    examples = pairs_to_kto(pairs)
    assert len(examples) == 2 * len(pairs)
    assert [e.label for e in examples] == [True, False] * len(pairs)
    for pair, chosen, rejected in zip(pairs, examples[::2], examples[1::2]):
        assert chosen.prompt == pair.prompt == rejected.prompt
        assert chosen.completion == pair.chosen and rejected.completion == pair.rejected


def test_examples_are_shuffled_so_a_pair_is_rarely_its_own_kl_partner(tmp_path):
    pairs = read_records(str(write_jsonl(tmp_path / "pairs.jsonl", pair_lines())), ("preference",)).records
    examples, n_pairs = kto_stage.kto_examples(pairs, seed=1)
    assert n_pairs == len(pairs) and len(examples) == 2 * len(pairs)
    assert sorted(e.label for e in examples) == sorted([True, False] * len(pairs))
    in_file_order = pairs_to_kto(pairs)
    assert [e.completion for e in examples] != [e.completion for e in in_file_order]


def test_kl_completions_rotate_within_each_batch():
    batch = {"prompt_ids": [[1], [2], [3]], "completion_ids": [[10], [20], [30]], "label": [True, False, True]}
    assert kto_stage.with_kl_completions(batch)["KL_completion_ids"] == [[30], [10], [20]]


# ------------------------------------------------------------------------------------------------ options


def test_kto_config_options_reach_the_trainer(options, monkeypatch):
    seen = {}
    original = kto_stage.KTOFeaturesTrainer.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["trainer"] = self

    monkeypatch.setattr(kto_stage.KTOFeaturesTrainer, "__init__", spy)
    run_kto({**options, "max_steps": 1, "beta": 0.3, "desirable_weight": 1.5, "undesirable_weight": 0.7,
             "loss_type": "kto", "learning_rate": 2e-4, "num_train_epochs": 2})
    trainer = seen["trainer"]
    assert trainer.beta == 0.3 and trainer.desirable_weight == 1.5 and trainer.undesirable_weight == 0.7
    assert trainer.loss_type == "kto" and trainer.calculate_KL
    assert trainer.args.learning_rate == 2e-4 and trainer.args.num_train_epochs == 2
    assert trainer.args.max_length == 128
    assert trainer.args.bf16 is bf16_default()  # precision follows the hardware, not TRL's default
    assert not trainer.args.activation_checkpointing  # TRL turns it on by default; our default is off


def test_precision_and_checkpointing_defaults_follow_medgpt_not_trl(options):
    config = build_config(get_stage("kto"), options)
    assert config.training.bf16 is bf16_default()
    config = build_config(get_stage("kto"), {**options, "gradient_checkpointing": True})
    assert config.training.activation_checkpointing and config.model.gradient_checkpointing


def test_batch_of_one_is_refused_before_any_model_loads(options, monkeypatch):
    monkeypatch.setattr(kto_stage, "load_stage_data", lambda *a, **k: pytest.fail("data read before the check"))
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        run_kto({**options, "per_device_train_batch_size": 1})
    with pytest.raises(ConfigError, match="sequential"):
        run_kto({**options, "train_sampling_strategy": "random"})
    with pytest.raises(ConfigError, match="pad_to_multiple_of"):  # our collator batches: TRL's option would do nothing
        run_kto({**options, "pad_to_multiple_of": 8})


PARITY_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                  "entropy", "logits/chosen", "logits/rejected", "num_tokens")


def kto_trainer(options: dict):
    seen = {}
    original = kto_stage.train_and_save
    kto_stage.train_and_save = lambda trainer, *a, **k: seen.setdefault("trainer", trainer) and {}
    try:
        run_kto(options)
    finally:
        kto_stage.train_and_save = original
    return seen["trainer"]


def loss_grads_metrics(trainer, compute, batch):
    model = trainer.model
    model.zero_grad()
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    loss = compute(trainer, model, batch, False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_loss_gradients_and_metrics_equal_trls_kto_trainer(options, loss_type):
    from trl import KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    trainer = kto_trainer({**options, "bf16": False, "loss_type": loss_type, "desirable_weight": 1.3})
    torch.manual_seed(1)
    with torch.no_grad():  # a new adapter equals its reference: move the policy away from it
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    trainer.model.train()
    features = [trainer.train_dataset[i] for i in range(4)]
    assert {f["label"] for f in features} == {True, False}  # both kinds of loss term are compared
    packed = trainer.data_collator(features)
    assert packed["input_ids"].shape[0] == 1 and ("KL_input_ids" in packed) == (loss_type == "kto")
    padded = DataCollatorForUnpairedPreference(pad_token_id=trainer.processing_class.pad_token_id)(features)
    ours = loss_grads_metrics(trainer, type(trainer)._compute_loss, packed)
    theirs = loss_grads_metrics(trainer, KTOTrainer._compute_loss, padded)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-4, abs=1e-6)
    assert any(g.abs().sum() > 0 for g in theirs[1].values())
    for name, grad in theirs[1].items():
        assert torch.allclose(ours[1][name], grad, rtol=1e-3, atol=1e-6), name
    assert set(ours[2]) == set(theirs[2])
    for key in PARITY_METRICS:
        if key in theirs[2]:
            assert ours[2][key] == pytest.approx(theirs[2][key], rel=1e-4, abs=1e-5), key
    ref_ours = trainer.compute_ref_log_probs(trainer.model, packed)
    ref_theirs = KTOTrainer.compute_ref_log_probs(trainer, trainer.model, padded)
    for a, b in zip(ref_ours, ref_theirs):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-5, atol=1e-4))


def test_precomputed_reference_log_probs_come_from_the_packed_scoring(options):
    trainer = kto_trainer({**options, "bf16": False, "use_peft": False, "precompute_ref_log_probs": True})
    assert trainer.ref_model is None and {"ref_logps", "ref_KL_logps"} <= set(trainer.train_dataset.column_names)
    features = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator([{k: v for k, v in f.items() if not k.startswith("ref_")} for f in features])
    fresh, fresh_kl = trainer.compute_ref_log_probs(trainer.model, batch)  # the untrained policy is the reference
    assert torch.allclose(fresh, torch.tensor([f["ref_logps"] for f in features]), atol=1e-4)
    assert torch.allclose(fresh_kl, torch.tensor([f["ref_KL_logps"] for f in features]), atol=1e-4)


# ------------------------------------------------------------------------------------------------ training


def test_kto_loss_decreases_when_desirable_answers_are_learnable(tmp_path, learnable_model_dir):
    out = tmp_path / "out"
    run_kto({
        "model_name_or_path": str(learnable_model_dir),
        "train_file_dir": str(write_jsonl(tmp_path / "data" / "kto.jsonl", kto_lines())),
        "output_dir": str(out), "max_steps": 12, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
        "beta": 0.5, "lr_scheduler_type": "constant", "logging_steps": 1, "save_steps": 100, "max_length": 128,
        "lora_dropout": 0.0, "report_to": "none",
    })
    losses = [row["loss"] for row in rows_with(out, "loss")]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(0.5)  # 1 - sigmoid(0): policy == reference before the first update
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first / 2, losses
    margins = [row["rewards/margins"] for row in rows_with(out, "rewards/margins")]  # batches with both labels
    assert margins[0] == 0 and min(margins[-3:]) > 1, margins


def test_preference_file_trains_through_the_kto_stage_as_twice_as_many_examples(options, tmp_path):
    pairs = write_jsonl(tmp_path / "data" / "pairs.jsonl", pair_lines())
    metrics = run_kto({**options, "train_file_dir": str(pairs)})
    assert metrics["kto_from_pairs"] == len(QUESTIONS)
    assert metrics["kto_desirable"] == metrics["kto_undesirable"] == len(QUESTIONS)
    assert metrics["global_step"] == 2


def test_kto_run_leaves_adapter_config_metrics_reward_plot_card_and_results(options, tmp_path):
    out = tmp_path / "out"
    metrics = run_kto({**options, "max_steps": 3, "validation_split_percentage": 25, "eval_strategy": "no"})
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "run_config.yaml", "metrics.jsonl", "loss.png", "rewards.png", "eval_rewards.png", "README.md",
                 "train_results.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists()

    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["stage"] == "kto" and saved["beta"] == 0.1
    assert build_config(get_stage("kto"), saved).training.max_steps == 3

    assert [row["step"] for row in rows_with(out, "loss")] == [1, 2, 3]
    assert {"rewards/chosen", "rewards/rejected", "kl"} <= set(rows_with(out, "loss")[0])
    results = json.loads((out / "train_results.json").read_text())
    assert results == json.loads(json.dumps(metrics, default=str))
    assert results["kto_kept"] + results["kto_prompt_truncated"] + results["kto_reply_truncated"] > 0
    assert results["kto_dropped"] == 0 and results["global_step"] == 3
    assert "eval_loss" in results and "eval_rewards/chosen" in results
    assert "kto" in (out / "README.md").read_text()


def test_long_examples_are_truncated_and_counted_not_dropped(options, tmp_path):
    long_prompt = " ".join(["Describe the symptoms in detail."] * 40)
    rows = [{"prompt": long_prompt if i % 2 else q, "completion": a, "label": bool(i % 3)}
            for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]
    metrics = run_kto({**options, "train_file_dir": str(write_jsonl(tmp_path / "long.jsonl", rows)),
                       "max_length": 64})
    assert metrics["kto_prompt_truncated"] == 4 and metrics["kto_dropped"] == 0


def test_resumed_kto_run_equals_the_uninterrupted_run(options, tmp_path):
    assert_resume_parity("kto", {**options, "seed": 7}, tmp_path, steps=4, every=2)


def test_merge_folds_the_kto_adapter_into_full_weights(options, tmp_path):
    from transformers import AutoModelForCausalLM

    from medgpt.models.merge import merge_adapter

    run_kto(options)
    merged = merge_adapter(tmp_path / "out", tmp_path / "merged")
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(merged)


# ------------------------------------------------------------------------------------------------ reference


def first_step_rewards(output: Path) -> tuple[float, float, float]:
    row = rows_with(output, "rewards/chosen")[0]
    return row["rewards/chosen"], row["rewards/rejected"], row["kl"]


def test_reference_of_a_new_adapter_is_the_base_with_the_adapter_disabled(options, tmp_path, monkeypatch):
    seen = {}
    original = kto_stage.use_disabled_adapter_as_reference

    def spy(trainer, config):
        original(trainer, config)
        seen["adapters"] = set(trainer.model.peft_config)

    monkeypatch.setattr(kto_stage, "use_disabled_adapter_as_reference", spy)
    run_kto({**options, "max_steps": 1})
    assert seen["adapters"] == {"default"}  # no second ("ref") adapter
    assert first_step_rewards(tmp_path / "out") == (0.0, 0.0, 0.0)  # before the first update, policy == reference


def test_full_training_uses_a_frozen_copy_as_reference(options, tmp_path):
    out = tmp_path / "out"
    run_kto({**options, "use_peft": False, "max_steps": 2})
    assert first_step_rewards(out) == (0.0, 0.0, 0.0)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    second = rows_with(out, "rewards/chosen")[1]
    assert second["rewards/chosen"] != 0.0  # the frozen copy did not move with the policy


def test_unmerged_sft_adapter_trains_on_with_its_frozen_copy_as_reference(options, tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sft = tmp_path / "sft-adapter"
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(options["model_name_or_path"]),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(sft)  # a non-zero adapter: disabling it would not give the SFT policy
    tokenizer.save_pretrained(sft)

    out = tmp_path / "out"
    run_kto({**options, "model_name_or_path": str(sft)})
    assert first_step_rewards(out) == (0.0, 0.0, 0.0)  # the reference is the SFT policy, not the bare base
    # The SFT adapter trained on: the output is an adapter of the original base, without the "ref" copy.
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == options["model_name_or_path"]
    assert not (out / "ref").exists()


def test_unmerged_adapter_start_refuses_peft_path(options, tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sft = tmp_path / "sft-adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(options["model_name_or_path"]),
                   LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(sft)
    with pytest.raises(ConfigError, match="give the adapter once"):
        run_kto({**options, "model_name_or_path": str(sft), "peft_path": str(sft)})
