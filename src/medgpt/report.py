"""Metrics on disk and as pictures: `metrics.jsonl` (every logged step) and loss/reward plots (PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"


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
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_series(rows: list[dict], keys: list[str], png: str | Path, title: str, ylabel: str = "") -> Path | None:
    """Plot each key against step; rows lacking a key are skipped. None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
              for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for key, points in series.items():
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel or ", ".join(series))
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)
    return Path(png)


def plot_losses(metrics_path: str | Path, png: str | Path, title: str = "loss") -> Path | None:
    return plot_series(read_metrics(metrics_path), ["loss", "eval_loss"], png, title, "loss")
