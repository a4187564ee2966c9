"""Tokenised features cached on disk, built once: the first process to take the lock builds, the others
(other ranks of `torchrun`, later runs) wait on the file lock — not inside a distributed collective, so a
long tokenisation never trips the process-group timeout — and then load the same files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
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
