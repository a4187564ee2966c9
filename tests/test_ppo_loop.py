"""The RL loop's bookkeeping on tiny models: gradient-accumulation groups, rewards that do not apply, no
reference pass without a KL term, minibatches trimmed to their rows, the critic's own learning rate and
warm-up, critic-free estimators learning a rule reward, and held-out evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medgpt.report import read_metrics
from medgpt.rl.experience import Experience, rollout_batch
from medgpt.rl.scoring import Replies, RewardFunction, combine
from test_ppo import QUESTION, one_thread, ppo_options, run_ppo, sharp_model_dir, write_questions, write_rule  # noqa: F401
from test_ppo_roles import make_trainer

pytestmark = pytest.mark.usefixtures("private_cache")


def gradients(network) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in network.named_trainable if p.grad is not None}


def test_a_short_accumulation_group_weighs_as_much_as_a_full_one(ppo_options):
    """3 minibatches, gradient_accumulation_steps 2: steps over {1, 2} and {3}; the lone third minibatch used to
    be scaled by 1/2."""
    trainer, _ = make_trainer({**ppo_options, "rollout_batch_size": 3, "per_device_train_batch_size": 1,
                               "gradient_accumulation_steps": 2})
    torch.manual_seed(0)
    exp, _, _ = trainer.make_experience(trainer.batch_indices(1))
    seen, steps = [], []
    loss = trainer.minibatch_loss

    def record_loss(part, scale, train_actor):
        seen.append((part, scale))
        return loss(part, scale, train_actor)

    def record_step(train_actor):  # keep the weights where they are: every gradient is taken at one point
        steps.append((list(seen), gradients(trainer.network)))
        seen.clear()
        trainer.optimizer.zero_grad(set_to_none=True)

    trainer.minibatch_loss, trainer.optimizer_step = record_loss, record_step
    trainer.update(exp)
    assert [len(parts) for parts, _ in steps] == [2, 1]
    assert [scale for parts, _ in steps for _, scale in parts] == [0.5, 0.5, 1.0]
    for parts, got in steps:
        expected: dict[str, torch.Tensor] = {}
        for part, _ in parts:
            loss(part, 1.0, True)
            for name, grad in gradients(trainer.network).items():
                expected[name] = expected.get(name, 0) + grad / len(parts)
            trainer.optimizer.zero_grad(set_to_none=True)
        assert got.keys() == expected.keys()
        assert all(torch.allclose(got[n], expected[n], atol=1e-7) for n in got)


def test_rewards_that_do_not_apply_are_left_out_not_counted_as_zero(ppo_options, tmp_path):
    first = RewardFunction("a", 1.0, lambda replies: [1.0, None, None])
    second = RewardFunction("b", 0.5, lambda replies: [None, 2.0, None])
    replies = Replies([None] * 3, [[1]] * 3, [[2]] * 3, ["x"] * 3)
    total, valid, parts = combine([first, second], replies)
    assert total.tolist() == [1.0, 1.0, 0.0] and valid.tolist() == [True, True, False]
    assert parts == {"reward_a": 1.0, "reward_b": 2.0}  # means where each applies (they were 1/3 and 2/3)

    rule = tmp_path / "skip.py"
    rule.write_text("def reward(completion_ids, reference, **columns):\n"
                    "    return [None if r == 'skip' else 1.0 for r in reference]\n")
    questions = tmp_path / "qa.jsonl"
    questions.write_text("".join(json.dumps({"question": f"Question {i}?", "answer": "skip" if i % 2 else "x"}) + "\n"
                                 for i in range(8)))
    trainer, _ = make_trainer({**ppo_options, "train_file_dir": str(questions), "reward_funcs": f"{rule}:reward"})
    indices = trainer.batch_indices(1)
    exp, stats, _ = trainer.make_experience(indices)
    skipped = torch.tensor([trainer.prompts[i].reference == "skip" for i in indices])
    assert 0 < skipped.sum() < len(indices)
    assert exp.mask[skipped].sum() == 0 and exp.mask[~skipped].sum() > 0  # those replies do not train
    assert exp.advantages[skipped].abs().sum() == 0
    assert stats["reward"] == 1.0  # the mean over replies a reward applies to (a None counted 0 gave 0.5)


def test_without_a_kl_term_no_reference_pass_runs_and_full_training_keeps_no_copy(ppo_options, tmp_path):
    trainer, _ = make_trainer({**ppo_options, "kl_coef": 0.0})
    calls = []
    reference = trainer.network.reference_logprobs
    trainer.network.reference_logprobs = lambda *a, **k: calls.append(1) or reference(*a, **k)
    stats, _ = trainer.train_step()
    assert not calls and "kl" not in stats
    trainer, job = make_trainer({**ppo_options, "kl_coef": 0.0, "use_peft": False, "advantage_estimator": "grpo",
                                 "num_samples_per_prompt": 2, "output_dir": str(tmp_path / "full")})
    assert trainer.network.backbone is None and job.stats["roles_memory_over_base"] == pytest.approx(1.0)
    trainer, _ = make_trainer({**ppo_options, "output_dir": str(tmp_path / "kl")})
    trainer.network.reference_logprobs = lambda *a, **k: calls.append(1) or reference(*a, **k)
    assert "kl" in trainer.train_step()[0] and calls


def test_minibatches_are_trimmed_to_their_own_longest_prompt_and_reply():
    prompts, replies = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]], [[20], [21, 22, 23, 24], [25, 26]]
    batch, tokens, mask = rollout_batch(prompts, replies, 0, "cpu")
    zeros = torch.zeros_like(mask)
    exp = Experience(batch, tokens, mask, zeros + 1, None, zeros + 2, zeros + 3, zeros + 4)
    part = exp.minibatch(torch.tensor([2, 0]))  # prompts of 3 and 6 tokens, replies of 2 and 1
    assert part.batch["input_ids"].shape == (2, 6 + 2) and part.responses.shape == (2, 2)
    assert part.batch["input_ids"][0].tolist() == [0, 0, 0, 9, 10, 11, 25, 26]
    assert part.mask.tolist() == [[1, 1], [1, 0]] and part.values.shape == (2, 2)
    short = exp.minibatch(torch.tensor([1, 2]))  # the 6-token prompt is not among them: 3 columns go
    assert short.batch["input_ids"].shape == (2, 3 + 4)
    assert short.batch["position_ids"][0].tolist() == [0, 0, 1, 2, 3, 4, 5]  # positions count real tokens


def test_the_critic_has_its_own_learning_rate_and_warms_up_while_the_actor_stays(ppo_options):
    trainer, _ = make_trainer({**ppo_options, "learning_rate": 1e-3, "critic_learning_rate": 5e-3,
                               "critic_warmup_steps": 1})
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 5e-3]
    actor = {n: p.detach().clone() for n, p in trainer.network.actor_named}
    critic = {n: p.detach().clone() for n, p in trainer.network.critic_named}
    stats, _ = trainer.train_step()
    assert all(torch.equal(p, actor[n]) for n, p in trainer.network.actor_named)
    assert any(not torch.equal(p, critic[n]) for n, p in trainer.network.critic_named)
    assert "policy_loss" not in stats and "value_loss" in stats and "explained_variance" in stats
    stats, _ = trainer.train_step()
    assert any(not torch.equal(p, actor[n]) for n, p in trainer.network.actor_named)
    assert "policy_loss" in stats


@pytest.mark.parametrize("estimator", ["reinforce_pp"])  # grpo and rloo: tests/test_grpo.py
def test_critic_free_estimators_learn_a_rule_reward_without_a_critic(estimator, sharp_model_dir, tokenizer, tmp_path):
    from transformers import LlamaForCausalLM

    from medgpt.data.records import Message
    from medgpt.data.templates import ChatFormat

    prompt = ChatFormat(tokenizer).prompt_ids([Message("user", QUESTION)])
    with torch.no_grad():
        first = LlamaForCausalLM.from_pretrained(sharp_model_dir)(torch.tensor([prompt])).logits[0, -1].softmax(-1)
    target = first.topk(2).indices[1].item()
    out = tmp_path / "out"
    run_ppo({"model_name_or_path": str(sharp_model_dir), "output_dir": str(out),
             "train_file_dir": str(write_questions(tmp_path / "qa.jsonl", [QUESTION] * 8)),
             "reward_funcs": write_rule(tmp_path / "rule.py", f"float({target} in ids)"),
             "advantage_estimator": estimator, "num_samples_per_prompt": 4, "max_steps": 14, "rollout_batch_size": 4,
             "per_device_train_batch_size": 8, "ppo_epochs": 2, "max_new_tokens": 6, "learning_rate": 5e-4,
             "kl_coef": 0.02, "lora_dropout": 0.0, "save_strategy": "no"})
    rows = read_metrics(out / "metrics.jsonl")
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[:3]) / 3 < 0.4 and sum(rewards[-3:]) / 3 > 0.75, rewards
    assert all("value_loss" not in r and "kl" in r for r in rows)
    assert json.loads((out / "train_results.json").read_text())["advantage_estimator"] == estimator
    if estimator != "reinforce_pp":
        assert all("zero_advantage_groups" in r for r in rows)


def test_held_out_prompts_are_scored_every_eval_steps_and_the_end_is_judged_against_the_start(ppo_options, tmp_path):
    heldout = write_questions(tmp_path / "heldout.jsonl", [f"Held-out question {i}?" for i in range(3)])
    out = Path(ppo_options["output_dir"])
    metrics = run_ppo({**ppo_options, "validation_file_dir": str(heldout), "eval_steps": 1, "max_steps": 2})
    rows = read_metrics(out / "metrics.jsonl")
    evaluated = [r for r in rows if "eval_reward" in r]
    assert [r["step"] for r in evaluated] == [0, 1, 2]
    assert all(r["eval_response_length"] > 0 and "eval_kl" in r for r in evaluated)
    assert evaluated[0]["eval_kl"] == pytest.approx(0, abs=1e-5) and evaluated[-1]["eval_kl"] != 0
    assert metrics["eval_wins"] + metrics["eval_losses"] + metrics["eval_ties"] == 3
    assert 0 <= metrics["eval_win_rate_vs_start"] <= 1 and "trained against" not in metrics["eval_win_judge"]
    assert (out / "ppo_eval.png").is_file()
    assert len((out / "eval_start_replies_rank0.jsonl").read_text().splitlines()) == 3


def test_the_gae_defaults_benchmark_runs_in_tiny_mode(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ppo_gae_defaults.py"), "--tiny", "--output",
                          str(tmp_path / "gae.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("best=lam1.0 lam1.0=")
    assert len(json.loads((tmp_path / "gae.json").read_text())["curves"]["lam1.0"][0]) == 2
