"""SFT LoRA throughput and memory: our `sft` stage (fp32 and bf16) vs a plain `transformers.Trainer` vs TRL's
`SFTTrainer`.

One invocation runs the same job on each side, each in its own child process (so peak RSS is the side's own)
one after another (`benchmarks/harness.py`):

  ours   medgpt's real `sft` stage (`get_stage("sft").run(build_config(...))`): padding-free batches, chunked
         loss on assistant tokens only. The only change is that the stage's trainer class is swapped for a
         subclass that records each batch's token counts and adds a timing callback. fp32 weights and compute.
  ours_bf16  the same stage with the precision medgpt picks on a bf16 CPU: `bf16: true` compute, the frozen
         base stored in bf16 (`torch_dtype: auto`), adapters and optimizer state fp32. Same batches as ours.
  plain  `transformers.Trainer` + peft the way MedicalGPT / LLaMA-Factory train: the same tokenised samples (same
         assistant-only labels), padded to the longest sample of each batch (our `PaddedCollator`), the model's
         own forward with labels (full logits, HF causal-LM loss).
  trl    TRL `SFTTrainer` with `packing=True` (BFD packing, which TRL runs padding-free) and the same LoRA given
         as `peft_config`. It gets the same tokenised samples as a pre-tokenised `input_ids` + `labels` dataset
         (TRL skips its own tokenisation then and keeps our assistant-only labels; see benchmarks/README.md).

Job: embedded model `smollm2-135m`, LoRA r=8 alpha=16 dropout=0 on all linear layers, max length 512, batch 4,
fp32 (except ours_bf16), lr 1e-4, 12 optimizer steps of which the first 2 are not timed. Per side: useful
(non-padding) tokens/s, all tokens/s (padding included), padding fraction, peak RSS of the process, final loss.
The CPU's bf16 matrix path (`medgpt.hardware.cpu_bf16`) is printed with the results. The last line printed is

  useful_tokens_per_s_ratio=R vs_packing_ratio=Q padding_fraction=P peak_rss_ratio=M cpu_bf16=K bf16_over_fp32=B

with R = ours/plain useful tokens/s, Q = ours/trl useful tokens/s, P = our padding fraction, M = ours/plain
peak RSS, K = amx | avx512_bf16 | none, B = ours_bf16/ours useful tokens/s (both fields only when both ran).

    .venv/bin/python benchmarks/sft_throughput.py --data ../shared/fixtures/medicalgpt/medical_sft_1K_format.jsonl
    .venv/bin/python benchmarks/sft_throughput.py --steps 3 --warmup 1 --max-records 20   # smoke run
    .venv/bin/python benchmarks/sft_throughput.py --only ours                              # one trainer
    .venv/bin/python benchmarks/sft_throughput.py --trainers ours --loss-chunk-size 1024   # ours, another chunk
    .venv/bin/python benchmarks/sft_throughput.py --trainers ours,ours_bf16                # the bf16 gain alone
    .venv/bin/python benchmarks/sft_throughput.py --tiny     # seconds: tiny random model, checks the script only
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from harness import Recorder, child_or_parent, child_result, combine, counting, machine, make_tiny_model, ratio, \
    run_rounds, table, warn_if_loaded

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = ("ours", "ours_bf16", "plain", "trl")
LABELS = {
    "ours": "medgpt sft (padding-free, chunked loss), fp32",
    "ours_bf16": "medgpt sft, bf16 compute over a bf16 frozen base, fp32 LoRA",
    "plain": "transformers.Trainer + peft (padded)",
    "trl": "trl SFTTrainer (packing=True)",
}


# ---------------------------------------------------------------------------------------------- child side


def job_options(args, output_dir: str) -> dict:
    """The options of the job, as the `sft` stage reads them (also the source of the other trainers' settings)."""
    return {
        "model_name_or_path": args.model,
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


def run_ours(args, recorder: Recorder, output_dir: str, bf16: bool = False) -> dict:
    import medgpt.training.recipe as recipe
    from medgpt.config import build_config
    from medgpt.stages import get_stage

    stage = get_stage("sft")
    options = job_options(args, output_dir)
    if bf16:  # what medgpt chooses by itself on a bf16 CPU, spelled out so that any CPU runs it
        options.update(torch_dtype="auto", bf16=True)
    config = build_config(stage, options)
    if not hasattr(recipe, "CausalLMTrainer"):
        raise RuntimeError("medgpt.training.recipe no longer builds a CausalLMTrainer: update this benchmark")
    recipe.CausalLMTrainer = counting(recipe.CausalLMTrainer, recorder, add_callback=True)
    metrics = stage.run(config)
    return {"samples": metrics.get("sft_kept", 0) + metrics.get("sft_truncated_at_turn", 0)
            + metrics.get("sft_truncated_in_reply", 0),
            "data": {k: v for k, v in metrics.items() if k.startswith("sft_")},
            "settings": {"bf16": config.training.bf16, "activation_checkpointing": config.training.activation_checkpointing,
                         "optim": str(config.training.optim), "torch_dtype": config.model.torch_dtype}}


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
    runner = {"ours": run_ours, "ours_bf16": lambda *a: run_ours(*a, bf16=True), "plain": run_plain,
              "trl": run_trl}[args.only]
    with tempfile.TemporaryDirectory(prefix=f"sft-bench-{args.only}-") as output_dir:
        extra = runner(args, recorder, output_dir)
    return child_result(args.only, recorder, args.warmup, extra)


# ---------------------------------------------------------------------------------------------- parent side


def parent(args) -> int:
    threads = args.threads or len(os.sched_getaffinity(0))
    order = [t for t in TRAINERS if t in args.trainers]
    common = ["--data", str(args.data), "--max-records", str(args.max_records), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--batch", str(args.batch), "--max-length", str(args.max_length),
              "--seed", str(args.seed), "--threads", str(threads), "--loss-chunk-size", str(args.loss_chunk_size),
              "--model", args.model]
    where = machine()
    print(f"SFT throughput: model {args.model}, data={args.data} first {args.max_records} records, {args.steps} steps "
          f"({args.warmup} warm-up), batch {args.batch}, max_length {args.max_length}, {threads} torch threads, "
          f"{args.rounds} round(s), order per round rotates: {order}; CPU {where['cpu']}, bf16 matrix path: "
          f"{where['cpu_bf16']}", flush=True)
    started = time.time()
    runs = run_rounds(Path(__file__).resolve(), order, LABELS, common, args.rounds, args.wait_quiet, ROOT)
    results = {name: combine(r) for name, r in runs.items()}
    meta = {**where, "torch_threads": threads, "load_average_after": os.getloadavg(),
            "wall_seconds": time.time() - started, "options": {k: str(v) for k, v in vars(args).items()}}
    if args.output:
        Path(args.output).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print()
    print(f"{meta['date']}  {meta['machine']}  {meta['cpu']} (bf16: {meta['cpu_bf16']}), {meta['cpus']} CPUs, "
          f"{threads} torch threads  " + " ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    for name in order:
        r = results[name]
        extra = f", {r['packed_rows']} packed rows, padding_free={r['padding_free']}" if "packed_rows" in r else ""
        print(f"{name}: {LABELS[name]}; {r['samples']} samples{extra}; data {r.get('data')}; {r.get('settings')}")
    print(table(results, order))
    warn_if_loaded(results, threads)
    fields = []
    if all(name in results for name in ("ours", "plain", "trl")):
        ours, plain = results["ours"], results["plain"]
        quiet = ratio(results, "ours", "plain", "quiet_useful_tokens_per_s"), \
            ratio(results, "ours", "trl", "quiet_useful_tokens_per_s")
        if all(quiet):
            print(f"quiet steps only: useful_tokens_per_s_ratio={quiet[0]:.2f} vs_packing_ratio={quiet[1]:.2f}")
        fields += [f"useful_tokens_per_s_ratio={ratio(results, 'ours', 'plain'):.2f}",
                   f"vs_packing_ratio={ratio(results, 'ours', 'trl'):.2f}",
                   f"padding_fraction={ours['padding_fraction']:.2f}",
                   f"peak_rss_ratio={ours['peak_rss_bytes'] / plain['peak_rss_bytes']:.2f}"]
    if "ours" in results and "ours_bf16" in results:
        fields += [f"cpu_bf16={where['cpu_bf16']}", f"bf16_over_fp32={ratio(results, 'ours_bf16', 'ours'):.2f}"]
    if fields:
        print(" ".join(fields), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model (default smollm2-135m, the embedded default)")
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
    p.add_argument("--rounds", type=int, default=1, help="repeat every side this many times, rotating the order; "
                   "rows report medians (default 1)")
    p.add_argument("--wait-quiet", type=float, default=300, help="before each side, wait up to this many seconds "
                   "for the machine to be idle (other processes under 0.25 cores); 0 = do not wait (default 300)")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma list of sides to run (default all)")
    p.add_argument("--output", help="also write every number (per step, per round) to this JSON file")
    p.add_argument("--tiny", action="store_true", help="smoke mode: a tiny random model, 3 steps (1 warm-up), 8 "
                   "records, max length 128, 1 thread, no waiting; checks the script, measures nothing")
    p.add_argument("--only", choices=TRAINERS, help="child mode: run one side in this process")
    p.add_argument("--json", help=argparse.SUPPRESS)  # child mode: where to write the result
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup, args.max_records, args.max_length, args.threads, args.wait_quiet = 3, 1, 8, 128, 1, 0
    args.data = args.data if args.data.is_absolute() else (Path.cwd() / args.data).resolve()
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if unknown := set(args.trainers) - set(TRAINERS):
        p.error(f"unknown trainer(s): {', '.join(sorted(unknown))}")
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must be at least 0 and below --steps")
    with tempfile.TemporaryDirectory(prefix="sft-bench-model-") as tmp:
        if args.tiny and not args.only:
            args.model = str(make_tiny_model(Path(tmp)))
        return child_or_parent(args, child, parent)


if __name__ == "__main__":
    sys.exit(main())
