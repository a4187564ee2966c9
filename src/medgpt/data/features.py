"""Tokenised features cached on disk, built once: the first process to take the lock builds, the others
(other ranks of `torchrun`, later runs) wait on the file lock — not inside a distributed collective, so a
long tokenisation never trips the process-group timeout — and then load the same files. The builder may
tokenise in several processes (`preprocessing_num_workers`): contiguous chunks of records, joined in order."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from numbers import Number
from pathlib import Path
from typing import Any, Callable, Iterable

from filelock import FileLock

from medgpt.models.embedded import cache_root

logger = logging.getLogger(__name__)


def source_fingerprint(paths: Iterable[str | Path]) -> list[tuple[str, int, int]]:
    """Path, size and modification time of each input file: a changed file means new features."""
    out = []
    for path in paths:
        stat = Path(path).stat()
        out.append((str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns))
    return out


def tokenizer_fingerprint(tokenizer, template: str) -> dict[str, Any]:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"tokenizer": tokenizer.name_or_path, "vocab": hashlib.sha256(vocab.encode()).hexdigest()[:16],
            "template": hashlib.sha256(template.encode()).hexdigest()[:16]}


INFO_FILE = "medgpt_info.json"


def cached_features(key: dict[str, Any], build: Callable[[], tuple[list[dict], dict]], overwrite: bool = False):
    """(`datasets.Dataset`, info) for `key`, from the cache or built now and cached.

    `build` returns the features and a small info dict (e.g. truncation counts) kept beside them.
    """
    from datasets import Dataset, load_from_disk

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    target = cache_root() / "features" / digest
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if overwrite and target.exists():
            shutil.rmtree(target)
        if not (target / "dataset_info.json").is_file():
            features, info = build()
            tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            Dataset.from_list(features).save_to_disk(str(tmp))
            (tmp / INFO_FILE).write_text(json.dumps(info), encoding="utf-8")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            logger.info("tokenised %d samples -> %s", len(features), target)
        else:
            logger.info("using cached features %s", target)
    return load_from_disk(str(target)), json.loads((target / INFO_FILE).read_text(encoding="utf-8"))


_CHUNK_WORK: tuple[Callable, list] | None = None  # what forked workers run: set in the parent before forking


def _run_chunk(index: int):
    function, chunks = _CHUNK_WORK
    return function(chunks[index])


def map_in_chunks(function: Callable[[list], Any], items: list, workers: int | None) -> list:
    """`function` applied to contiguous chunks of `items`, in `workers` forked processes when more than one;
    the results in chunk order. Forking shares the tokenizer and template with the workers without pickling."""
    global _CHUNK_WORK
    workers = min(workers or 1, len(items))
    if workers <= 1:
        return [function(items)]
    if "fork" not in multiprocessing.get_all_start_methods():
        raise RuntimeError("preprocessing_num_workers needs the fork start method (Linux, macOS): leave it unset here")
    size = -(-len(items) // (workers * 4))  # four chunks per worker keeps them all busy to the end
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    _CHUNK_WORK = (function, chunks)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_run_chunk, range(len(chunks)))
    finally:
        _CHUNK_WORK = None
    logger.info("tokenised %d records in %d processes", len(items), workers)
    return results


def build_in_chunks(build: Callable[[list], tuple[list[dict], dict]], records: list, workers: int | None):
    """`build(records)` computed chunk by chunk: features joined in order, info counts summed. Valid for builders
    that treat each record on its own (SFT, RM, DPO)."""
    features: list[dict] = []
    info: dict[str, Any] = {}
    for part, part_info in map_in_chunks(build, records, workers):
        features += part
        for key, value in part_info.items():
            if not isinstance(value, Number):
                raise TypeError(f"info {key!r} of a chunked build must be a count, got {value!r}")
            info[key] = info.get(key, 0) + value
    return features, info


def stage_features(config, data, tokenizer, template: str, settings: dict[str, Any],
                   build: Callable[[list], tuple[list[dict], dict]], record_wise: bool = True):
    """(train, eval or None, train info): both splits of a stage's data tokenised by `build`, cached under a
    key made of the input files, the data options, the tokenizer and template, and the stage's `settings`.

    `record_wise`: `build` treats each record on its own, so with preprocessing_num_workers the records are
    split across processes here; a builder that is not (PT packs across documents) parallelises inside itself.
    """
    from medgpt.data.readers import resolve_many

    d = config.data
    if record_wise:
        whole = build
        build = lambda records: build_in_chunks(whole, records, d.preprocessing_num_workers)  # noqa: E731
    key = {"stage": config.stage, **settings,
           "files": source_fingerprint(resolve_many(d.train_file_dir)) if d.train_file_dir else [],
           "validation": source_fingerprint(resolve_many(d.validation_file_dir)) if d.validation_file_dir else [],
           "hub": [d.dataset_name, d.dataset_config_name],
           "options": [d.validation_split_percentage, d.max_train_samples, d.train_shard, d.max_eval_samples,
                       d.skip_invalid_records, d.data_format, d.text_separator, d.keep_linebreaks, config.training.seed],
           **tokenizer_fingerprint(tokenizer, template)}
    train, info = cached_features({**key, "split": "train"}, lambda: build(data.train), d.overwrite_cache)
    evaluation = None
    if data.eval:
        evaluation, _ = cached_features({**key, "split": "eval"}, lambda: build(data.eval), d.overwrite_cache)
    return train, evaluation, info
