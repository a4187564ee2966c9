"""Checkpoints that can be trusted: a completion marker written after the Trainer finished a save,
`resume_from_checkpoint: auto` that picks the newest complete one and skips any cut short, and a resume that
trains nothing when the checkpoint already holds the last step."""

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


class _AlreadyFinished(Exception):
    """Raised out of `Trainer.train` by `_StopAtLastStep`: the resumed checkpoint holds the last step."""


class _StopAtLastStep(TrainerCallback):
    """Leave `train()` before its first step when the restored state has reached this run's `max_steps`.

    The Trainer looks at max_steps only after a step (`DefaultFlowCallback.on_step_end`), and on resume skips
    global_step // steps_per_epoch whole epochs and the rest of one: a checkpoint at max_steps in mid-epoch (or
    in a streamed dataset, whose "epoch" is max_steps long) leaves batches in the loop, so one more step would
    train and be saved as the result. `on_train_begin` is the first event after the weights, optimizer and state
    are restored and `state.max_steps` is this run's, and nothing in the loop can be stopped from a callback
    before a step: hence the exception.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            raise _AlreadyFinished
        return control


def resume_training(trainer, resume: str | None) -> dict:
    """`trainer.train(resume)`'s metrics; a checkpoint already at max_steps is restored (weights, state, and the
    best model with load_best_model_at_end, as train() ends) and trained no further."""
    if resume is None:
        return dict(trainer.train().metrics)
    guard = _StopAtLastStep()
    trainer.add_callback(guard)  # last: every other callback has seen on_train_begin (metrics.jsonl is trimmed)
    try:
        # The Trainer never reads resume_from_checkpoint from its arguments: it must be passed here.
        return dict(trainer.train(resume_from_checkpoint=resume).metrics)
    except _AlreadyFinished:
        args, state = trainer.args, trainer.state
        logger.warning("%s already holds step %d of %d: nothing left to train, it is the final model", resume,
                       state.global_step, state.max_steps)
        if args.load_best_model_at_end and state.best_model_checkpoint is not None:
            trainer._load_best_model()
        trainer.control = trainer.callback_handler.on_train_end(args, state, trainer.control)
        trainer.is_in_train = False
        return {"epoch": state.epoch, "total_flos": state.total_flos}
    finally:
        trainer.remove_callback(guard)
