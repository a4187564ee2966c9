"""What the training-throughput benchmarks share: per-step timing and token counts inside each child process,
contention measured from /proc/stat, interleaved rounds of child processes, and the summary table.

A side runs in its own child process (its peak RSS is its own): `--only NAME --json PATH` re-invokes the script.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUIET_CORES = 0.25  # a step during which other processes used less than this many cores counts as quiet


def machine_busy_seconds() -> float:
    """CPU-seconds all processes on the machine have been busy (user+nice+system+irq+softirq+steal), from /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
    except OSError:  # not Linux: contention is not measured
        return float("nan")
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def batch_tokens(inputs) -> dict:
    """Token counts of one collated batch: every position, the real (non-padding) ones, the trained ones.

    Understands our batches (`labels`, packed rows without a mask or padded ones with `attention_mask`) and TRL's
    preference batches (`completion_mask`); a reward batch trains on no token (one score per sequence).
    """
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if inputs.get("labels") is not None:
        trained = int((inputs["labels"][:, 1:] != -100).sum())
    elif inputs.get("completion_mask") is not None:
        trained = int(inputs["completion_mask"][:, 1:].sum())
    else:
        trained = 0
    return {"all": int(ids.numel()), "useful": int(mask.sum()) if mask is not None else int(ids.numel()),
            "trained": trained, "shape": list(ids.shape)}


class Recorder:
    """Token counts of every batch a trainer trains on; wall-clock time, own CPU time and the machine's busy CPU
    time at the end of every step (their difference is what other processes took: the run's contention)."""

    def __init__(self, name: str, total_steps: int):
        self.name, self.total_steps = name, total_steps
        self.batches: list[dict] = []  # one per micro-batch (gradient accumulation is 1 here: one per step)
        self.step_ends: list[float] = []
        self.cpu_ends: list[float] = []  # this process's CPU seconds (all threads)
        self.busy_ends: list[float] = []  # the whole machine's busy CPU seconds
        self.losses: list[float] = []
        self.start = self.start_cpu = self.start_busy = None

    def foreign_cores(self, i: int) -> float:
        """Cores that other processes kept busy during step i (0-based), on average."""
        wall = self.step_ends[i] - (self.step_ends[i - 1] if i else self.start)
        busy = self.busy_ends[i] - (self.busy_ends[i - 1] if i else self.start_busy)
        own = self.cpu_ends[i] - (self.cpu_ends[i - 1] if i else self.start_cpu)
        return max(0.0, (busy - own) / wall)

    def count(self, inputs) -> None:
        self.batches.append(batch_tokens(inputs))

    def callback(self):
        from transformers import TrainerCallback

        recorder = self

        class Timing(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                recorder.start_busy, recorder.start_cpu = machine_busy_seconds(), time.process_time()
                recorder.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                recorder.cpu_ends.append(time.process_time())
                recorder.busy_ends.append(machine_busy_seconds())
                previous = recorder.step_ends[-1] if recorder.step_ends else recorder.start
                recorder.step_ends.append(now)
                i = len(recorder.step_ends) - 1
                b = recorder.batches[i] if len(recorder.batches) > i else {}
                print(f"[{recorder.name}] step {state.global_step}/{recorder.total_steps}: {now - previous:6.2f} s, "
                      f"batch {b.get('shape')} useful={b.get('useful')} all={b.get('all')}, "
                      f"other processes {recorder.foreign_cores(i):.2f} cores", file=sys.stderr, flush=True)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    recorder.losses.append(float(logs["loss"]))

        return Timing()


def counting(trainer_class, recorder: Recorder, add_callback: bool = False):
    """A subclass of `trainer_class` that records each batch before training on it (and optionally adds the
    timing callback itself, for trainers built by code we do not call directly)."""

    class Counting(trainer_class):
        def __init__(self, *a, **kw):
            if add_callback:
                kw["callbacks"] = [*(kw.get("callbacks") or []), recorder.callback()]
            super().__init__(*a, **kw)

        def training_step(self, model, inputs, num_items_in_batch=None):
            recorder.count(inputs)
            return super().training_step(model, inputs, num_items_in_batch)

    Counting.__name__ = f"Counting{trainer_class.__name__}"
    return Counting


def summarise(name: str, recorder: Recorder, warmup: int) -> dict:
    steps = len(recorder.step_ends)
    if steps <= warmup:
        raise RuntimeError(f"{name}: only {steps} steps ran, nothing left to time after {warmup} warm-up steps")
    timed = recorder.batches[warmup:steps]
    seconds = recorder.step_ends[-1] - recorder.step_ends[warmup - 1] if warmup else recorder.step_ends[-1] - recorder.start
    useful, every, trained = (sum(b[k] for b in timed) for k in ("useful", "all", "trained"))
    ends = [recorder.start, *recorder.step_ends]
    foreign = [recorder.foreign_cores(i) for i in range(steps)]
    quiet = [i for i in range(warmup, steps) if foreign[i] < QUIET_CORES]
    quiet_seconds = sum(ends[i + 1] - ends[i] for i in quiet)
    cpu_seconds = recorder.cpu_ends[-1] - (recorder.cpu_ends[warmup - 1] if warmup else recorder.start_cpu)
    return {
        "trainer": name,
        "steps": steps,
        "timed_steps": steps - warmup,
        "seconds": seconds,
        "step_seconds": [b - a for a, b in zip(ends, ends[1:])],
        "useful_tokens": useful,
        "all_tokens": every,
        "trained_tokens": trained,
        "useful_tokens_per_s": useful / seconds,
        "all_tokens_per_s": every / seconds,
        "trained_tokens_per_s": trained / seconds,
        "padding_fraction": 1 - useful / every if every else 0.0,
        # contention: other processes' load during the timed steps, and throughput on the quiet steps alone
        "foreign_cores": statistics.fmean(foreign[warmup:]),
        "foreign_cores_per_step": foreign,
        "quiet_steps": len(quiet),
        "quiet_useful_tokens_per_s": sum(recorder.batches[i]["useful"] for i in quiet) / quiet_seconds if quiet else None,
        "cpu_seconds": cpu_seconds,
        "useful_tokens_per_cpu_s": useful / cpu_seconds,
        "final_loss": recorder.losses[-1] if recorder.losses else float("nan"),
        "losses": recorder.losses,
        "batches": recorder.batches,
    }


def child_result(name: str, recorder: Recorder, warmup: int, extra: dict) -> dict:
    """A child's result: the summary, what the side reported about itself, its peak RSS and torch threads."""
    import resource

    import torch

    result = summarise(name, recorder, warmup)
    result.update(extra)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    result["torch_threads"] = torch.get_num_threads()
    return result


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "trl", "peft", "datasets"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "-"
    return out


def machine() -> dict:
    """Where the numbers come from, including the CPU's bf16 matrix path (every CPU figure records it)."""
    from medgpt.hardware import cpu_bf16, cpu_name

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.platform(), "cpu": cpu_name(),
            "cpu_bf16": cpu_bf16(), "cpus": os.cpu_count(), "versions": versions()}


def wait_until_quiet(limit: float, window: float = 10.0) -> tuple[float, float]:
    """Wait (at most `limit` seconds) for a `window` in which the machine is nearly idle; (waited, load in cores)."""
    started = time.perf_counter()
    while True:
        b0, t0 = machine_busy_seconds(), time.perf_counter()
        time.sleep(window)
        load = (machine_busy_seconds() - b0) / (time.perf_counter() - t0)
        waited = time.perf_counter() - started
        if not load >= QUIET_CORES or waited >= limit:  # `not >=`: nan (no /proc/stat) does not wait
            return waited, load


def run_rounds(script: Path, order: list[str], labels: dict[str, str], common: list[str], rounds: int,
               wait_quiet: float, cwd: Path) -> dict[str, list[dict]]:
    """Run every side `rounds` times, each in a child process, rotating the order each round."""
    runs: dict[str, list[dict]] = {name: [] for name in order}
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        for round_index in range(rounds):
            rotated = order[round_index % len(order):] + order[:round_index % len(order)]
            for name in rotated:
                path = Path(tmp) / f"{name}-{round_index}.json"
                command = [sys.executable, str(script), "--only", name, "--json", str(path), *common]
                print(f"--- round {round_index + 1}/{rounds}: {name} ({labels[name]})", flush=True)
                if wait_quiet > 0:
                    waited, load = wait_until_quiet(wait_quiet)
                    print(f"    waited {waited:.0f} s for a quiet machine: other processes use {load:.2f} cores now",
                          flush=True)
                t0 = time.time()
                done = subprocess.run(command, cwd=cwd)
                if done.returncode != 0:
                    raise RuntimeError(f"{name} failed with exit code {done.returncode}")
                result = json.loads(path.read_text())
                print(f"    {name}: {result['useful_tokens_per_s']:.1f} useful tok/s, padding "
                      f"{result['padding_fraction']:.3f}, peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB, "
                      f"other processes {result['foreign_cores']:.2f} cores, {time.time() - t0:.0f} s in all",
                      flush=True)
                runs[name].append(result)
    return runs


def table(results: dict[str, dict], order: list[str]) -> str:
    head = ("side", "timed steps", "s/step", "useful tok/s", "all tok/s", "trained tok/s", "padding",
            "peak RSS GB", "final loss", "other load", "quiet steps", "quiet useful tok/s")
    rows = [head]
    for name in order:
        r = results.get(name)
        if r is None:
            continue
        rows.append((
            name, str(r["timed_steps"]), f"{r['seconds'] / r['timed_steps']:.2f}", f"{r['useful_tokens_per_s']:.1f}",
            f"{r['all_tokens_per_s']:.1f}", f"{r['trained_tokens_per_s']:.1f}", f"{r['padding_fraction']:.3f}",
            f"{r['peak_rss_bytes'] / 1e9:.2f}", f"{r['final_loss']:.4f}", f"{r['foreign_cores']:.2f}",
            f"{r['quiet_steps']}/{r['timed_steps']}",
            "-" if r["quiet_useful_tokens_per_s"] is None else f"{r['quiet_useful_tokens_per_s']:.1f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def combine(runs: list[dict]) -> dict:
    """Several rounds of one side -> one row: median throughputs, largest peak RSS, pooled padding."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[-1])
    for key in ("useful_tokens_per_s", "all_tokens_per_s", "trained_tokens_per_s", "foreign_cores"):
        out[key] = statistics.median(r[key] for r in runs)
    for key in ("seconds", "useful_tokens", "all_tokens", "trained_tokens", "cpu_seconds"):
        out[key] = sum(r[key] for r in runs)
    quiet = [r["quiet_useful_tokens_per_s"] for r in runs if r["quiet_useful_tokens_per_s"] is not None]
    out["quiet_useful_tokens_per_s"] = statistics.median(quiet) if quiet else None
    out["quiet_steps"] = sum(r["quiet_steps"] for r in runs)
    out["timed_steps"] = sum(r["timed_steps"] for r in runs)
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    out["padding_fraction"] = 1 - out["useful_tokens"] / out["all_tokens"] if out["all_tokens"] else 0.0
    out["rounds"] = [{k: r[k] for k in ("useful_tokens_per_s", "all_tokens_per_s", "peak_rss_bytes", "final_loss")}
                     for r in runs]
    return out


def warn_if_loaded(results: dict[str, dict], threads: int) -> None:
    loaded = [n for n, r in results.items() if r["foreign_cores"] >= QUIET_CORES]
    if loaded:
        load = ", ".join(f"{name} {results[name]['foreign_cores']:.2f}" for name in loaded)
        print(f"WARNING: other processes kept cores busy during the timed steps ({load} cores on average, "
              f"{threads} torch threads): throughput is understated there; compare the quiet-step column or rerun "
              "on an idle machine")


def ratio(results: dict[str, dict], a: str, b: str, key: str = "useful_tokens_per_s") -> float | None:
    """results[a][key] / results[b][key] where both sides ran (and have the number)."""
    if a in results and b in results and results[a].get(key) and results[b].get(key):
        return results[a][key] / results[b][key]
    return None


def make_tiny_model(directory: Path, initializer_range: float = 0.02, norm_scale: float = 1.0,
                    context: int = 1024) -> Path:
    """A random 2-layer Llama with the embedded tokenizer (the smoke modes' model: checks a script only).
    initializer_range 0.5: LoRA moves its logits fast (the RL quality scripts); norm_scale 2: its next-token
    distributions are peaked, so a given token comes up now and then."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from medgpt.models.embedded import resolve_embedded
    from medgpt.models.load import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(resolve_embedded("smollm2-135m"))
    ensure_pad_token(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         tie_word_embeddings=True, initializer_range=initializer_range,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.mul_(norm_scale)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def child_or_parent(args, child, parent, print_row=None) -> int:
    """`--only SIDE`: run that side in this process, writing its result to `--json` (what `run_rounds` reads) or
    printing its row; otherwise the parent's interleaved rounds."""
    if not args.only:
        return parent(args)
    result = child(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    else:
        print(print_row(result) if print_row else table({args.only: result}, [args.only]))
    return 0

