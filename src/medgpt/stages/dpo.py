"""Stage 3b, the DPO family: align a policy directly from preference pairs, without a reward model.

`stage: dpo` takes TRL's `DPOConfig` whole (beta, loss_type, max_length, precompute_ref_log_probs …) and trains
with `training.dpo_trainer.PreferenceTrainer`: TRL's DPOTrainer around our forward. Each batch's chosen and
rejected sequences are packed padding-free into one row (`packing`), only the reply tokens go through the LM
head, a chunk at a time (`loss_chunk_size`), and the losses are `medgpt.training.preference_loss`'s: TRL's loss
types restated formula for formula (sigmoid = DPO, ipo, hinge, robust, …), plus the reference-free
`loss_type: simpo` and `stage: orpo`. TRL's own path pads and, on CPU, scores every position.

Pairs are tokenised by `medgpt.data.preference.encode_pair` (prompt cut from the left, counts kept) and handed
to the trainer as `prompt_ids` / `chosen_ids` / `rejected_ids`.

The reference model is the policy as this stage starts, scored in a no-gradient pass over the same packed row:
- a new LoRA adapter on a plain or merged model: the same weights with the adapter disabled (no copy);
- an unmerged SFT adapter (`model_name_or_path` is an adapter directory, or `peft_path` is set): that adapter
  keeps training, and a frozen copy of it, the adapter "ref", is the reference — disabling adapters would give
  the pre-SFT base. The output stays an adapter of the original base, so `medgpt merge` works as after SFT;
- full training: a frozen in-memory copy, or with `precompute_ref_log_probs: true` the reference
  log-probabilities computed once before training (TRL's pass, through our scoring) and no copy kept.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

from trl import DPOConfig

from medgpt.arguments import CausalLMArguments, documented
from medgpt.config import ConfigError, RunConfig, check_context_length
from medgpt.data.features import stage_features
from medgpt.data.loading import load_stage_data
from medgpt.data.preference import PairStats, encode_pair
from medgpt.data.templates import ChatFormat
from medgpt.models.adapters import start_from_adapter
from medgpt.models.load import load_model_config, load_tokenizer
from medgpt.stages import Stage, register
from medgpt.training.dpo_trainer import PreferenceTrainer
from medgpt.training.packed_preference import PackingArguments, refuse_upstream_batching
from medgpt.training.preference_loss import DPO_LOSSES
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

TRL_LOSSES = tuple(DPO_LOSSES)  # TRL 1.16's loss types, restated in training/preference_loss.py
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


# ------------------------------------------------------------------------------------------------ checks


def reference_free_loss(config: RunConfig) -> str | None:
    """"simpo" / "orpo" for our own losses, None for TRL's; refuse options that would do nothing."""
    t, given = config.training, config.given
    refuse_upstream_batching(given)
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
    chunk = config.extra(CausalLMArguments).loss_chunk_size
    model = prepare_model(config, tokenizer, args.max_length, loss_chunk_size=chunk)
    reference = None
    if not config.adapter.use_peft and own is None and not args.precompute_ref_log_probs:
        reference = copy.deepcopy(model).requires_grad_(False).eval()  # the policy as the stage starts
    start_logs(config, resume)
    pref = config.extras.get(PreferenceArguments)
    trainer = PreferenceTrainer(
        model=model, ref_model=reference, args=args, train_dataset=train, eval_dataset=evaluation,
        processing_class=tokenizer, callbacks=standard_callbacks(args.output_dir), reference_free=own,
        simpo_gamma=pref.simpo_gamma if pref else 0.5, keep_reference_adapter=start_adapter is not None,
        chunk_size=chunk, packing=config.extra(PackingArguments).packing,
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
    extra_classes=(PreferenceArguments, PackingArguments, CausalLMArguments),
    data_kind="preference",
))

register(Stage(
    name="orpo",
    summary="odds-ratio preference optimisation: SFT and preference in one loss, no reference model",
    run=run,
    training_class=DPOConfig,
    extra_classes=(PackingArguments, CausalLMArguments),
    data_kind="preference",
))
