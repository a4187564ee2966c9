"""GRPO and RLOO — our RL loop with its group estimators — on tiny random Llamas: a run leaves the usual
outputs, the reward rises on a rule reward, the options are the loop's (TRL's names are refused), prompts go
through our template, zero-advantage groups are counted and explained, a reward model serves as a reward, the
reference is the start policy, resume continues the run and the adapter merges."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import DEMO
from medgpt.config import ConfigError, build_config
from medgpt.data.records import Message
from medgpt.report import read_metrics
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
    from medgpt.rl.recipe import setup

    return setup(build_config(get_stage(stage), dict(options)))


def logged(output: Path, key: str) -> list[float]:
    return [row[key] for row in read_metrics(output / "metrics.jsonl") if key in row]


@pytest.fixture
def options(tmp_path, tiny_model_dir) -> dict:
    return {
        "model_name_or_path": str(tiny_model_dir),
        "train_file_dir": str(DEMO / "grpo"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "rollout_batch_size": 1,
        "num_samples_per_prompt": 4,
        "per_device_train_batch_size": 4,
        "max_new_tokens": 6,
        "logging_steps": 1,
        "save_steps": 100,
        "learning_rate": 1e-3,
        "lora_dropout": 0.0,
    }


def user_reward(tmp_path: Path, body: str, name: str = "rule") -> str:
    """A reward function in a file, named the way a config names it (path.py:function)."""
    path = tmp_path / f"{name}_reward.py"
    path.write_text(f"def {name}(completions, completion_ids, **kwargs):\n    {body}\n", encoding="utf-8")
    return f"{path}:{name}"


# ------------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_run_leaves_adapter_metrics_reward_plots_and_group_counts(options, tmp_path, stage):
    run_stage(stage, {**options, "reward_funcs": "answer_f1,length_penalty,format_reward",
                      "reward_weights": [1.0, 0.5, 0.2]})
    out = tmp_path / "out"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "run_config.yaml", "metrics.jsonl", "loss.png", f"{stage}.png", f"{stage}_losses.png", "README.md",
                 "train_results.json", "rollouts.jsonl"):
        assert (out / name).is_file(), name
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_answer_f1", "reward_length_penalty", "reward_format_reward", "zero_advantage_groups",
                "response_length", "policy_loss", "entropy"):
        assert all(math.isfinite(r[key]) for r in rows), key
    for r in rows:  # the logged reward is the weighted sum of the functions' means (every function applies)
        weighted = r["reward_answer_f1"] + 0.5 * r["reward_length_penalty"] + 0.2 * r["reward_format_reward"]
        assert r["reward"] == pytest.approx(weighted, abs=1e-6)
        assert "value_loss" not in r and ("kl" in r) == (stage == "rloo")  # grpo: kl_coef 0, no reference pass
    saved = json.loads((out / "train_results.json").read_text())
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in (DEMO / "grpo").glob("*.jsonl"))
    assert saved["global_step"] == 2 and saved["prompts"] == lines and saved["advantage_estimator"] == stage
    assert saved["reward_funcs"] == ["answer_f1", "length_penalty", "format_reward"]


# ------------------------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_mean_reward_rises_on_a_rule_reward(tmp_path, learnable_model_dir, stage):
    """Reward: the share of reply tokens whose embedding has a positive first coordinate (half the vocabulary,
    so every group has reward variance); the policy learns to prefer those tokens within ten steps (2 prompts x 8
    replies of 4 tokens a step: enough tokens that the rise stands out of the sampling noise)."""
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
        "rollout_batch_size": 2, "num_samples_per_prompt": 8, "per_device_train_batch_size": 16, "max_new_tokens": 4,
        "kl_coef": 0.0, "learning_rate": 5e-2, "lr_scheduler_type": "constant", "lora_dropout": 0.0,
        "logging_steps": 1, "save_steps": 100,
        "bf16": False})  # learning margins measured in fp32 (auto is bf16 on bf16 CPUs, which moves the sampling)
    reward = logged(tmp_path / "out", "reward")
    assert len(reward) == 10
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.15, reward


# ------------------------------------------------------------------------------------------------ options


def test_the_stages_are_presets_of_the_rl_loop_and_trls_option_names_are_refused(options):
    trainer, job, _ = setup_stage("grpo", {**options, "num_samples_per_prompt": 2, "kl_coef": 0.04,
                                           "per_device_train_batch_size": 2,
                                           "cliprange": 0.3, "temperature": 0.7, "ppo_epochs": 2,
                                           "reward_funcs": ["answer_recall", "choice_match"],
                                           "reward_weights": [2.0, 1.0]})
    assert trainer.group_size == 2 and trainer.kl.value == 0.04 and trainer.use_reference
    assert trainer.ppo.cliprange == 0.3 and trainer.sampling.temperature == 0.7 and trainer.ppo.ppo_epochs == 2
    assert [(r.name, r.weight) for r in trainer.rewards] == [("answer_recall", 2.0), ("choice_match", 1.0)]
    assert not trainer.network.has_critic and trainer.network.critic_named == []

    trainer, _, _ = setup_stage("rloo", {**options, "overwrite_output_dir": True})
    assert trainer.ppo.advantage_estimator == "rloo" and trainer.kl.value == 0.05
    assert [r.name for r in trainer.rewards] == ["answer_f1"]  # the default without a reward model
    for trl_name in ("num_generations", "beta", "max_completion_length", "loss_type"):
        with pytest.raises(ConfigError, match=f"(?s)unknown option.*{trl_name}"):
            build_config(get_stage("grpo"), {**options, trl_name: 2})
    for bad, match in (({"lam": 0.9}, "trains no critic"), ({"num_samples_per_prompt": 1, "per_device_train_batch_size": 1}, ">= 2"),
                       ({"gamma": 0.9}, "gamma does not apply"), ({"critic_init": "zero"}, "trains no critic")):
        with pytest.raises(ConfigError, match=match):
            setup_stage("grpo", {**options, **bad})


def test_sample_prompts_sets_how_many_prompts_the_final_policy_answers(options):
    counts = [len(setup_stage("grpo", {**options, "overwrite_output_dir": True, **extra})[1].sample_prompts)
              for extra in ({}, {"sample_prompts": 1}, {"sample_prompts": 0})]
    assert counts == [3, 1, 0]
    with pytest.raises(ConfigError, match="sample_prompts -1"):
        setup_stage("grpo", {**options, "sample_prompts": -1})
    with pytest.raises(ConfigError, match="sample_prompts under sharding"):  # only rank 0 would generate
        setup_stage("grpo", {**options, "sample_prompts": 2, "fsdp": "full_shard", "fsdp_config": {"version": 2}})


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
    by_reference = {p.reference: (p, ids) for p, ids in zip(trainer.prompts, trainer.prompt_ids)}
    assert {p.reference_kind for p, _ in by_reference.values()} == {"text", "choice"}
    prompt, ids = by_reference["22.9"]
    system, user = Message("system", "You are a nurse."), Message("user", "My BMI? 70 kg, 1.75 m")
    assert ids == chat.prompt_ids([system, user], tools)
    assert "calculate_bmi" in job.tokenizer.decode(ids)  # the tool definitions are in the prompt
    assert by_reference["A"][1] == chat.prompt_ids([Message("user", "Which organ makes bile?\nA. Liver\nB. Kidney")])
    assert job.tokenizer.convert_tokens_to_ids("<|im_end|>") in trainer.stop_ids


def test_unknown_or_inconsistent_rewards_are_refused_before_loading(options, monkeypatch, tmp_path):
    import medgpt.rl.recipe as recipe

    monkeypatch.setattr(recipe, "load_tokenizer", lambda *a, **k: pytest.fail("loaded a tokenizer"))
    cases = [({"reward_funcs": "accuracy"}, "not one of"),
             ({"reward_funcs": "reward_model"}, "go together"),
             ({"reward_model_name_or_path": str(tmp_path), "reward_funcs": "answer_f1"}, "go together"),
             ({"reward_funcs": "answer_f1,format_reward", "reward_weights": [1.0]}, "one weight per reward"),
             ({"reward_funcs": "length_penalty", "length_penalty_start": 6}, "length_penalty_start"),
             ({"reward_funcs": "answer_f1", "format_pattern": "x"}, "format_reward")]
    for bad, match in cases:
        with pytest.raises(ConfigError, match=match):
            setup_stage("grpo", {**options, **bad})
    with pytest.raises(ValueError, match="has no function"):
        setup_stage("grpo", {**options, "reward_funcs": user_reward(tmp_path, "return []") + "_typo"})


# ------------------------------------------------------------------------------------------------ zero variance


def test_groups_with_one_reward_for_all_replies_are_counted_and_explained(options, tmp_path, caplog):
    constant = user_reward(tmp_path, "return [1.0] * len(completions)", "constant")
    run_stage("grpo", {**options, "reward_funcs": constant})
    out = tmp_path / "out"
    assert logged(out, "zero_advantage_groups") == [1.0, 1.0]
    assert logged(out, "policy_loss") == [0.0, 0.0]
    assert "1 of 1 prompt groups got the same reward for all 4 replies" in caplog.text
    assert "loss is exactly 0" in caplog.text


# ------------------------------------------------------------------------------------------------ reward model


def test_reward_model_scores_replies_as_a_reward(options, tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.5)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    run_stage("grpo", {**options, "max_steps": 1, "reward_model_name_or_path": str(tmp_path / "rm")})
    (row,) = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert row["reward"] == pytest.approx(row["reward_reward_model"]) and row["zero_advantage_groups"] == 0.0


# ------------------------------------------------------------------------------------------------ reference


def test_reference_is_the_stage_start_policy(options, tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    trainer, _, _ = setup_stage("grpo", {**options, "kl_coef": 0.1})
    assert "ref" not in trainer.model.peft_config  # a new adapter: the reference is the model with it disabled

    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                         LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    sft.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    trainer, _, _ = setup_stage("grpo", {**options, "kl_coef": 0.1, "model_name_or_path": str(tmp_path / "sft"),
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
    assert metrics["global_step"] == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]

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
        "max_steps": 1, "rollout_batch_size": 1, "num_samples_per_prompt": 2, "per_device_train_batch_size": 2,
        "max_new_tokens": 8, "reward_funcs": "answer_f1,length_penalty", "logging_steps": 1, "save_steps": 100})
    assert metrics["global_step"] == 1
    assert all(math.isfinite(v) for v in logged(tmp_path / "out", "reward"))


def test_the_parity_benchmark_runs_both_trainers_in_tiny_mode(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grpo_parity.py"), "--tiny", "--output",
                          str(tmp_path / "parity.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fields = dict(pair.split("=") for pair in out.stdout.strip().splitlines()[-1].split())
    assert list(fields) == ["trl_final", "medgpt_final", "difference", "noise", "within_noise"]
    curves = json.loads((tmp_path / "parity.json").read_text())["curves"]
    assert [len(c[0]) for c in curves.values()] == [2, 2]  # two steps of each trainer, their own logged rewards
