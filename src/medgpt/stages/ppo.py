"""Stage 4, RLHF with PPO: the SFT policy answers prompts, the reward model (and optional rule rewards) score
the answers, and our RL trainer updates the policy on a KL leash to where it started, with a critic (its own
adapter, started from the reward model) estimating advantages by GAE. The recipe: `medgpt.rl.recipe`."""

from __future__ import annotations

from transformers import TrainingArguments

from medgpt.rl import recipe
from medgpt.rl.ppo_config import PPOArguments
from medgpt.stages import Stage, register


def run(config) -> dict:
    return recipe.run(config)


register(Stage(
    name="ppo",
    summary="RLHF with PPO against a reward model (our trainer: actor, critic, reference and reward on one base)",
    run=run,
    training_class=TrainingArguments,
    extra_classes=(PPOArguments,),
    data_kind="conversation",
))
