"""Checkpoints that can be trusted: a completion marker written after the Trainer finished a save, and
`resume_from_checkpoint: auto` that picks the newest complete one and skips any cut short."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

COMPLETE = "checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class MarkCompleteCheckpoints(TrainerCallback):
    """Write the marker once the Trainer has saved weights, optimizer, scheduler and RNG state."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if path.is_dir():
                (path / COMPLETE).write_text(json.dumps({"global_step": state.global_step}))
        return control


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) for each checkpoint-N directory, oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path, (path / COMPLETE).is_file()))
    return sorted(found)


def resolve_resume(output_dir: str | Path, spec: str | bool | None) -> str | None:
    """`auto`/true -> newest complete checkpoint or None (fresh start); a path must be a complete checkpoint."""
    if spec in (None, False, "", "none", "false"):
        return None
    if spec in (True, "auto", "true", "latest"):
        found = checkpoints(output_dir)
        for step, path, complete in reversed(found):
            if complete:
                logger.info("resuming from %s", path)
                return str(path)
            logger.warning("skipping %s: it was cut short (no %s), probably killed while saving", path, COMPLETE)
        logger.info("no complete checkpoint in %s: starting fresh", output_dir)
        return None
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not (path / COMPLETE).is_file():
        raise ValueError(f"{path} is incomplete (no {COMPLETE}): it was cut short while saving; "
                         "use resume_from_checkpoint: auto to take the newest complete one")
    return str(path)
