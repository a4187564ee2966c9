"""GRPO and RLOO on tiny random Llamas: a run leaves the usual outputs, the reward rises on a rule reward, every
option reaches TRL's trainer, prompts go through our template, zero-variance groups are counted and explained,
the reward model serves as a reward, resume continues the run, and the adapter merges."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import medgpt.stages.grpo as grpo
from conftest import DEMO
from medgpt.config import ConfigError, build_config
from medgpt.data.records import Message
from medgpt.report import read_metrics
from medgpt.rl import trl_prompts
from medgpt.rl.trl_prompts import decode_conversation
from medgpt.stages import get_stage

pytestmark = pytest.mark.usefixtures("private_cache")
QUESTIONS = ["What is a fever?", "Where is the liver?", "What does insulin do?", "What is asthma?"]


def write_qa(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_stage(stage: str, options: dict) -> dict:
    spec = get_stage(stage)
    return spec.run(build_config(spec, dict(options)))


def setup_stage(stage: str, options: dict):
    return grpo.setup(build_config(get_stage(stage), dict(options)))


def logged(output: Path, key: str) -> list[float]:
    return [row[key] for row in read_metrics(output / "metrics.jsonl") if key in row]


@pytest.fixture
def options(tmp_path, tiny_model_dir) -> dict:
    return {
        "model_name_or_path": str(tiny_model_dir),
        "train_file_dir": str(DEMO / "grpo"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 6,
        "logging_steps": 1,
        "save_steps": 100,
        "learning_rate": 1e-3,
        "lora_dropout": 0.0,
        "report_to": "none",
    }


def user_reward(tmp_path: Path, body: str, name: str = "rule") -> str:
    """A reward function in a file, named the way a config names it (path.py:function)."""
    path = tmp_path / f"{name}_reward.py"
    path.write_text(f"def {name}(completions, completion_ids, **kwargs):\n    {body}\n", encoding="utf-8")
    return f"{path}:{name}"


# ------------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_run_leaves_adapter_metrics_reward_plots_and_group_counts(options, tmp_path, stage):
    metrics = run_stage(stage, {**options, "reward_funcs": "answer_f1,length_penalty,format_reward",
                                "reward_weights": [1.0, 0.5, 0.2]})
    out = tmp_path / "out"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "run_config.yaml", "metrics.jsonl", "loss.png", "reward.png", "length.png", "README.md",
                 "train_results.json"):
        assert (out / name).is_file(), name
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("rewards/answer_f1/mean", "rewards/length_penalty/mean", "rewards/format_reward/mean",
                "zero_std_groups", "frac_reward_zero_std", "completions/mean_length"):
        assert all(math.isfinite(r[key]) for r in rows), key
    for r in rows:  # the logged reward is the weighted sum of the functions' means
        weighted = r["rewards/answer_f1/mean"] + 0.5 * r["rewards/length_penalty/mean"] \
            + 0.2 * r["rewards/format_reward/mean"]
        assert r["reward"] == pytest.approx(weighted, abs=1e-5)
    saved = json.loads((out / "train_results.json").read_text())
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in (DEMO / "grpo").glob("*.jsonl"))
    assert saved["global_step"] == 2 and saved["groups"] == 2 and saved["prompts"] == lines
    assert saved["reward_funcs"] == ["answer_f1", "length_penalty", "format_reward"]
    assert metrics["zero_std_groups"] == sum(logged(out, "zero_std_groups"))


# ------------------------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_mean_reward_rises_on_a_rule_reward(tmp_path, learnable_model_dir, stage):
    """Reward: the share of completion tokens whose embedding has a positive first coordinate (half the vocabulary,
    so every group has reward variance); the policy learns to prefer those tokens within ten steps."""
    from transformers import AutoModelForCausalLM

    embeddings = AutoModelForCausalLM.from_pretrained(learnable_model_dir).get_input_embeddings().weight
    wanted = (embeddings[:, 0] > 0).nonzero().flatten().tolist()
    (tmp_path / "wanted.json").write_text(json.dumps(wanted))
    body = (f"wanted = set(__import__('json').load(open({str(tmp_path / 'wanted.json')!r})))\n"
            "    return [sum(t in wanted for t in ids) / len(ids) for ids in completion_ids]")
    data = write_qa(tmp_path / "qa.jsonl", [{"question": q, "answer": "x"} for q in QUESTIONS[:2]])
    run_stage(stage, {
        "model_name_or_path": str(learnable_model_dir), "train_file_dir": str(data),
        "output_dir": str(tmp_path / "out"), "reward_funcs": user_reward(tmp_path, body), "max_steps": 10,
        "per_device_train_batch_size": 8, "num_generations": 8, "max_completion_length": 4, "beta": 0.0,
        "top_k": 0, "learning_rate": 5e-2, "lr_scheduler_type": "constant", "lora_dropout": 0.0,
        "logging_steps": 1, "save_steps": 100, "report_to": "none",
        "bf16": False})  # the 0.15 margin is seed-marginal (fp32 seed 1 misses it too); bf16 moves the sampling
    reward = logged(tmp_path / "out", "reward")
    assert len(reward) == 10
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.15, reward


# ------------------------------------------------------------------------------------------------ options


def test_options_reach_trls_trainer(options):
    trainer, job, _ = setup_stage("grpo", {
        **options, "num_generations": 2, "beta": 0.04, "epsilon": 0.3, "epsilon_high": 0.28, "loss_type": "dr_grpo",
        "max_completion_length": 12, "temperature": 0.7, "scale_rewards": "batch", "num_iterations": 2,
        "reward_funcs": ["answer_recall", "choice_match"], "reward_weights": [2.0, 1.0]})
    assert trainer.num_generations == 2 and trainer.beta == 0.04 and trainer.loss_type == "dr_grpo"
    assert trainer.epsilon_low == 0.3 and trainer.epsilon_high == 0.28 and trainer.num_iterations == 2
    assert trainer.max_completion_length == 12 and trainer.temperature == 0.7 and trainer.scale_rewards == "batch"
    assert trainer.reward_func_names == ["answer_recall", "choice_match"]
    assert trainer.reward_weights.tolist() == [2.0, 1.0]
    assert trainer.args.activation_checkpointing is False  # TRL's default is on; ours decides

    trainer, _, _ = setup_stage("rloo", {**options, "beta": 0.1, "normalize_advantages": True,
                                         "reward_clip_range": [-1, 1], "overwrite_output_dir": True})
    assert trainer.beta == 0.1 and trainer.normalize_advantages and tuple(trainer.reward_clip_range) == (-1, 1)
    assert trainer.reward_func_names == ["answer_f1"]  # the default without a reward model
    with pytest.raises(ConfigError, match="loss_type"):
        build_config(get_stage("rloo"), {**options, "loss_type": "dapo"})  # RLOO has one loss


def test_prompts_are_rendered_by_our_template_with_tools_and_stop_at_end_of_turn(options, tmp_path):
    tools = [{"name": "calculate_bmi", "description": "BMI from weight and height", "parameters": {}}]
    rows = [{"conversations": [{"from": "system", "value": "You are a nurse."},
                               {"from": "human", "value": "My BMI? 70 kg, 1.75 m"}, {"from": "gpt", "value": "22.9"}],
             "tools": json.dumps(tools)},
            {"question": "What is asthma?", "answer": "A chronic airway disease"},
            {"question": "Which organ makes bile?", "options": {"A": "Liver", "B": "Kidney"}, "answer": "A"}]
    for i, row in enumerate(rows):
        write_qa(tmp_path / "data" / f"{i}.jsonl", [row])
    trainer, job, _ = setup_stage("grpo", {**options, "train_file_dir": str(tmp_path / "data")})
    chat = job.chat_format
    inputs = [trainer.train_dataset[i] for i in range(3)]
    assert [r["reference"] for r in inputs] == ["22.9", "A chronic airway disease", "A"]
    assert [r["reference_kind"] for r in inputs] == ["text", "text", "choice"]
    trainer._batch_conversations = [decode_conversation(r["conversation"]) for r in inputs]
    ids, _, _ = trainer._tokenize_prompts([r["prompt"] for r in inputs])
    system, user = Message("system", "You are a nurse."), Message("user", "My BMI? 70 kg, 1.75 m")
    assert ids[0] == chat.prompt_ids([system, user], tools)
    assert "calculate_bmi" in job.tokenizer.decode(ids[0])  # the tool definitions are in the prompt
    assert ids[2] == chat.prompt_ids([Message("user", "Which organ makes bile?\nA. Liver\nB. Kidney")])
    im_end = job.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in trainer.eos_token_ids


def test_unknown_or_inconsistent_rewards_are_refused_before_loading(options, monkeypatch, tmp_path):
    monkeypatch.setattr(trl_prompts, "load_tokenizer", lambda *a, **k: pytest.fail("loaded a tokenizer"))
    cases = [({"reward_funcs": "accuracy"}, "not one of"),
             ({"reward_funcs": "reward_model"}, "set reward_model_name_or_path"),
             ({"reward_model_name_or_path": str(tmp_path), "reward_funcs": "answer_f1"}, "lacks reward_model"),
             ({"reward_funcs": "answer_f1,format_reward", "reward_weights": [1.0]}, "one weight per function"),
             ({"reward_funcs": "length_penalty", "length_penalty_start": 6}, "length_penalty_start")]
    for bad, match in cases:
        with pytest.raises(ConfigError, match=match):
            setup_stage("grpo", {**options, **bad})
    with pytest.raises(ValueError, match="has no function"):
        setup_stage("grpo", {**options, "reward_funcs": user_reward(tmp_path, "return []") + "_typo"})


# ------------------------------------------------------------------------------------------------ zero variance


def test_groups_with_one_reward_for_all_completions_are_counted_and_explained(options, tmp_path, caplog):
    constant = user_reward(tmp_path, "return [1.0] * len(completions)", "constant")
    metrics = run_stage("grpo", {**options, "reward_funcs": constant})
    out = tmp_path / "out"
    assert logged(out, "zero_std_groups") == [1, 1] and logged(out, "loss") == [0.0, 0.0]
    assert metrics["zero_std_groups"] == metrics["groups"] == 2
    assert "1 of 1 prompt groups got the same reward for all 4 completions" in caplog.text
    assert "loss is exactly 0" in caplog.text


# ------------------------------------------------------------------------------------------------ reward model


def test_reward_model_scores_completions_as_a_reward(options, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.5)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    run_stage("grpo", {**options, "max_steps": 1, "reward_model_name_or_path": str(tmp_path / "rm")})
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert rows[0]["rewards/reward_model/std"] > 0  # real scores of different completions
    assert rows[0]["reward"] == pytest.approx(rows[0]["rewards/reward_model/mean"])


# ------------------------------------------------------------------------------------------------ reference


def test_reference_is_the_stage_start_policy(options, tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    trainer, _, _ = setup_stage("grpo", {**options, "beta": 0.1})
    assert "ref" not in trainer.model.peft_config  # a new adapter: the reference is the model with it disabled

    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    sft.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    trainer, _, _ = setup_stage("grpo", {**options, "beta": 0.1, "model_name_or_path": str(tmp_path / "sft"),
                                         "overwrite_output_dir": True})
    assert set(trainer.model.peft_config) == {"default", "ref"}  # a frozen copy of the SFT adapter
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".ref." in n)


# ------------------------------------------------------------------------------------------------ resume, merge


def test_resume_continues_from_the_last_checkpoint_and_the_adapter_merges(options, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medgpt.models.merge import merge_adapter

    run_stage("grpo", {**options, "max_steps": 1, "save_steps": 1})
    out = tmp_path / "out"
    metrics = run_stage("grpo", {**options, "save_steps": 1, "resume_from_checkpoint": "auto"})
    assert metrics["global_step"] == 2 and metrics["groups"] == 1  # this run generated for step 2 only
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "reward" in r] == [1, 2]

    merged = merge_adapter(out, tmp_path / "merged")
    ids = torch.tensor([[1, 2, 3, 4]])
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(options["model_name_or_path"]), out)
    with torch.no_grad():
        expected = adapter.eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.slow
def test_grpo_runs_on_the_embedded_model(embedded_dir, tmp_path):
    metrics = run_stage("grpo", {
        "model_name_or_path": "smollm2-135m", "train_file_dir": str(DEMO / "grpo"), "output_dir": str(tmp_path / "out"),
        "max_steps": 1, "per_device_train_batch_size": 2, "num_generations": 2, "max_completion_length": 8,
        "reward_funcs": "answer_f1,length_penalty", "logging_steps": 1, "save_steps": 100, "report_to": "none"})
    assert metrics["global_step"] == 1
    assert all(math.isfinite(v) for v in logged(tmp_path / "out", "reward"))
