"""Stage 3b, the DPO family: align a policy directly from preference pairs, without a reward model.

`stage: dpo` takes TRL's `DPOConfig` whole (beta, loss_type, max_length, precompute_ref_log_probs …): the
reference-based losses (sigmoid = DPO, ipo, hinge and TRL's other ones) are TRL's `DPOTrainer`'s;
`loss_type: simpo` and `stage: orpo` are reference-free and computed by our small functions in
`medgpt.training.preference_loss` on the same trainer's log-probabilities (TRL has them only in its
experimental trainers, which tokenise on their own and materialise full logits).

Pairs are tokenised by `medgpt.data.preference.encode_pair` (prompt cut from the left, counts kept) and handed
to the trainer as `prompt_ids` / `chosen_ids` / `rejected_ids`.

The reference model is the policy as this stage starts:
- a new LoRA adapter on a plain or merged model: the same weights with the adapter disabled (no copy);
- an unmerged SFT adapter (`model_name_or_path` is an adapter directory, or `peft_path` is set): that adapter
  keeps training, and a frozen copy of it, the adapter "ref", is the reference — disabling adapters would give
  the pre-SFT base. The output stays an adapter of the original base, so `medgpt merge` works as after SFT;
- full training: a frozen in-memory copy, or with `precompute_ref_log_probs: true` the reference
  log-probabilities computed once before training and no copy kept.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from trl import DPOConfig, DPOTrainer

from medgpt.arguments import documented
from medgpt.config import ConfigError, RunConfig, check_context_length
from medgpt.data.features import stage_features
from medgpt.data.loading import load_stage_data
from medgpt.data.preference import PairStats, encode_pair
from medgpt.data.templates import ChatFormat
from medgpt.models.adapters import start_from_adapter
from medgpt.models.load import load_model_config, load_tokenizer
from medgpt.stages import Stage, register
from medgpt.training.preference_loss import orpo_loss, simpo_loss
from medgpt.training.recipe import (
    TrainingJob,
    add_new_tokens,
    begin_run,
    datasets_sources,
    prepare_model,
    standard_callbacks,
    start_logs,
    train_and_save,
)

logger = logging.getLogger(__name__)

TRL_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# DPOConfig options that only mean something with a reference model; refused for SimPO / ORPO, not ignored.
REFERENCE_OPTIONS = ("precompute_ref_log_probs", "precompute_ref_batch_size", "sync_ref_model",
                     "ref_model_mixup_alpha", "ref_model_sync_steps", "ld_alpha", "use_weighting", "loss_weights",
                     "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau")
PLOTS = ((("rewards/chosen", "rewards/rejected", "rewards/margins"), "rewards.png", "implicit rewards"),
         (("rewards/accuracies",), "accuracy.png", "reward accuracy (chosen > rejected)"),
         (("logps/chosen", "logps/rejected"), "logps.png", "log-probabilities of the replies"))


@dataclass
class PreferenceArguments:
    """Options of the DPO family that TRL's DPOConfig lacks."""

    simpo_gamma: float = documented(
        """SimPO's target reward margin γ (loss_type: simpo only): the loss pushes β·(mean log p(chosen) - mean
        log p(rejected)) above γ. The paper uses β 2-2.5 with γ/β 0.3-0.5; raise γ for a wider separation.""",
        default=0.5,
    )


class PreferenceTrainer(DPOTrainer):
    """TRL's DPOTrainer that takes our tokenised pairs as they are and adds the reference-free SimPO / ORPO.

    `reference_free`: None (TRL's loss_type), "simpo" or "orpo". `keep_reference_adapter`: keep TRL's frozen
    copy ("ref") of an adapter the model already had; otherwise it is dropped and the reference is the model
    with adapters disabled.
    """

    def __init__(self, *args, reference_free: str | None = None, simpo_gamma: float = 0.5,
                 keep_reference_adapter: bool = False, **kwargs):
        from peft import PeftModel

        self.reference_free, self.simpo_gamma = reference_free, simpo_gamma
        training = kwargs["args"]
        model = kwargs.get("model", args[0] if args else None)
        # With no reference needed and full training, TRL would load a second model from disk; its
        # precompute path is the one that loads none, and `_precompute_ref_logps` below then computes nothing.
        skip_reference = reference_free is not None and not isinstance(model, PeftModel) \
            and not training.precompute_ref_log_probs
        if skip_reference:
            training.precompute_ref_log_probs = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            if skip_reference:
                training.precompute_ref_log_probs = False
        peft_config = getattr(self.model, "peft_config", {})
        if "ref" in peft_config and (reference_free or not keep_reference_adapter):
            self.model.delete_adapter("ref")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # TRL 1.16 re-tokenises any dataset (it would run `extract_prompt` on ours and fail); ours are final.
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self.reference_free:
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _compute_loss(self, model, inputs, return_outputs):
        if self.reference_free is None:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                        use_cache=False, fused_lm_head=True)
        mask = completion_mask[:, 1:]  # (2B, T-1): the reply tokens, as next-token targets
        per_token = outputs.log_probs[:, -mask.size(1):] * mask
        lengths = mask.sum(dim=1).clamp(min=1)
        chosen_sum, _ = per_token.sum(dim=1).chunk(2)
        chosen_avg, rejected_avg = (per_token.sum(dim=1) / lengths).chunk(2)  # batch is [chosen, rejected]
        chosen_tokens, _ = lengths.chunk(2)
        metrics = self._metrics[mode]
        if self.reference_free == "simpo":
            loss = simpo_loss(chosen_avg, rejected_avg, self.beta, self.simpo_gamma, self.label_smoothing).mean()
        else:
            nll = -chosen_sum.sum() / chosen_tokens.sum()
            loss, log_odds = orpo_loss(nll, chosen_avg, rejected_avg, self.beta)
            metrics["nll_loss"].append(self.accelerator.gather_for_metrics(nll.detach()).mean().item())
            metrics["log_odds_ratio"].append(self.accelerator.gather_for_metrics(log_odds.detach()).mean().item())
        chosen_rewards, rejected_rewards = self.beta * chosen_avg.detach(), self.beta * rejected_avg.detach()
        gather = self.accelerator.gather_for_metrics
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["logps/chosen"].append(gather(chosen_avg.detach()).mean().item())  # per token: what the loss uses
        metrics["logps/rejected"].append(gather(rejected_avg.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss


# ------------------------------------------------------------------------------------------------ checks


def reference_free_loss(config: RunConfig) -> str | None:
    """"simpo" / "orpo" for our own losses, None for TRL's; refuse options that would do nothing."""
    t, given = config.training, config.given
    if config.stage == "orpo":
        if "loss_type" in given:
            raise ConfigError("stage orpo has its own loss (odds ratio + SFT term): remove loss_type, "
                              "or use stage dpo for the other losses")
        own = "orpo"
    else:
        unknown = [name for name in t.loss_type if name not in (*TRL_LOSSES, "simpo")]
        if unknown:
            raise ConfigError(f"loss_type {', '.join(unknown)} is not one of simpo, {', '.join(TRL_LOSSES)} "
                              "(ORPO is its own stage: stage: orpo)")
        if "simpo" in t.loss_type and len(t.loss_type) > 1:
            raise ConfigError("loss_type simpo is reference-free and cannot be combined with other losses")
        own = "simpo" if t.loss_type == ["simpo"] else None
        if own is None and "simpo_gamma" in given:
            raise ConfigError("simpo_gamma applies to loss_type: simpo only: remove it or set loss_type: simpo")
    if own:
        useless = [name for name in (*REFERENCE_OPTIONS, *(("label_smoothing",) if own == "orpo" else ()))
                   if name in given]
        if useless:
            raise ConfigError(f"{', '.join(useless)} need(s) a reference model, but {own.upper()} is reference-free: "
                              "remove them")
    return own


# ------------------------------------------------------------------------------------------------ recipe


def pair_features(chat: ChatFormat, records, max_length: int | None):
    stats = PairStats()
    limit = max_length or 10**9  # max_length: null keeps every pair whole
    features = [f for r in records if (f := encode_pair(chat, r, limit, stats)) is not None]
    logger.info("preference pairs: %s", stats.line())
    info = dict(stats.counts)
    info["tokens"] = sum(len(f["prompt_ids"]) * 2 + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)
    return features, info


def setup(config: RunConfig):
    """Everything up to a ready trainer: (trainer, job, checkpoint to resume or None)."""
    d, args = config.data, config.training
    own = reference_free_loss(config)
    data = load_stage_data(d, ("preference",), args.seed)  # validated before any model loads
    start_adapter = start_from_adapter(config)
    resume = begin_run(config)
    tokenizer = load_tokenizer(config.model)
    add_new_tokens(tokenizer, config.model.new_tokens_file)
    check_context_length(config, load_model_config(config.model), args.max_length)
    chat = ChatFormat(tokenizer, config.run.template)
    train, evaluation, info = stage_features(config, data, tokenizer, chat.jinja, {"max_length": args.max_length},
                                             lambda records: pair_features(chat, records, args.max_length))
    if not len(train):
        raise ConfigError(f"no preference pair fits max_length={args.max_length} ({info}): raise max_length")

    # DPOConfig defaults to activation checkpointing; ours (gradient_checkpointing, default off) decides.
    args.activation_checkpointing = args.gradient_checkpointing = config.model.gradient_checkpointing
    model = prepare_model(config, tokenizer, args.max_length, loss_chunk_size=1024)
    reference = None
    if not config.adapter.use_peft and own is None and not args.precompute_ref_log_probs:
        reference = copy.deepcopy(model).requires_grad_(False).eval()  # the policy as the stage starts
    start_logs(config, resume)
    pref = config.extras.get(PreferenceArguments)
    trainer = PreferenceTrainer(
        model=model, ref_model=reference, args=args, train_dataset=train, eval_dataset=evaluation,
        processing_class=tokenizer, callbacks=standard_callbacks(args.output_dir), reference_free=own,
        simpo_gamma=pref.simpo_gamma if pref else 0.5, keep_reference_adapter=start_adapter is not None,
    )
    loss_type = "orpo" if config.stage == "orpo" else ",".join(args.loss_type)
    job = TrainingJob(config, tokenizer, chat, train, evaluation, data_sources=datasets_sources(config),
                      stats={"loss_type": loss_type, **{"pairs_" + k: v for k, v in info.items()}})
    return trainer, job, resume


def run(config: RunConfig) -> dict:
    trainer, job, resume = setup(config)
    return train_and_save(trainer, job, resume, PLOTS)


register(Stage(
    name="dpo",
    summary="direct preference optimisation from pairs (loss_type: sigmoid = DPO, ipo, hinge, simpo, …)",
    run=run,
    training_class=DPOConfig,
    extra_classes=(PreferenceArguments,),
    data_kind="preference",
))

register(Stage(
    name="orpo",
    summary="odds-ratio preference optimisation: SFT and preference in one loss, no reference model",
    run=run,
    training_class=DPOConfig,
    data_kind="preference",
))
