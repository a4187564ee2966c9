"""The files a run leaves for others to read: `metrics.jsonl` (every logged step, written while training) and
`train_results.json` (written last: a directory with it is complete). Training writes them; the report, the
pipeline and the tests read them. This module imports nothing of medgpt, so those arrows run one way."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "train_results.json"


class MetricsWriter(TrainerCallback):
    """Append every log the Trainer emits as one JSON line, with its step and epoch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        # Resuming from step N: rows logged after N by the interrupted run are replayed now, so drop them.
        if state.is_world_process_zero and state.global_step > 0 and self.path.is_file():
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= state.global_step]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        return control


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; none when the file is not there (yet)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_json(path: str | Path) -> dict:
    """A JSON object file (train_results.json, an evaluation's metrics.json); {} when it is not there (yet)."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
