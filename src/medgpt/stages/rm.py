"""Stage 3, reward modelling (RM): learn a scalar score that ranks the chosen reply above the rejected one
(pairwise Bradley–Terry loss), read at each sequence's last real token.

A batch's chosen and rejected sequences are packed padding-free into one row (`packing`, per-sequence position
ids, SDPA per sequence), and the score head reads only the hidden state of each sequence's last token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from medgpt.arguments import documented
from medgpt.config import ConfigError, RunConfig, check_context_length
from medgpt.data.collators import RewardPairCollator
from medgpt.data.features import stage_features
from medgpt.data.loading import load_stage_data
from medgpt.data.preference import PairStats, encode_pair
from medgpt.data.templates import ChatFormat
from medgpt.models.adapters import attach_adapter, count_parameters, freeze_layers
from medgpt.models.lean import use_lean_activations
from medgpt.models.load import keep_trainable_fp32, load_model, load_model_config, load_tokenizer, weights_purpose
from medgpt.models.reward import use_last_token_reward
from medgpt.stages import Stage, register
from medgpt.training.recipe import (
    TrainingJob,
    add_new_tokens,
    begin_run,
    datasets_sources,
    resize_for_tokenizer,
    standard_callbacks,
    start_logs,
    train_and_save,
    use_packed_attention,
)
from medgpt.training.packed_preference import PackingArguments
from medgpt.training.trainer import TrainingDiverged, diagnose_nan

logger = logging.getLogger(__name__)
PLOTS = ((("eval_reward_chosen", "eval_reward_rejected", "eval_margin", "eval_accuracy",
           "reward_chosen", "reward_rejected", "margin", "accuracy"), "reward.png", "rewards and pairwise accuracy"),)


@dataclass
class RewardArguments:
    """Options of reward-model training."""

    max_length: int = documented(
        """Longest prompt + reply in tokens (chosen and rejected each). Longer pairs are not dropped: the prompt
        loses its oldest tokens first (keeping at least half the budget), then replies lose their tail; the
        counts are logged and saved in train_results.json. Memory grows with it.""",
        default=1024,
    )
    margin: float = documented(
        """Required reward gap: the loss is -log sigmoid(r_chosen - r_rejected - margin). 0 (default) is the
        plain Bradley–Terry loss; a positive value (e.g. 0.5-1) keeps pushing pairs apart after they are ranked
        right, useful when preferences are clear-cut and scores should separate widely.""",
        default=0.0,
    )
    center_rewards_coefficient: float = documented(
        """Weight of a penalty coef * mean((r_chosen + r_rejected)^2) that keeps rewards centred on 0
        (InstructGPT; 0.01 as in TRL's docs). The pairwise loss only fixes differences, so rewards can drift;
        turn it on when the scores feed RL (PPO) and should be on a stable scale.""",
        default=0.0,
    )


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0,
                         center_coefficient: float = 0.0) -> torch.Tensor:
    """Bradley–Terry loss of (B,) rewards: -mean log sigmoid(r_c - r_r - margin) + coef * mean((r_c + r_r)^2)."""
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


# ------------------------------------------------------------------------------------------------ data


def reward_features(chat: ChatFormat, records, max_length: int):
    """input_ids_chosen / input_ids_rejected = prompt + reply, truncated by `encode_pair`; counts in info."""
    stats, features = PairStats(), []
    for record in records:
        pair = encode_pair(chat, record, max_length, stats)
        if pair is not None:
            features.append({"input_ids_chosen": pair["prompt_ids"] + pair["chosen_ids"],
                             "input_ids_rejected": pair["prompt_ids"] + pair["rejected_ids"]})
    info = {key: stats.counts[key] for key in ("kept", "prompt_truncated", "reply_truncated", "dropped")}
    info["tokens"] = sum(len(f["input_ids_chosen"]) + len(f["input_ids_rejected"]) for f in features)
    logger.info("reward pairs: %s", stats.line())
    return features, info


# ------------------------------------------------------------------------------------------------ trainer


def reward_metrics(prediction) -> dict[str, float]:
    """Eval metrics from the gathered (N, 2) [chosen, rejected] rewards of every process."""
    rewards = np.asarray(prediction.predictions, dtype=np.float64).reshape(-1, 2)
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    return {"accuracy": float((chosen > rejected).mean()), "reward_chosen": float(chosen.mean()),
            "reward_rejected": float(rejected.mean()), "margin": float((chosen - rejected).mean())}


class RewardTrainer(Trainer):
    """A plain Trainer with the pairwise loss; logs train accuracy/margin next to the loss."""

    def __init__(self, *args, margin: float = 0.0, center_coefficient: float = 0.0, **kwargs):
        super().__init__(*args, compute_metrics=reward_metrics, **kwargs)
        self.margin, self.center_coefficient = margin, center_coefficient
        self.model_accepts_loss_kwargs = False  # the loss is a mean per micro-batch: the Trainer averages steps
        self._train_sums = torch.zeros(4, dtype=torch.float64)  # correct, sum r_c, sum r_r, pairs

    def rewards(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards, (B,) each, of a `RewardPairCollator` batch (packed or padded)."""
        kwargs = {k: inputs[k] for k in ("input_ids", "position_ids", "attention_mask", "sequence_ends") if k in inputs}
        rewards = model(**kwargs).logits[:, 0].float()  # (2B,): the B chosen, then the B rejected
        return rewards.chunk(2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected = self.rewards(model, inputs)
        loss = pairwise_reward_loss(chosen, rejected, self.margin, self.center_coefficient)
        if model.training:
            if not torch.isfinite(loss.detach()):
                raise TrainingDiverged(diagnose_nan(self.args, self.state.global_step, float(loss.detach())))
            c, r = chosen.detach().double().cpu(), rejected.detach().double().cpu()
            self._train_sums += torch.stack([(c > r).sum(), c.sum(), r.sum(), torch.tensor(float(len(c)))])
        return (loss, torch.stack([chosen, rejected], -1)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, rewards = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        # No labels exist; the Trainer calls compute_metrics only when it has some, so pass placeholders.
        return loss.detach(), rewards.detach(), torch.zeros(len(rewards), device=rewards.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_sums[3] > 0:  # a training log row: every rank gets here together
            sums = self.accelerator.reduce(self._train_sums.to(self.args.device), reduction="sum").cpu()
            correct, chosen, rejected, pairs = sums.tolist()
            logs.update(accuracy=correct / pairs, reward_chosen=chosen / pairs, reward_rejected=rejected / pairs,
                        margin=(chosen - rejected) / pairs)
            self._train_sums.zero_()
        super().log(logs, start_time)


# ------------------------------------------------------------------------------------------------ stage


def prepare_reward_model(config: RunConfig, tokenizer, context_length: int):
    """The start model with a scalar head (`num_labels=1`, pad id set), pooled at the last real token;
    LoRA with the head trained in full and saved via modules_to_save, or full / top-layer training."""
    from transformers import set_seed

    set_seed(config.training.seed)  # the head's and the adapter's initialisation follow `seed`
    model = load_model(config.model, tokenizer, head="sequence_classification", context_length=context_length,
                       purpose=weights_purpose(config))
    vocabulary_changed = resize_for_tokenizer(model, tokenizer)
    use_lean_activations(model)
    use_last_token_reward(model)
    if config.adapter.use_peft:
        save = ["score", "embed_tokens"] if vocabulary_changed else ["score"]
        model = attach_adapter(model, config.adapter, "SEQ_CLS", save, config.model.gradient_checkpointing)
        keep_trainable_fp32(model)  # the head (and new embeddings) peft copied from a bf16 base train in fp32
    else:
        freeze_layers(model, config.adapter.freeze_trainable_layers)
        if config.adapter.freeze_trainable_layers:
            model.score.weight.requires_grad = True  # the new head always trains
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def run(config: RunConfig) -> dict:
    d, rm, args = config.data, config.extra(RewardArguments), config.training
    data = load_stage_data(d, ("preference",), args.seed)  # validated before any model loads
    resume = begin_run(config)
    tokenizer = load_tokenizer(config.model)
    add_new_tokens(tokenizer, config.model.new_tokens_file)
    check_context_length(config, load_model_config(config.model), rm.max_length)
    chat = ChatFormat(tokenizer, config.run.template)
    train, evaluation, info = stage_features(config, data, tokenizer, chat.jinja, {"max_length": rm.max_length},
                                             lambda records: reward_features(chat, records, rm.max_length))
    if not len(train):
        raise ConfigError(f"no preference pair fits max_length={rm.max_length} ({info}): raise max_length")
    model = prepare_reward_model(config, tokenizer, rm.max_length)

    start_logs(config, resume)
    args.remove_unused_columns = False  # our columns are not forward() arguments
    args.label_names = []  # no labels: the loss comes from pairs
    packing = config.extra(PackingArguments).packing
    if packing:
        use_packed_attention(model)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                            data_collator=RewardPairCollator(tokenizer.pad_token_id, packing), processing_class=tokenizer,
                            callbacks=standard_callbacks(args.output_dir), margin=rm.margin,
                            center_coefficient=rm.center_rewards_coefficient)
    job = TrainingJob(config, tokenizer, chat, train, evaluation, data_sources=datasets_sources(config),
                      stats={**{"rm_" + k: v for k, v in info.items()},
                             "rm_eval_pairs": len(evaluation) if evaluation is not None else 0})
    return train_and_save(trainer, job, resume, PLOTS)


register(Stage(
    name="rm",
    summary="reward model on preference pairs (pairwise Bradley–Terry loss, reward at the last real token)",
    run=run,
    training_class=TrainingArguments,
    extra_classes=(RewardArguments, PackingArguments),
    data_kind="preference",
))
