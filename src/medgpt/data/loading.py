"""Training and validation records for a stage, from DataArguments: files and/or a hub dataset, validated,
split, and capped — or, with `streaming`, a lazy iterator that never holds the corpus in memory."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterator

from medgpt.arguments import DataArguments
from medgpt.data.readers import (
    ReadOptions,
    ReadResult,
    check_kind,
    collect,
    file_reader,
    finish,
    hub_reader,
    no_records_error,
    resolve_many,
)
from medgpt.data.records import DataError, InvalidDataError, Record, Source

logger = logging.getLogger(__name__)


@dataclass
class StageData:
    train: list[Record]
    eval: list[Record]
    skipped: int  # invalid records dropped (skip_invalid_records)


def _read(specs: str | None, hub: str | None, args: DataArguments, kinds: tuple[str, ...], split: str) -> ReadResult:
    options = ReadOptions.from_args(args)
    result = ReadResult()
    if specs:
        for path in resolve_many(specs):
            collect(file_reader(path, options), str(path), kinds, result)
    if hub:
        reader = hub_reader(hub, args.dataset_config_name, split, options, streaming=False, cache_dir=args.cache_dir)
        collect(reader, hub, kinds, result)
    return finish(result, args.skip_invalid_records)


def load_stage_data(args: DataArguments, kinds: tuple[str, ...], seed: int = 42) -> StageData:
    """Read, validate (before any model loads), split off validation records, apply max_*_samples."""
    train = _read(args.train_file_dir, args.dataset_name, args, kinds, "train")
    records, skipped = train.records, len(train.errors)
    if args.validation_file_dir:
        evaluation = _read(args.validation_file_dir, None, args, kinds, "validation")
        eval_records, skipped = evaluation.records, skipped + len(evaluation.errors)
    elif args.validation_split_percentage > 0:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, int(len(records) * args.validation_split_percentage / 100))
        held = set(order[:n_eval])
        eval_records = [r for i, r in enumerate(records) if i in held]
        records = [r for i, r in enumerate(records) if i not in held]
    else:
        eval_records = []
    if args.train_shard:
        index, count = shard_of(args.train_shard)
        records = records[index::count]
    if args.max_train_samples is not None:
        records = records[: args.max_train_samples]
    if args.max_eval_samples is not None:
        eval_records = eval_records[: args.max_eval_samples]
    if not records:
        where = Source(str(args.train_file_dir or args.dataset_name), 0)
        raise InvalidDataError([DataError(where, "records", "no training records left after the validation split")])
    logger.info("data: %d training and %d validation records (%d invalid skipped)", len(records), len(eval_records), skipped)
    return StageData(records, eval_records, skipped)


def shard_of(spec: str) -> tuple[int, int]:
    """`K/N` (train_shard) as (K - 1, N); config validation refuses anything else."""
    index, count = (int(part) for part in spec.split("/"))
    return index - 1, count


def load_validation_data(args: DataArguments, kinds: tuple[str, ...]) -> list[Record]:
    """The validation records alone (capped by max_eval_samples): what a streamed training set is evaluated on."""
    if not args.validation_file_dir:
        return []
    records = _read(args.validation_file_dir, None, args, kinds, "validation").records
    return records[: args.max_eval_samples] if args.max_eval_samples is not None else records


def stream_records(args: DataArguments, kinds: tuple[str, ...]) -> Iterator[Record]:
    """Records one at a time, files then hub rows, for corpora larger than memory. A bad record stops the
    stream with its file:line unless skip_invalid_records, which logs and skips it; a source without a valid
    record stops it too."""
    options = ReadOptions.from_args(args)
    readers = []
    if args.train_file_dir:
        readers += [(str(p), file_reader(p, options)) for p in resolve_many(args.train_file_dir)]
    if args.dataset_name:
        readers.append((args.dataset_name, hub_reader(args.dataset_name, args.dataset_config_name, "train",
                                                      options, streaming=True, cache_dir=args.cache_dir)))
    skipped = 0
    produced = 0
    shard, shards = shard_of(args.train_shard) if args.train_shard else (0, 1)
    seen = 0
    for name, reader in readers:
        good = invalid = 0
        for item in reader:
            if isinstance(item, DataError):
                if not args.skip_invalid_records:
                    raise InvalidDataError([item])
                skipped, invalid = skipped + 1, invalid + 1
                if skipped <= 5:
                    logger.warning("skipping invalid record: %s", item)
                continue
            wrong = check_kind(item, item.source, name, reader, kinds)
            if wrong:
                raise InvalidDataError([wrong])
            good += 1
            seen += 1
            if (seen - 1) % shards != shard:
                continue
            yield item
            produced += 1
            if args.max_train_samples is not None and produced >= args.max_train_samples:
                return
        if not good:
            raise InvalidDataError([no_records_error(name, invalid)])
