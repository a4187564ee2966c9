"""Stage 2, supervised fine-tuning (SFT): learn to answer, on assistant turns only, padding-free."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers import TrainingArguments

from medgpt.arguments import CausalLMArguments, documented
from medgpt.config import ConfigError, RunConfig, check_context_length
from medgpt.data.features import stage_features
from medgpt.data.loading import load_stage_data
from medgpt.data.processors import SFTStats, encode_sft
from medgpt.data.templates import ChatFormat, TemplateError
from medgpt.models.load import load_model_config, load_tokenizer
from medgpt.stages import Stage, register
from medgpt.training.recipe import (
    TrainingJob,
    add_new_tokens,
    begin_run,
    datasets_sources,
    prepare_model,
    train_causal_lm,
)


logger = logging.getLogger(__name__)


@dataclass
class SFTArguments:
    """Options of supervised fine-tuning."""

    max_length: int = documented(
        """Longest training sample in tokens. Longer conversations are cut after the last assistant reply that
        fits (its end-of-turn kept); a first reply that does not fit is cut without a fake end-of-turn; samples
        whose prompt alone is longer are dropped and counted. Memory grows with it.""",
        default=1024,
    )
    packing: bool = documented(
        """Padding-free batches: the samples of a batch are concatenated into one row with per-sample position
        ids, so no compute is spent on padding and samples never attend to each other. false pads each batch
        to its longest sample (use it for kernels that cannot take packed rows).""",
        default=True,
    )
    sample_prompts: int = documented(
        """After training, answer this many held-out prompts (validation split, else training data) with the
        trained model and write them to samples.jsonl next to the model. 0 = off; generation is slow on CPU.""",
        default=0,
    )


def sft_features(chat: ChatFormat, records, max_length: int, train_on_prompt: bool):
    stats = SFTStats()
    features = []
    for record in records:
        try:
            feature = encode_sft(chat, record, max_length, train_on_prompt, stats)
        except TemplateError as err:  # the template refuses the record: say which one
            raise TemplateError(f"{record.source}: {err}") from None
        if feature is not None:
            features.append(feature)
    logger.info("SFT samples (max_length %d): %s", max_length, stats.line())
    info = dict(stats.counts)
    info["tokens"] = sum(len(f["input_ids"]) for f in features)
    info["trained_tokens"] = sum(sum(label != -100 for label in f["labels"]) for f in features)
    return features, info


def run(config: RunConfig) -> dict:
    d, sft = config.data, config.extra(SFTArguments)
    data = load_stage_data(d, ("conversation",), config.training.seed)  # validated before any model loads
    resume = begin_run(config)
    tokenizer = load_tokenizer(config.model)
    add_new_tokens(tokenizer, config.model.new_tokens_file)
    check_context_length(config, load_model_config(config.model), sft.max_length)
    chat = ChatFormat(tokenizer, config.run.template)
    settings = {"max_length": sft.max_length, "train_on_prompt": config.run.train_on_prompt}
    train, evaluation, info = stage_features(
        config, data, tokenizer, chat.jinja, settings,
        lambda records: sft_features(chat, records, sft.max_length, config.run.train_on_prompt))
    if not len(train):
        raise ConfigError(f"no SFT sample fits max_length={sft.max_length} ({info}): raise max_length")
    chunk = config.extra(CausalLMArguments).loss_chunk_size
    model = prepare_model(config, tokenizer, sft.max_length, chunk)
    prompts = [r.messages[: max(i for i, m in enumerate(r.messages) if m.role == "assistant" and i > 0)]
               for r in (data.eval or data.train)[: sft.sample_prompts]]
    job = TrainingJob(config, tokenizer, chat, train, evaluation, packing=sft.packing, loss_chunk_size=chunk,
                      data_sources=datasets_sources(config), stats={"sft_" + k: v for k, v in info.items()},
                      sample_prompts=prompts)
    return train_causal_lm(job, model, resume)


register(Stage(
    name="sft",
    summary="supervised fine-tuning on conversations (assistant-only loss, padding-free packing)",
    run=run,
    training_class=TrainingArguments,
    extra_classes=(SFTArguments, CausalLMArguments),
    data_kind="conversation",
))
