"""Stage 4b, group RL: GRPO and RLOO with TRL's trainers, on our prompts, template and reward functions.

Both sample `num_generations` completions per prompt and learn from how each one's reward compares with the
others of its group: GRPO (`stage: grpo`, TRL's `GRPOConfig` whole: beta, epsilon, loss_type, scale_rewards …)
normalises by the group's mean and spread; RLOO (`stage: rloo`, `RLOOConfig`) uses the mean of the other
completions as the baseline and folds the KL to the reference into the reward. Rewards are
`medgpt.rl.rewards` functions (or a user's `module:function`), weighted by `reward_weights`.

Prompts: any conversation, QA, MCQ, preference or KTO file (`medgpt.rl.prompts`), tokenised by our chat template
(`medgpt.rl.trl_prompts`). The reference model (beta > 0) is the policy as the stage starts: the model with a
new adapter disabled, or a frozen copy of an SFT adapter we keep training (`model_name_or_path` an adapter
directory), or for full training a copy TRL loads from the same path.

A group whose completions all get the same reward has zero advantage and teaches nothing; when every group is
like that (and beta is 0) the loss is exactly 0 — the common "GRPO loss is 0" confusion. Such groups are counted
per step (`zero_std_groups` in metrics.jsonl, totals in train_results.json) and explained in the log.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from medgpt.arguments import documented
from medgpt.config import ConfigError, RunConfig
from medgpt.rl import rewards
from medgpt.rl.trl_prompts import ChatFormatPrompts, prepare_policy, prepare_prompts
from medgpt.stages import Stage, register
from medgpt.training.recipe import TrainingJob, datasets_sources, standard_callbacks, train_and_save

logger = logging.getLogger(__name__)

FLAT_GROUPS_EXPLAINED = (
    "%d of %d prompt groups got the same reward for all %d completions: their advantages are 0, so they add no "
    "policy gradient (when every group is like that and beta is 0, the loss is exactly 0: not a bug, nothing to "
    "learn from). Use a graded reward (answer_f1 rather than an exact match), raise temperature or "
    "num_generations, or use prompts the model sometimes gets right. Counted as zero_std_groups in metrics.jsonl."
)


@dataclass
class RolloutRewardArguments:
    """Which rewards GRPO / RLOO optimise (weights: `reward_weights`, one per function, in order)."""

    reward_funcs: list[str] | None = documented(
        """Reward functions, summed with reward_weights: answer_f1 (key-term F1 against the reference answer;
        option-letter match for multiple choice), answer_recall (share of the reference's key terms mentioned),
        choice_match (multiple choice only), format_reward (matches format_pattern), length_penalty (below 0 past
        length_penalty_start tokens), reward_model (the model at reward_model_name_or_path), or your own
        `package.module:function` / `path/file.py:function` with TRL's signature f(prompts, completions,
        completion_ids, **columns) -> list[float | None]. Your own function is imported and RUNS ITS CODE.
        Default: reward_model when reward_model_name_or_path is set, else answer_f1.""",
        default=None,
    )
    reward_model_name_or_path: str | None = documented(
        "A reward model trained by `medgpt rm` (adapter or merged directory), used by the reward_model function.",
        default=None,
    )
    reward_model_batch_size: int = documented("Completions scored per reward-model forward pass.", default=8)
    format_pattern: str = documented(
        """Regular expression the whole completion must match for format_reward (dot matches newlines). The
        default asks for DeepSeek-R1 style `<think>…</think><answer>…</answer>`; answer rewards then score only
        the <answer> part.""",
        default=rewards.DEFAULT_FORMAT_PATTERN,
    )
    length_penalty_start: int | None = documented(
        """length_penalty: completions up to this many tokens cost nothing, longer ones lose linearly up to -1 at
        max_completion_length. Default: half of max_completion_length.""",
        default=None,
    )


class FlatGroupCounter:
    """Mixin: count the prompt groups whose rewards are all equal (zero advantage) and say what that means."""

    def __init__(self, *args, **kwargs):
        self.flat_groups = self.groups_seen = 0
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        generations = self.num_generations if mode == "train" else self.num_generations_eval
        groups = len(inputs) * self.accelerator.num_processes // generations
        flat = round(self._metrics[mode]["frac_reward_zero_std"][-1] * groups)
        self._metrics[mode]["zero_std_groups"].append(flat)
        if mode == "train":
            if flat and not self.flat_groups and self.accelerator.is_main_process:
                logger.warning(FLAT_GROUPS_EXPLAINED, flat, groups, generations)
            elif flat == groups and self.accelerator.is_main_process:
                logger.warning("step %d: all %d groups have zero reward variance: no policy gradient this step",
                               self.state.global_step + 1, groups)
            self.flat_groups += flat
            self.groups_seen += groups
        return output


class GRPOStageTrainer(ChatFormatPrompts, FlatGroupCounter, GRPOTrainer):
    pass


class RLOOStageTrainer(ChatFormatPrompts, FlatGroupCounter, RLOOTrainer):
    pass


TRAINERS = {"grpo": GRPOStageTrainer, "rloo": RLOOStageTrainer}


# ------------------------------------------------------------------------------------------------ rewards


def reward_names(config: RunConfig) -> list[str]:
    """The configured reward functions, checked against their options before anything loads."""
    r, args = config.extra(RolloutRewardArguments), config.training
    names = r.reward_funcs or (["reward_model"] if r.reward_model_name_or_path else ["answer_f1"])
    unknown = [n for n in names if n not in rewards.BUILT_IN and n != "reward_model" and ":" not in n]
    if unknown:
        raise ConfigError(f"reward_funcs {', '.join(unknown)}: not one of {', '.join(rewards.BUILT_IN)}, "
                          "reward_model, or module:function / file.py:function")
    if "reward_model" in names and not r.reward_model_name_or_path:
        raise ConfigError("reward_funcs has reward_model: set reward_model_name_or_path (a `medgpt rm` output)")
    if r.reward_model_name_or_path and "reward_model" not in names:
        raise ConfigError("reward_model_name_or_path is set but reward_funcs lacks reward_model: add it, "
                          "or drop the path")
    if args.reward_weights is not None and len(args.reward_weights) != len(names):
        raise ConfigError(f"reward_weights has {len(args.reward_weights)} values for {len(names)} reward functions "
                          f"({', '.join(names)}): give one weight per function")
    start = r.length_penalty_start
    if "length_penalty" in names and start is not None and not 0 <= start < args.max_completion_length:
        raise ConfigError(f"length_penalty_start {start} must be in [0, max_completion_length="
                          f"{args.max_completion_length})")
    return names


def rule_rewards(config: RunConfig, names: list[str]) -> dict:
    """name -> callable for every configured reward but the reward model (a user's function is imported here)."""
    r, limit = config.extra(RolloutRewardArguments), config.training.max_completion_length
    start = r.length_penalty_start if r.length_penalty_start is not None else limit // 2
    made = {"format_reward": functools.partial(rewards.format_reward, pattern=r.format_pattern),
            "length_penalty": functools.partial(rewards.length_penalty, start=start, limit=limit)}
    for name in names:
        if ":" in name:
            logger.warning("reward function %s: importing and running your code", name)
            made[name] = rewards.load_user_function(name)
    return {name: made.get(name) or rewards.BUILT_IN[name] for name in names if name != "reward_model"}


def reward_model_reward(config: RunConfig) -> rewards.RewardModelReward:
    from medgpt.models.reward import RewardModelScorer

    r = config.extra(RolloutRewardArguments)
    scorer = RewardModelScorer.load(r.reward_model_name_or_path, torch_dtype=config.model.torch_dtype,
                                    trust_remote_code=config.model.trust_remote_code,
                                    batch_size=r.reward_model_batch_size)
    return rewards.RewardModelReward(scorer)


# ------------------------------------------------------------------------------------------------ recipe


def setup(config: RunConfig):
    """Everything up to a ready trainer: (trainer, job, checkpoint to resume or None)."""
    names = reward_names(config)
    functions = rule_rewards(config, names)  # a user's function fails here, before any model loads
    start = prepare_prompts(config)
    model = prepare_policy(config, start)
    reward_funcs = [functions[n] if n in functions else reward_model_reward(config) for n in names]
    trainer = TRAINERS[config.stage](
        model=model, reward_funcs=reward_funcs, args=config.training, train_dataset=start.train,
        eval_dataset=start.eval, processing_class=start.tokenizer,
        callbacks=standard_callbacks(config.training.output_dir), chat_format=start.chat_format)
    if start.start_adapter is None and "ref" in getattr(trainer.model, "peft_config", {}):
        # TRL copies the adapter it is handed into a frozen "ref"; a new adapter's copy is the base itself, so
        # the reference forward runs with adapters disabled instead (no second set of adapter weights).
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    job = TrainingJob(config, start.tokenizer, start.chat_format, start.train, start.eval,
                      data_sources=datasets_sources(config), stats={"prompts": len(start.train), "reward_funcs": names})
    return trainer, job, start.resume


def group_totals(trainer) -> dict:
    if trainer.groups_seen:
        logger.info("%d of %d prompt groups (%.0f%%) had zero reward variance", trainer.flat_groups,
                    trainer.groups_seen, 100 * trainer.flat_groups / trainer.groups_seen)
    return {"zero_std_groups": trainer.flat_groups, "groups": trainer.groups_seen}


def run(config: RunConfig) -> dict:
    trainer, job, resume = setup(config)
    reward_keys = ("reward", *(f"rewards/{name}/mean" for name in trainer.reward_func_names))
    plots = ((reward_keys, "reward.png", "mean reward (weighted sum) and each reward function"),
             (("kl", "entropy"), "kl.png", "KL to the reference and entropy"),
             (("completions/mean_length", "completions/mean_terminated_length"), "length.png", "completion length"))
    return train_and_save(trainer, job, resume, plots, final_stats=group_totals)


register(Stage(
    name="grpo",
    summary="GRPO: group-relative policy optimisation with rule or reward-model rewards (TRL's trainer)",
    run=run,
    training_class=GRPOConfig,
    extra_classes=(RolloutRewardArguments,),
    data_kind="qa",
))

register(Stage(
    name="rloo",
    summary="RLOO: REINFORCE with a leave-one-out baseline, same rewards and data as GRPO (TRL's trainer)",
    run=run,
    training_class=RLOOConfig,
    extra_classes=(RolloutRewardArguments,),
    data_kind="qa",
))
