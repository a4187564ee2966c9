"""Stage 4b, group RL: GRPO and RLOO, the critic-free estimators of our RL loop (`medgpt.rl.recipe`), with rule
rewards and/or a reward model.

Both sample `num_samples_per_prompt` replies per prompt and learn from how each reply's reward compares with the
others of its prompt: GRPO (`stage: grpo`) standardises by the group's mean and spread and keeps the KL to the
reference as a loss term; RLOO (`stage: rloo`) subtracts the mean of the other replies and folds the KL into the
reward. They are the ppo stage without a critic: the same prompts, template, rewards (a LoRA reward model of the
policy's base mounted on it), memory layout, held-out evaluation, checkpoints and distributed training.

A group whose replies all get the same reward has zero advantage and teaches nothing; when every group is like
that (and kl_coef is 0) the loss is exactly 0 — the common "GRPO loss is 0" confusion. Their share is logged per
step (`zero_advantage_groups` in metrics.jsonl) and explained in the log the first time.
"""

from __future__ import annotations

from transformers import TrainingArguments

from medgpt.rl import recipe
from medgpt.rl.ppo_config import GRPOArguments, RLOOArguments
from medgpt.stages import Stage, register


def run(config) -> dict:
    return recipe.run(config)


register(Stage(
    name="grpo",
    summary="GRPO: group-relative policy optimisation with rule or reward-model rewards (our RL loop, no critic)",
    run=run,
    training_class=TrainingArguments,
    extra_classes=(GRPOArguments,),
    data_kind="qa",
))

register(Stage(
    name="rloo",
    summary="RLOO: REINFORCE with a leave-one-out baseline, same rewards and data as GRPO (our RL loop, no critic)",
    run=run,
    training_class=TrainingArguments,
    extra_classes=(RLOOArguments,),
    data_kind="qa",
))
