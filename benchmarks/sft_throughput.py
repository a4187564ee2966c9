"""SFT LoRA throughput and memory: our `sft` stage vs a plain `transformers.Trainer` vs TRL's `SFTTrainer`.

One invocation runs the same job three times, each trainer in its own child process (so peak RSS is the
trainer's own) one after another:

  ours   medgpt's real `sft` stage (`get_stage("sft").run(build_config(...))`): padding-free batches, chunked
         loss on assistant tokens only. The only change is that the stage's trainer class is swapped for a
         subclass that records each batch's token counts and adds a timing callback.
  plain  `transformers.Trainer` + peft the way MedicalGPT / LLaMA-Factory train: the same tokenised samples (same
         assistant-only labels), padded to the longest sample of each batch (our `PaddedCollator`), the model's
         own forward with labels (full logits, HF causal-LM loss).
  trl    TRL `SFTTrainer` with `packing=True` (BFD packing, which TRL runs padding-free) and the same LoRA given
         as `peft_config`. It gets the same tokenised samples as a pre-tokenised `input_ids` + `labels` dataset
         (TRL skips its own tokenisation then and keeps our assistant-only labels; see benchmarks/README.md).

Job: embedded model `smollm2-135m`, LoRA r=8 alpha=16 dropout=0 on all linear layers, max length 512, batch 4,
fp32, lr 1e-4, 12 optimizer steps of which the first 2 are not timed. Per trainer: useful (non-padding)
tokens/s, all tokens/s (padding included), padding fraction, peak RSS of the process, final loss. The last line
printed is

  useful_tokens_per_s_ratio=R vs_packing_ratio=Q padding_fraction=P peak_rss_ratio=M

with R = ours/plain useful tokens/s, Q = ours/trl useful tokens/s, P = our padding fraction, M = ours/plain
peak RSS.

    .venv/bin/python benchmarks/sft_throughput.py --data ../shared/fixtures/medicalgpt/medical_sft_1K_format.jsonl
    .venv/bin/python benchmarks/sft_throughput.py --steps 3 --warmup 1 --max-records 20   # smoke run
    .venv/bin/python benchmarks/sft_throughput.py --only ours                              # one trainer
    .venv/bin/python benchmarks/sft_throughput.py --trainers ours --loss-chunk-size 1024   # ours, another chunk
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = ("ours", "plain", "trl")
QUIET_CORES = 0.25  # a step during which other processes used less than this many cores counts as quiet
LABELS = {
    "ours": "medgpt sft (padding-free, chunked loss)",
    "plain": "transformers.Trainer + peft (padded)",
    "trl": "trl SFTTrainer (packing=True)",
}


# ---------------------------------------------------------------------------------------------- child side


def job_options(args, output_dir: str) -> dict:
    """The options of the job, as the `sft` stage reads them (also the source of the other trainers' settings)."""
    return {
        "model_name_or_path": "smollm2-135m",
        "torch_dtype": "fp32",
        "bf16": False,
        "train_file_dir": str(args.data),
        "max_train_samples": args.max_records,
        "output_dir": output_dir,
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "max_length": args.max_length,
        "packing": True,
        "use_peft": True,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": "all",
        "learning_rate": 1e-4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": args.seed,
        **({"loss_chunk_size": args.loss_chunk_size} if args.loss_chunk_size else {}),
    }


def machine_busy_seconds() -> float:
    """CPU-seconds all processes on the machine have been busy (user+nice+system+irq+softirq+steal), from /proc/stat."""
    try:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
    except OSError:  # not Linux: contention is not measured
        return float("nan")
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


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
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        self.batches.append({
            "all": int(ids.numel()),
            "useful": int(mask.sum()) if mask is not None else int(ids.numel()),
            "trained": int((labels[:, 1:] != -100).sum()) if labels is not None else 0,
            "shape": list(ids.shape),
        })

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


def load_features(config):
    """The tokenised samples exactly as the `sft` stage builds them (same records, template, masks, truncation)."""
    from medgpt.data.loading import load_stage_data
    from medgpt.data.templates import ChatFormat
    from medgpt.models.load import load_tokenizer
    from medgpt.stages.sft import SFTArguments, sft_features

    data = load_stage_data(config.data, ("conversation",), config.training.seed)
    tokenizer = load_tokenizer(config.model)
    chat = ChatFormat(tokenizer, config.run.template)
    features, info = sft_features(chat, data.train, config.extra(SFTArguments).max_length, config.run.train_on_prompt)
    return tokenizer, features, info


def load_lora_model(config, tokenizer, max_length: int, attach: bool = True):
    """The model as `prepare_model` loads it, minus the chunked-loss patch: the stock forward and loss."""
    from medgpt.models.adapters import attach_adapter
    from medgpt.models.load import load_model
    from medgpt.training.recipe import resize_for_tokenizer

    model = load_model(config.model, tokenizer, context_length=max_length)
    resize_for_tokenizer(model, tokenizer)
    if attach:
        model = attach_adapter(model, config.adapter, "CAUSAL_LM", None, config.model.gradient_checkpointing)
    return model


def run_ours(args, recorder: Recorder, output_dir: str) -> dict:
    import medgpt.training.recipe as recipe
    from medgpt.config import build_config
    from medgpt.stages import get_stage

    stage = get_stage("sft")
    config = build_config(stage, job_options(args, output_dir))
    if not hasattr(recipe, "CausalLMTrainer"):
        raise RuntimeError("medgpt.training.recipe no longer builds a CausalLMTrainer: update this benchmark")
    recipe.CausalLMTrainer = counting(recipe.CausalLMTrainer, recorder, add_callback=True)
    metrics = stage.run(config)
    return {"samples": metrics.get("sft_kept", 0) + metrics.get("sft_truncated_at_turn", 0)
            + metrics.get("sft_truncated_in_reply", 0),
            "data": {k: v for k, v in metrics.items() if k.startswith("sft_")},
            "settings": {"bf16": config.training.bf16, "activation_checkpointing": config.training.activation_checkpointing,
                         "optim": str(config.training.optim)}}


def run_plain(args, recorder: Recorder, output_dir: str) -> dict:
    from datasets import Dataset
    from transformers import Trainer

    from medgpt.config import build_config
    from medgpt.data.collators import PaddedCollator
    from medgpt.stages import get_stage

    config = build_config(get_stage("sft"), job_options(args, output_dir))
    tokenizer, features, info = load_features(config)
    model = load_lora_model(config, tokenizer, args.max_length)
    training = config.training  # the very TrainingArguments our stage trains with
    training.remove_unused_columns = False  # the features hold exactly input_ids, labels, position_ids
    trainer = counting(Trainer, recorder)(
        model=model, args=training, train_dataset=Dataset.from_list(features),
        data_collator=PaddedCollator(tokenizer.pad_token_id), processing_class=tokenizer,
        callbacks=[recorder.callback()],
    )
    trainer.train()
    return {"samples": len(features), "data": {"sft_" + k: v for k, v in info.items()},
            "settings": {"bf16": training.bf16, "activation_checkpointing": training.activation_checkpointing,
                         "optim": str(training.optim)}}


def run_trl(args, recorder: Recorder, output_dir: str) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from medgpt.config import build_config
    from medgpt.models.adapters import lora_config
    from medgpt.stages import get_stage

    config = build_config(get_stage("sft"), job_options(args, output_dir))
    tokenizer, features, info = load_features(config)
    model = load_lora_model(config, tokenizer, args.max_length, attach=False)  # TRL attaches the LoRA itself
    ours = config.training
    training = SFTConfig(
        output_dir=output_dir, max_steps=ours.max_steps, per_device_train_batch_size=ours.per_device_train_batch_size,
        gradient_accumulation_steps=1, learning_rate=ours.learning_rate, lr_scheduler_type=ours.lr_scheduler_type,
        warmup_steps=ours.warmup_steps, weight_decay=ours.weight_decay, max_grad_norm=ours.max_grad_norm,
        optim=ours.optim, seed=ours.seed, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=ours.use_cpu,
        # SFTConfig's own defaults differ from TrainingArguments: bf16 and activation checkpointing on. Same job: off.
        bf16=False, fp16=False, gradient_checkpointing=False, activation_checkpointing=False,
        max_length=args.max_length, packing=True,  # packing_strategy "bfd" => TRL turns padding_free on
        dataset_num_proc=None,
    )
    dataset = Dataset.from_list([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
    trainer = counting(SFTTrainer, recorder)(
        model=model, args=training, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora_config(config.adapter, "CAUSAL_LM"), callbacks=[recorder.callback()],
    )
    rows = len(trainer.train_dataset)
    trainer.train()
    return {"samples": len(features), "packed_rows": rows, "padding_free": bool(trainer.padding_free),
            "data": {"sft_" + k: v for k, v in info.items()},
            "settings": {"bf16": training.bf16, "activation_checkpointing": training.activation_checkpointing,
                         "optim": str(training.optim), "packing_strategy": training.packing_strategy}}


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


def child(args) -> dict:
    import torch
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    hf_logging.set_verbosity_warning()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    recorder = Recorder(args.only, args.steps)
    runner = {"ours": run_ours, "plain": run_plain, "trl": run_trl}[args.only]
    with tempfile.TemporaryDirectory(prefix=f"sft-bench-{args.only}-") as output_dir:
        extra = runner(args, recorder, output_dir)
    result = summarise(args.only, recorder, args.warmup)
    result.update(extra)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    result["torch_threads"] = torch.get_num_threads()
    return result


# ---------------------------------------------------------------------------------------------- parent side


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "trl", "peft", "datasets"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "-"
    return out


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


def table(results: dict[str, dict]) -> str:
    head = ("trainer", "timed steps", "s/step", "useful tok/s", "all tok/s", "trained tok/s", "padding",
            "peak RSS GB", "final loss", "other load", "quiet steps", "quiet useful tok/s")
    rows = [head]
    for name in TRAINERS:
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
    """Several rounds of one trainer -> one row: median throughputs, largest peak RSS, pooled padding."""
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


def parent(args) -> int:
    threads = args.threads or len(os.sched_getaffinity(0))
    order = [t for t in TRAINERS if t in args.trainers]
    common = ["--data", str(args.data), "--max-records", str(args.max_records), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--batch", str(args.batch), "--max-length", str(args.max_length),
              "--seed", str(args.seed), "--threads", str(threads), "--loss-chunk-size", str(args.loss_chunk_size)]
    runs: dict[str, list[dict]] = {name: [] for name in order}
    print(f"SFT throughput: data={args.data} first {args.max_records} records, {args.steps} steps "
          f"({args.warmup} warm-up), batch {args.batch}, max_length {args.max_length}, fp32, {threads} torch threads, "
          f"{args.rounds} round(s), order per round rotates: {order}", flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        for round_index in range(args.rounds):
            rotated = order[round_index % len(order):] + order[:round_index % len(order)]
            for name in rotated:
                path = Path(tmp) / f"{name}-{round_index}.json"
                command = [sys.executable, str(Path(__file__).resolve()), "--only", name, "--json", str(path), *common]
                print(f"--- round {round_index + 1}/{args.rounds}: {name} ({LABELS[name]})", flush=True)
                if args.wait_quiet > 0:
                    waited, load = wait_until_quiet(args.wait_quiet)
                    print(f"    waited {waited:.0f} s for a quiet machine: other processes use {load:.2f} cores now",
                          flush=True)
                t0 = time.time()
                done = subprocess.run(command, cwd=ROOT)
                if done.returncode != 0:
                    print(f"{name} failed with exit code {done.returncode}", file=sys.stderr)
                    return done.returncode
                result = json.loads(path.read_text())
                print(f"    {name}: {result['useful_tokens_per_s']:.1f} useful tok/s, padding "
                      f"{result['padding_fraction']:.3f}, peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB, "
                      f"other processes {result['foreign_cores']:.2f} cores, {time.time() - t0:.0f} s in all",
                      flush=True)
                runs[name].append(result)
    results = {name: combine(r) for name, r in runs.items()}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "torch_threads": threads, "versions": versions(),
            "load_average_after": os.getloadavg(), "wall_seconds": time.time() - started,
            "options": {k: str(v) for k, v in vars(args).items()}}
    if args.output:
        Path(args.output).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print()
    print(f"{meta['date']}  {meta['machine']}  {meta['cpus']} CPUs, {threads} torch threads  "
          + " ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    for name in order:
        r = results[name]
        extra = f", {r['packed_rows']} packed rows, padding_free={r['padding_free']}" if "packed_rows" in r else ""
        print(f"{name}: {LABELS[name]}; {r['samples']} samples{extra}; data {r.get('data')}; {r.get('settings')}")
    print(table(results))
    if not all(name in results for name in ("ours", "plain", "trl")):
        return 0
    ours, plain, trl = results["ours"], results["plain"], results["trl"]
    loaded = [n for n, r in results.items() if r["foreign_cores"] >= QUIET_CORES]
    if loaded:
        load = ", ".join(f"{name} {results[name]['foreign_cores']:.2f}" for name in loaded)
        print(f"WARNING: other processes kept cores busy during the timed steps ({load} cores on average, "
              f"{threads} torch threads): throughput is understated there; compare the quiet-step column or rerun "
              "on an idle machine")
    if all(r["quiet_useful_tokens_per_s"] for r in (ours, plain, trl)):
        print(f"quiet steps only: useful_tokens_per_s_ratio="
              f"{ours['quiet_useful_tokens_per_s'] / plain['quiet_useful_tokens_per_s']:.2f} vs_packing_ratio="
              f"{ours['quiet_useful_tokens_per_s'] / trl['quiet_useful_tokens_per_s']:.2f}")
    print(f"useful_tokens_per_s_ratio={ours['useful_tokens_per_s'] / plain['useful_tokens_per_s']:.2f} "
          f"vs_packing_ratio={ours['useful_tokens_per_s'] / trl['useful_tokens_per_s']:.2f} "
          f"padding_fraction={ours['padding_fraction']:.2f} "
          f"peak_rss_ratio={ours['peak_rss_bytes'] / plain['peak_rss_bytes']:.2f}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "demo" / "sft",
                   help="SFT data: file, folder or glob (default data/demo/sft)")
    p.add_argument("--max-records", type=int, default=200, help="use the first N records (default 200)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per trainer (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed (default 2)")
    p.add_argument("--batch", type=int, default=4, help="per-device batch size (default 4)")
    p.add_argument("--max-length", type=int, default=512, help="longest sample in tokens (default 512)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--loss-chunk-size", type=int, default=0, help="ours: loss_chunk_size (default: the stage's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in every child (default: CPUs available)")
    p.add_argument("--rounds", type=int, default=1, help="repeat ours/plain/trl this many times, rotating the order; "
                   "rows report medians (default 1)")
    p.add_argument("--wait-quiet", type=float, default=300, help="before each trainer, wait up to this many seconds "
                   "for the machine to be idle (other processes under 0.25 cores); 0 = do not wait (default 300)")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma list of trainers to run (default all)")
    p.add_argument("--output", help="also write every number (per step, per round) to this JSON file")
    p.add_argument("--only", choices=TRAINERS, help="child mode: run one trainer in this process")
    p.add_argument("--json", help=argparse.SUPPRESS)  # child mode: where to write the result
    args = p.parse_args(argv)
    args.data = args.data if args.data.is_absolute() else (Path.cwd() / args.data).resolve()
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if unknown := set(args.trainers) - set(TRAINERS):
        p.error(f"unknown trainer(s): {', '.join(sorted(unknown))}")
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must be at least 0 and below --steps")
    if args.only:
        result = child(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result))
        else:
            print(table({args.only: result}))
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
