"""The four roles of RLHF on one base: gradients under activation checkpointing equal those without, every
trainable tensor stays fp32 on a bf16 backbone, a LoRA reward model of the same base is mounted as an adapter
(memory, scores, critic initialisation), and any other reward model still works."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEMO, make_tiny_model
from medgpt.arguments import AdapterArguments, ModelArguments
from medgpt.config import build_config
from medgpt.data.records import Message
from medgpt.data.templates import ChatFormat
from medgpt.rl.actor_critic import ACTOR, CRITIC, ActorCritic, adapter_state
from medgpt.rl.reward_adapter import RewardAdapter, same_base
from medgpt.stages import get_stage
from test_ppo import one_thread, ppo_options  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("private_cache")


def make_trainer(options: dict):
    from medgpt.rl.recipe import setup

    trainer, job, _ = setup(build_config(get_stage("ppo"), dict(options)))
    return trainer, job


def perturb_trainable(network: ActorCritic, seed: int = 0) -> None:
    """Move every trainable tensor off its initialisation (a zero value head or LoRA B gives zero gradients)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in network.named_trainable:
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


# ------------------------------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("use_peft", [True, False])
def test_actor_and_critic_gradients_with_checkpointing_equal_those_without(ppo_options, tmp_path, use_peft):
    """Non-reentrant checkpointing recomputes each layer in the backward pass with whichever adapter is active
    then; the critic's gradients differed by ~450% when values() switched back to the actor before backward."""
    gradients, experience = {}, None
    for checkpointing in (False, True):
        trainer, _ = make_trainer({**ppo_options, "use_peft": use_peft, "gradient_checkpointing": checkpointing,
                                   "output_dir": str(tmp_path / f"out-{checkpointing}")})
        perturb_trainable(trainer.network)
        if experience is None:
            torch.manual_seed(0)
            experience, _, _ = trainer.make_experience(trainer.batch_indices(1))
        trainer.network.train()
        assert trainer.network.policy.is_gradient_checkpointing == checkpointing
        trainer.minibatch_loss(experience.minibatch(torch.arange(2)), 1.0, True)
        gradients[checkpointing] = {n: p.grad.clone() for n, p in trainer.network.named_trainable}
    critic = [n for n in gradients[True] if ".critic." in n]
    assert critic and any(gradients[False][n].abs().sum() > 0 for n in critic)
    for name, plain in gradients[False].items():
        assert torch.allclose(gradients[True][name], plain, rtol=1e-4, atol=1e-7), name


# ------------------------------------------------------------------------------------------------ precision


def test_bf16_backbone_keeps_trainable_tensors_fp32_and_its_value_head_learns_a_small_target(tiny_model_dir,
                                                                                           tokenizer):
    from medgpt.models.adapters import attach_adapter
    from medgpt.models.load import load_model

    args = AdapterArguments(lora_dropout=0.0)
    torch.manual_seed(0)
    policy = attach_adapter(load_model(ModelArguments(model_name_or_path=str(tiny_model_dir), torch_dtype="bf16"),
                                       tokenizer), args)
    network = ActorCritic.build(policy, args, use_peft=True, bf16=True)
    assert network.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in network.trainable)
    assert any(p.dtype == torch.bfloat16 for p in network.policy.get_base_model().parameters())
    with torch.no_grad():
        weight = torch.randn(network.value_head.weight.shape)  # a head of realistic size (as from a reward model)
        network.value_head.weight.copy_(weight.sign() * (0.02 + 0.05 * weight.abs()))
    bf16_head = copy.deepcopy(network.value_head).to(torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(6)[None]}
    with torch.no_grad(), network.autocast():
        start = network.values(batch, 3)
    target = start + 0.01  # a small correction, as late in training
    optimizer = torch.optim.AdamW([p for _, p in network.critic_named], lr=1e-5, weight_decay=0.0)
    bf16_optimizer = torch.optim.AdamW(bf16_head.parameters(), lr=1e-5, weight_decay=0.0)
    before = bf16_head.weight.detach().clone()
    for _ in range(30):
        with network.autocast():
            loss = ((network.values(batch, 3) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bf16_head.weight.grad = torch.ones_like(bf16_head.weight)  # any gradient: Adam's step is ~lr either way
        bf16_optimizer.step()
    with torch.no_grad(), network.autocast():
        end = network.values(batch, 3)
    assert (end - target).abs().mean() < 0.5 * (start - target).abs().mean()
    assert torch.equal(bf16_head.weight, before)  # what a bf16 head does: 30 steps of 1e-5 vanish in rounding


# ------------------------------------------------------------------------------------------------ reward model


@pytest.fixture(scope="module")
def reward_adapter_dir(tmp_path_factory, learnable_model_dir) -> Path:
    """A LoRA reward model trained (2 steps) on the learnable tiny Llama, as `medgpt rm` writes it."""
    out = tmp_path_factory.mktemp("rm")
    stage = get_stage("rm")
    stage.run(build_config(stage, {"model_name_or_path": str(learnable_model_dir), "output_dir": str(out),
                                   "train_file_dir": str(DEMO / "preference"), "max_steps": 2, "max_length": 128,
                                   "per_device_train_batch_size": 2, "report_to": "none", "save_strategy": "no",
                                   "learning_rate": 1e-2}))
    return out


def rm_options(ppo_options, reward_adapter_dir, tmp_path, **extra) -> dict:
    options = {key: value for key, value in ppo_options.items() if key != "reward_funcs"}
    return {**options, "reward_model_name_or_path": str(reward_adapter_dir), "output_dir": str(tmp_path / "out"),
            **extra}


def test_same_base_is_decided_by_path_or_by_config_and_weight_hashes(learnable_model_dir, tiny_model_dir, tmp_path):
    copied = tmp_path / "copy"
    shutil.copytree(learnable_model_dir, copied)
    assert same_base(str(learnable_model_dir), str(learnable_model_dir)) == (True, "the same directory")
    assert same_base(str(copied), str(learnable_model_dir)) == (True, "equal configs and weight hashes")
    shared, why = same_base(str(tiny_model_dir), str(learnable_model_dir))
    assert not shared and "differ" in why


def test_a_lora_reward_model_of_the_policy_base_is_mounted_on_it_and_scores_like_its_own_model(
        ppo_options, reward_adapter_dir, tmp_path, tokenizer):
    from medgpt.models.reward import RewardModelScorer

    # fp32 both ways: the mounted adapter must score as the reward model alone does, to rounding
    trainer, job = make_trainer(rm_options(ppo_options, reward_adapter_dir, tmp_path, bf16=False))
    network = trainer.network
    assert job.stats["reward_model_shares_base"] and job.stats["roles_memory_over_base"] < 1.15
    assert network.reward_head is not None and not any(p.requires_grad for p in network.reward_head.parameters())
    chat = ChatFormat(tokenizer)
    replies = ["A fever is a raised body temperature.", "Drink water and rest."]
    prompts = [trainer.prompts[0], trainer.prompts[1]]
    ids = [chat.tokenizer.encode(text, add_special_tokens=False) + chat.stop_token_ids()[:1] for text in replies]
    model_reward = next(r for r in trainer.rewards if r.name == "reward_model")
    from medgpt.rl.scoring import Replies

    shared = model_reward(Replies(prompts, [trainer.prompt_ids[0], trainer.prompt_ids[1]], ids, replies))
    alone = RewardModelScorer.load(str(reward_adapter_dir), torch_dtype="fp32").score(
        [[*p.messages, Message("assistant", r)] for p, r in zip(prompts, replies)])
    assert shared.tolist() == pytest.approx(alone, abs=1e-4)
    assert len(set(alone)) == 2  # a trained head: the two replies score differently
    reward = model_reward.fn  # the ModelReward
    assert reward.from_ids == 2 and reward.from_text == 0  # token ids scored directly, nothing re-tokenised


def test_the_critic_starts_from_the_reward_model_by_default_and_from_policy_or_zero_on_request(
        ppo_options, reward_adapter_dir, tmp_path, tokenizer):
    adapter, _ = RewardAdapter.find(str(reward_adapter_dir), ppo_options["model_name_or_path"], tokenizer)
    trainer, _ = make_trainer(rm_options(ppo_options, reward_adapter_dir, tmp_path))
    network = trainer.network
    assert network.critic_from_reward_model
    assert torch.equal(network.value_head.weight.detach(), adapter.head_weight.float())
    critic = adapter_state(network.backbone, CRITIC)
    assert critic.keys() == adapter.lora_state.keys()
    assert all(torch.equal(critic[k], adapter.lora_state[k]) for k in critic)

    trainer, _ = make_trainer(rm_options(ppo_options, reward_adapter_dir, tmp_path / "zero", critic_init="zero"))
    assert trainer.network.value_head.weight.abs().sum() == 0 and not trainer.network.critic_from_reward_model
    trainer, _ = make_trainer(rm_options(ppo_options, reward_adapter_dir, tmp_path / "policy", critic_init="policy"))
    actor, critic = adapter_state(trainer.network.backbone, ACTOR), adapter_state(trainer.network.backbone, CRITIC)
    assert all(torch.equal(actor[k], critic[k]) for k in critic)


def test_the_first_step_fits_a_reward_model_value_head_to_the_returns_by_least_squares(ppo_options,
                                                                                     reward_adapter_dir, tmp_path):
    from medgpt.rl.advantages import explained_variance, returns_to_go
    from medgpt.rl.ppo_core import token_rewards

    trainer, _ = make_trainer(rm_options(ppo_options, reward_adapter_dir, tmp_path, reward_normalization="batch",
                                         reward_weights=[2.0], gamma=1.0, lam=1.0))
    head = trainer.network.value_head
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    raw = torch.tensor([[0.5, 1.0, 2.0, 0], [-1.0, 0.0, 0.5, 1.5], [3.0, 2.5, 0, 0]])
    scores, kl = torch.tensor([1.0, -0.5, 2.0]), torch.full((3, 4), 0.1) * mask
    values = raw.clone()
    trainer.calibrate_value_head(values, scores, kl, mask)

    returns = returns_to_go(token_rewards(scores, kl, trainer.kl.value, mask), mask, 1.0)
    kept = mask.bool()
    slope, intercept = np.polyfit(raw[kept].numpy(), returns[kept].numpy(), 1)  # the least-squares line
    assert slope > 0
    assert values[kept].tolist() == pytest.approx((slope * raw[kept] + intercept).tolist(), abs=1e-5)
    assert values[~kept].abs().sum() == 0  # padding stays 0
    assert head.weight.detach() == pytest.approx(weight * slope, rel=1e-5)
    assert head.bias.detach().item() == pytest.approx(bias.item() * slope + intercept, rel=1e-5)
    assert explained_variance(values, returns, mask) > 0.5  # these prefix values foresee the returns

    values = -raw.clone()  # a head whose ordering is backwards keeps none of it: a constant at the mean return
    trainer.calibrate_value_head(values, scores, kl, mask)
    assert values[kept].tolist() == pytest.approx([returns[kept].mean().item()] * int(mask.sum()), abs=1e-6)
    assert head.weight.detach().abs().sum() == 0

    trainer, _ = make_trainer(rm_options(ppo_options, reward_adapter_dir, tmp_path / "run", gamma=1.0, lam=1.0))
    stats, _ = trainer.train_step()  # in the loop: the first step's critic explains its returns at least as a mean
    assert stats["explained_variance"] >= -1e-6 and "value_loss" in stats


def test_a_reward_model_on_another_base_loads_on_its_own_as_before(ppo_options, tmp_path, tokenizer):
    other = make_tiny_model(tmp_path / "other-base", tokenizer, seed=3)
    rm = tmp_path / "rm-other"
    stage = get_stage("rm")
    stage.run(build_config(stage, {"model_name_or_path": str(other), "output_dir": str(rm), "max_steps": 1,
                                   "train_file_dir": str(DEMO / "preference"), "max_length": 96,
                                   "per_device_train_batch_size": 2, "report_to": "none", "save_strategy": "no"}))
    # fp32 both: a second full model of the same size doubles the memory (a bf16 one would add half)
    trainer, job = make_trainer(rm_options(ppo_options, rm, tmp_path, bf16=False, torch_dtype="fp32"))
    assert not job.stats["reward_model_shares_base"] and job.stats["roles_memory_over_base"] > 1.9
    assert trainer.network.reward_head is None and not trainer.network.critic_from_reward_model
    stats, _ = trainer.train_step()
    assert "reward_reward_model" in stats
    with pytest.raises(Exception, match="not a LoRA adapter of the policy's base"):
        make_trainer(rm_options(ppo_options, rm, tmp_path / "again", critic_init="reward_model"))
