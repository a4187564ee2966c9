"""Stage 3, KTO: align from unpaired thumbs-up / thumbs-down answers (Kahneman-Tversky Optimisation).

Data: `kto` records (`prompt` + `completion` + boolean `label`, true = desirable) and/or preference pairs,
each pair split into a desirable (chosen) and an undesirable (rejected) example by `pairs_to_kto` — the split
happens after the validation split, so a pair's two halves stay on one side. Tokenised by our template
(`encode_kto`: the prompt loses its oldest tokens first, the completion its tail; counts in train_results.json).

Trainer: `training.kto_trainer.KTOFeaturesTrainer`, TRL's `KTOTrainer` around our forward: the examples of a
batch (and, separately, their mismatched KL pairs) are packed padding-free into one row (`packing`), only the
completion tokens go through the LM head, a chunk at a time (`loss_chunk_size`); every `KTOConfig` option (beta,
desirable_weight, undesirable_weight, loss_type, precompute_ref_log_probs, max_length …) is the stage's option.

KL estimate: KTO's reference point is the KL between policy and reference on mismatched (prompt, completion)
pairs, made by rotating completions by one within each batch, so a batch needs at least two examples and a
fixed order (TRL samples sequentially). We shuffle the examples once (by `seed`) before tokenising: in file order
a pair's two halves would sit side by side and be each other's "mismatched" partner, and a file sorted by
label would give one-label batches.

Reference = the policy as this stage starts:
- LoRA on a plain (or merged) model: the same model with the adapter disabled (no second copy).
- LoRA continued from `peft_path`: a frozen copy of that adapter (TRL's "ref" adapter).
- Full training: a frozen copy of the model (or none with `precompute_ref_log_probs: true`).
- `model_name_or_path` an unmerged LoRA adapter directory (e.g. the SFT output): read as its base + `peft_path`
  (`models.adapters.start_from_adapter`, shared with DPO), so that adapter trains on and its frozen copy is the
  reference — the SFT policy, not the pre-SFT base; the output is an adapter of the original base.
"""

from __future__ import annotations

import copy
import logging
import random

from trl import KTOConfig, KTOTrainer

from medgpt.arguments import CausalLMArguments
from medgpt.config import ConfigError, RunConfig, check_context_length
from medgpt.data.features import stage_features
from medgpt.data.loading import load_stage_data
from medgpt.data.preference import PairStats, encode_kto, pairs_to_kto
from medgpt.data.records import KTORecord, PreferencePair
from medgpt.data.templates import ChatFormat
from medgpt.models.adapters import attach_adapter, count_parameters, freeze_layers, start_from_adapter
from medgpt.models.lean import use_lean_activations
from medgpt.models.load import keep_trainable_fp32, load_model, load_model_config, load_tokenizer, weights_purpose
from medgpt.stages import Stage, register
from medgpt.training.kto_trainer import KTOFeaturesTrainer, with_kl_completions  # noqa: F401 (the stage's trainer)
from medgpt.training.packed_preference import PackingArguments, refuse_upstream_batching
from medgpt.training.recipe import (
    TrainingJob,
    add_new_tokens,
    begin_run,
    datasets_sources,
    resize_for_tokenizer,
    standard_callbacks,
    start_logs,
    train_and_save,
)

logger = logging.getLogger(__name__)

DATA_KINDS = ("kto", "preference")
REWARD_PLOTS = (
    (("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"), "rewards.png", "implicit rewards and KL"),
    (("eval_rewards/chosen", "eval_rewards/rejected", "eval_kl"), "eval_rewards.png", "eval rewards and KL"),
)


# ------------------------------------------------------------------------------------------------ data


def kto_examples(records, seed: int) -> tuple[list[KTORecord], int]:
    """KTO records from a mix of KTO records and preference pairs, in a seeded random order; (examples, pairs)."""
    pairs = [r for r in records if isinstance(r, PreferencePair)]
    examples = [r for r in records if isinstance(r, KTORecord)] + pairs_to_kto(pairs)
    random.Random(seed).shuffle(examples)  # training reads them in this order (see the module docstring)
    return examples, len(pairs)


def kto_features(chat: ChatFormat, records, max_length: int, seed: int):
    examples, pairs = kto_examples(records, seed)
    stats = PairStats()
    features = [f for r in examples if (f := encode_kto(chat, r, max_length, stats)) is not None]
    info = {k: stats.counts[k] for k in PairStats.DESCRIPTIONS}  # every count, zeros included
    info.update(from_pairs=pairs, desirable=sum(f["label"] for f in features),
                undesirable=sum(not f["label"] for f in features))
    logger.info("KTO examples: %s; %d desirable, %d undesirable (%d from preference pairs)",
                stats.line(), info["desirable"], info["undesirable"], pairs)
    return features, info


def check_kto_options(args: KTOConfig) -> None:
    """What TRL would refuse only after the model is loaded."""
    if args.loss_type == "apo_zero_unpaired":
        return
    if args.per_device_train_batch_size < 2:
        raise ConfigError(f"loss_type {args.loss_type} estimates its KL term from mismatched pairs within a batch: "
                          "per_device_train_batch_size must be at least 2 (4 or more is better)")
    if args.train_sampling_strategy != "sequential":
        raise ConfigError(f"loss_type {args.loss_type} pairs each example with its batch neighbour for the KL term: "
                          "keep train_sampling_strategy: sequential (the data is shuffled once before training)")


def weight_advice(info: dict, args: KTOConfig) -> None:
    """Eq. (8) of the KTO paper: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]."""
    wanted, unwanted = max(info["desirable"], 1), max(info["undesirable"], 1)
    ratio = args.desirable_weight * wanted / (args.undesirable_weight * unwanted)
    if not 1 <= ratio <= 4 / 3:
        low = unwanted * args.undesirable_weight / wanted
        logger.warning("%d desirable vs %d undesirable examples: set desirable_weight in [%.2f, %.2f] "
                       "(weighted ratio now %.2f, the KTO paper recommends 1 to 1.33)",
                       wanted, unwanted, low, low * 4 / 3, ratio)


# ------------------------------------------------------------------------------------------------ model


def prepare_policy(config: RunConfig, tokenizer, length: int | None):
    """(policy, reference or None): LoRA or layer freezing on the starting model, and its reference."""
    from transformers import set_seed

    set_seed(config.training.seed)  # the adapter's initialisation follows `seed`
    model = load_model(config.model, tokenizer, context_length=length, purpose=weights_purpose(config))
    vocabulary_changed = resize_for_tokenizer(model, tokenizer)
    use_lean_activations(model)
    reference = None
    if config.adapter.use_peft:
        extra = ["embed_tokens", "lm_head"] if vocabulary_changed else None
        model = attach_adapter(model, config.adapter, "CAUSAL_LM", extra, config.model.gradient_checkpointing)
        keep_trainable_fp32(model)  # a bf16 base's copied modules (new embeddings) train in fp32
    else:
        freeze_layers(model, config.adapter.freeze_trainable_layers)
        if not config.training.precompute_ref_log_probs:
            # TRL would reload the reference from the model's path: wrong after an in-memory merge or resize.
            reference = copy.deepcopy(model).eval().requires_grad_(False)
    trainable, total = count_parameters(model)
    logger.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model, reference


def use_disabled_adapter_as_reference(trainer: KTOTrainer, config: RunConfig) -> None:
    """TRL copies any adapter it is handed into a frozen "ref" adapter. For a new adapter (zero update) that copy
    is the base itself, so drop it: the reference forward then runs with adapters disabled."""
    model = trainer.model
    if config.adapter.use_peft and not config.adapter.peft_path and "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")


# ------------------------------------------------------------------------------------------------ stage


def run(config: RunConfig) -> dict:
    d, args = config.data, config.training
    refuse_upstream_batching(config.given)
    check_kto_options(args)
    start_from_adapter(config)  # an unmerged SFT adapter: train it on, its frozen copy is the reference
    if "gradient_checkpointing" not in config.given and "activation_checkpointing" not in config.given:
        args.activation_checkpointing = args.gradient_checkpointing = False  # TRL defaults it on; ours is off
    data = load_stage_data(d, DATA_KINDS, args.seed)  # validated before any model loads
    resume = begin_run(config)

    tokenizer = load_tokenizer(config.model)
    add_new_tokens(tokenizer, config.model.new_tokens_file)
    model_config = load_model_config(config.model)
    max_length = args.max_length or model_config.max_position_embeddings
    check_context_length(config, model_config, max_length)
    chat = ChatFormat(tokenizer, config.run.template)
    train, evaluation, info = stage_features(config, data, tokenizer, chat.jinja, {"max_length": max_length},
                                             lambda records: kto_features(chat, records, max_length, args.seed))
    if len(train) < 2:
        raise ConfigError(f"KTO needs at least 2 examples that fit max_length={max_length} ({info})")
    weight_advice(info, args)

    model, reference = prepare_policy(config, tokenizer, max_length)
    start_logs(config, resume)
    trainer = KTOFeaturesTrainer(model=model, ref_model=reference, args=args, train_dataset=train,
                                 eval_dataset=evaluation, processing_class=tokenizer,
                                 callbacks=standard_callbacks(args.output_dir),
                                 chunk_size=config.extra(CausalLMArguments).loss_chunk_size,
                                 packing=config.extra(PackingArguments).packing)
    use_disabled_adapter_as_reference(trainer, config)
    job = TrainingJob(config, tokenizer, chat, train, evaluation, data_sources=datasets_sources(config),
                      stats={"kto_" + k: v for k, v in info.items()})
    return train_and_save(trainer, job, resume, REWARD_PLOTS)


register(Stage(
    name="kto",
    summary="KTO alignment from thumbs-up / thumbs-down answers (or preference pairs split in two)",
    run=run,
    training_class=KTOConfig,
    extra_classes=(PackingArguments, CausalLMArguments),
    data_kind="kto",
))
