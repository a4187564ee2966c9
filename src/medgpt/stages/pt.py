"""Stage 1, continued pretraining (PT): inject domain knowledge from raw text, packed by document."""

from __future__ import annotations

import torch
from transformers import TrainingArguments

from medgpt.arguments import CausalLMArguments
from medgpt.config import ConfigError, RunConfig, check_context_length
from medgpt.data.features import map_in_chunks, stage_features
from medgpt.data.loading import StageData, load_stage_data, load_validation_data, stream_records
from medgpt.data.processors import document_ids, leading_bos, pack_documents
from medgpt.data.templates import ChatFormat
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


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Packed blocks produced lazily from a stream of documents: the corpus is never held in memory."""

    def __init__(self, config: RunConfig, tokenizer, block_size: int):
        self.config, self.tokenizer, self.block_size = config, tokenizer, block_size

    def __iter__(self):
        records = stream_records(self.config.data, ("text",))
        bos = leading_bos(self.tokenizer)
        return pack_documents(document_ids(records, self.tokenizer, bos), self.block_size)


def blocks(records, tokenizer, block_size: int, workers: int | None = None):
    """Documents tokenised (in `workers` processes), then packed in order in this one: the blocks do not depend
    on the number of workers."""
    bos = leading_bos(tokenizer)
    parts = map_in_chunks(lambda chunk: list(document_ids(chunk, tokenizer, bos)), records, workers)
    features = list(pack_documents((ids for part in parts for ids in part), block_size))
    return features, {"documents": len(records), "blocks": len(features),
                      "tokens": sum(len(f["input_ids"]) for f in features)}


def run(config: RunConfig) -> dict:
    d = config.data
    # validated before any model loads (a stream is checked as it is read)
    data = None if d.streaming else load_stage_data(d, ("text",), config.training.seed)
    validation = load_validation_data(d, ("text",)) if d.streaming else []
    resume = begin_run(config)
    tokenizer = load_tokenizer(config.model)
    add_new_tokens(tokenizer, config.model.new_tokens_file)
    model_config = load_model_config(config.model)
    d.block_size = d.block_size or min(1024, model_config.max_position_embeddings)
    check_context_length(config, model_config, d.block_size)
    chat = ChatFormat(tokenizer, config.run.template) if config.run.template or tokenizer.chat_template else None
    stats = {}
    build = lambda records: blocks(records, tokenizer, d.block_size, d.preprocessing_num_workers)  # noqa: E731
    if d.streaming:
        train = StreamingBlocks(config, tokenizer, d.block_size)
        evaluation = None
        if validation:  # a stream has no split of its own: the validation files are read and evaluated in full
            evaluation, _, _ = stage_features(config, StageData(validation, [], 0), tokenizer, "",
                                              {"block_size": d.block_size, "streaming_validation": True},
                                              build, record_wise=False)
    else:
        train, evaluation, info = stage_features(config, data, tokenizer, "", {"block_size": d.block_size},
                                                 build, record_wise=False)
        stats = {"train_" + k: v for k, v in info.items()}
        if not len(train):
            raise ConfigError("the training text produced no tokens")
    chunk = config.extra(CausalLMArguments).loss_chunk_size
    model = prepare_model(config, tokenizer, d.block_size, chunk)
    job = TrainingJob(config, tokenizer, chat, train, evaluation, packing=True, loss_chunk_size=chunk,
                      data_sources=datasets_sources(config), stats=stats)
    return train_causal_lm(job, model, resume)


register(Stage(
    name="pt",
    summary="continued pretraining on domain text (packed by document)",
    run=run,
    training_class=TrainingArguments,
    extra_classes=(CausalLMArguments,),
    data_kind="text",
))
