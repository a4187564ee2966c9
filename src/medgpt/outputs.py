"""What a run leaves on disk: atomic final saves and the model card every trained output carries."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
from pathlib import Path
from typing import Iterator

DISCLAIMER = (
    "**Medical disclaimer.** This model is research software, not a medical device. Its answers can be wrong, "
    "incomplete or outdated and must not replace the judgement of a qualified clinician. In an emergency, call "
    "your local emergency number."
)


def prepare_output_dir(path: str | Path, overwrite: bool = False, resuming: bool = False) -> Path:
    """Refuse a non-empty output directory unless overwriting or resuming (a typo must not clobber a model)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (overwrite or resuming):
        raise FileExistsError(
            f"{path} is not empty: choose another output_dir, set overwrite_output_dir: true, "
            "or resume with resume_from_checkpoint: auto"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` in one rename.

    A crash while writing leaves `final` as it was (and a `.tmp-…` directory to delete), never half-written.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)  # left by a run killed between the two renames
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_model_card(directory: str | Path, *, base_model: str, stages: list[str], data: list[str],
                     metrics: dict[str, float] | None = None, method: str = "", template: str = "",
                     notes: str = "", title: str | None = None) -> Path:
    """README.md for a trained output: base model, data, stages, metrics, and the medical disclaimer."""
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                     for k, v in (metrics or {}).items())
    text = f"""---
license: apache-2.0
base_model: {base_model}
tags: [medgpt, medical, {', '.join(stages)}]
---

# {title or Path(directory).name}

Trained with medgpt on {datetime.date.today().isoformat()}.

- **Base model:** `{base_model}`
- **Stages:** {' -> '.join(stages)}
- **Method:** {method or 'n/a'}
- **Chat template:** {template or "the tokenizer's own"}
- **Data:** {', '.join(f'`{d}`' for d in data) or 'n/a'}

## Metrics

| metric | value |
| --- | --- |
{rows or '| (none recorded) | |'}

{notes}

{DISCLAIMER}
"""
    path = Path(directory) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path
