"""Preference-stage throughput and memory: our DPO and RM (packed, chunked; fp32 and bf16) vs TRL's DPOTrainer and
RewardTrainer, and vs our own padded layout, side by side.

Each side runs in its own child process (its peak RSS is its own), in interleaved rounds (`benchmarks/harness.py`):

  dpo_ours       medgpt's real `dpo` stage (`get_stage("dpo").run(build_config(...))`): each batch's chosen and
                 rejected sequences packed into one row, reply log-probs from the chunked LM head, reference =
                 the adapter disabled, in a no-gradient pass over the same row. fp32 weights and compute.
  dpo_ours_bf16  the same with the precision medgpt picks on a bf16 CPU: bf16 compute, the frozen base stored in
                 bf16, LoRA and optimizer state fp32.
  dpo_padded     the same stage with `packing: false`: every sequence padded to the batch's longest. fp32.
  dpo_trl        TRL 1.16's `DPOTrainer` as shipped (padded batches, its fused LM head, which on CPU scores every
                 position), on the same tokenised pairs (`prompt_ids` / `chosen_ids` / `rejected_ids`; the only
                 override skips its re-tokenisation), the same `DPOConfig` and LoRA (`peft_config`). fp32.
  dpo_trl_bf16   TRL's DPOTrainer with the same bf16 setting as dpo_ours_bf16 (bf16 base, fp32 LoRA, autocast).
  rm_ours / rm_ours_bf16 / rm_padded   medgpt's `rm` stage, packed fp32 / packed bf16 / padded (its old layout).
  rm_trl         TRL's `RewardTrainer` on the same tokenised pairs (`chosen_ids` / `rejected_ids`), same LoRA
                 (score head trained in full), fp32.

Job (the DPO measurement of issue 17): embedded `smollm2-135m`, the first 100 pairs of MedicalGPT's
`dpo_zh_500.jsonl`, batch 2 pairs, max length 512, β 0.1, LoRA r 8 alpha 16 dropout 0 on all linear layers,
lr 5e-5, 20 optimizer steps of which the first 2 are not timed; the RM the same pairs, batch and length. Useful
tokens are the real tokens of the policy's (reward model's) forward: prompt + reply of every chosen and rejected
sequence; the reference pass is not counted (every DPO side runs one over the same sequences). The CPU's bf16
matrix path (`medgpt.hardware.cpu_bf16`) is printed with the results. The last line printed is

  useful_tokens_per_s_ratio_vs_trl=R padding_fraction=P peak_rss_ratio=M [cpu_bf16=K bf16_over_fp32=B
  bf16_ratio_vs_trl=Q vs_padded=V rm_useful_tokens_per_s_ratio_vs_trl=S rm_padding_fraction=F]

with R = dpo_ours/dpo_trl useful tokens/s, P = dpo_ours' padding fraction, M = dpo_ours/dpo_trl peak RSS,
K = amx | avx512_bf16 | none, B = dpo_ours_bf16/dpo_ours, Q = dpo_ours_bf16/dpo_trl_bf16, V = dpo_ours/dpo_padded,
S = rm_ours/rm_trl (each field only when its sides ran).

    .venv/bin/python benchmarks/preference_throughput.py --rounds 2              # every side, two rounds
    .venv/bin/python benchmarks/preference_throughput.py --sides dpo_ours,dpo_trl
    .venv/bin/python benchmarks/preference_throughput.py --tiny                  # seconds: checks the script only
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
PAIRS = ROOT.parent / "shared" / "fixtures" / "medicalgpt" / "dpo_zh_500.jsonl"  # MedicalGPT's file, when present
SIDES = ("dpo_ours", "dpo_ours_bf16", "dpo_padded", "dpo_trl", "dpo_trl_bf16",
         "rm_ours", "rm_ours_bf16", "rm_padded", "rm_trl")
LABELS = {
    "dpo_ours": "medgpt dpo (packed pairs, chunked LM head), fp32",
    "dpo_ours_bf16": "medgpt dpo, bf16 compute over a bf16 frozen base, fp32 LoRA",
    "dpo_padded": "medgpt dpo with packing: false (padded), fp32",
    "dpo_trl": "trl DPOTrainer (padded, fused LM head), fp32",
    "dpo_trl_bf16": "trl DPOTrainer, bf16 compute over a bf16 frozen base, fp32 LoRA",
    "rm_ours": "medgpt rm (packed pairs), fp32",
    "rm_ours_bf16": "medgpt rm, bf16 compute over a bf16 frozen base, fp32 LoRA",
    "rm_padded": "medgpt rm with packing: false (padded, its previous layout), fp32",
    "rm_trl": "trl RewardTrainer (padded), fp32",
}


# ---------------------------------------------------------------------------------------------- child side


def job_options(args, output_dir: str, stage: str, bf16: bool, packing: bool = True) -> dict:
    """The options of the job as the stage reads them (TRL's sides take their settings from the same config)."""
    options = {
        "model_name_or_path": args.model, "train_file_dir": str(args.data), "max_train_samples": args.max_pairs,
        "output_dir": output_dir, "max_steps": args.steps, "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1, "max_length": args.max_length, "packing": packing, "use_peft": True,
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all", "learning_rate": 5e-5,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": args.seed,
        # bf16: what medgpt picks by itself on a bf16 CPU, spelled out so that any CPU runs it
        **({"torch_dtype": "auto", "bf16": True} if bf16 else {"torch_dtype": "fp32", "bf16": False}),
    }
    if stage == "dpo":
        options["beta"] = 0.1
    return options


def settings(config) -> dict:
    t = config.training
    return {"bf16": t.bf16, "torch_dtype": config.model.torch_dtype, "activation_checkpointing": t.activation_checkpointing,
            "optim": str(t.optim)}


def run_stage(args, recorder: Recorder, output_dir: str, stage: str, bf16: bool, packing: bool) -> dict:
    """medgpt's own stage, unchanged except that its trainer class records batches and step times."""
    import importlib

    from medgpt.config import build_config
    from medgpt.stages import get_stage

    module = importlib.import_module(f"medgpt.stages.{stage}")
    name = {"dpo": "PreferenceTrainer", "rm": "RewardTrainer"}[stage]
    setattr(module, name, counting(getattr(module, name), recorder, add_callback=True))
    spec = get_stage(stage)
    config = build_config(spec, job_options(args, output_dir, stage, bf16, packing))
    metrics = spec.run(config)
    prefix = "pairs_" if stage == "dpo" else "rm_"
    return {"pairs": sum(metrics.get(prefix + k, 0) for k in ("kept", "prompt_truncated", "reply_truncated")),
            "data": {k: v for k, v in metrics.items() if k.startswith(prefix)}, "settings": settings(config)}


def tokenised_pairs(config, stage: str):
    """The stage's own tokenisation of the same pairs (template, truncation, counts)."""
    from medgpt.data.loading import load_stage_data
    from medgpt.data.templates import ChatFormat
    from medgpt.models.load import load_tokenizer

    data = load_stage_data(config.data, ("preference",), config.training.seed)
    tokenizer = load_tokenizer(config.model)
    chat = ChatFormat(tokenizer, config.run.template)
    if stage == "dpo":
        from medgpt.stages.dpo import pair_features

        features, info = pair_features(chat, data.train, config.training.max_length)
    else:
        from medgpt.stages.rm import RewardArguments, reward_features

        features, info = reward_features(chat, data.train, config.extra(RewardArguments).max_length)
    return tokenizer, features, info


def run_trl_dpo(args, recorder: Recorder, output_dir: str, bf16: bool) -> dict:
    from datasets import Dataset
    from trl import DPOTrainer

    from medgpt.config import build_config
    from medgpt.models.adapters import lora_config
    from medgpt.models.load import load_model
    from medgpt.stages import get_stage

    config = build_config(get_stage("dpo"), job_options(args, output_dir, "dpo", bf16))
    tokenizer, features, info = tokenised_pairs(config, "dpo")
    model = load_model(config.model, tokenizer, context_length=args.max_length, purpose="frozen" if bf16 else "train")

    class StockDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, training, dataset_name):
            return dataset  # already tokenised as TRL's `prompt_ids` / `chosen_ids` / `rejected_ids`

    trainer = counting(StockDPOTrainer, recorder)(
        model=model, args=config.training, train_dataset=Dataset.from_list(features), processing_class=tokenizer,
        peft_config=lora_config(config.adapter, "CAUSAL_LM"), callbacks=[recorder.callback()])
    trainer.train()
    return {"pairs": len(features), "data": {"pairs_" + k: v for k, v in info.items()}, "settings": settings(config)}


def run_trl_rm(args, recorder: Recorder, output_dir: str) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from medgpt.config import build_config
    from medgpt.models.adapters import lora_config
    from medgpt.models.load import load_model
    from medgpt.stages import get_stage

    config = build_config(get_stage("rm"), job_options(args, output_dir, "rm", bf16=False))
    tokenizer, features, info = tokenised_pairs(config, "rm")
    model = load_model(config.model, tokenizer, head="sequence_classification", context_length=args.max_length)
    ours = config.training
    training = RewardConfig(
        output_dir=output_dir, max_steps=ours.max_steps, per_device_train_batch_size=ours.per_device_train_batch_size,
        gradient_accumulation_steps=1, learning_rate=ours.learning_rate, lr_scheduler_type=ours.lr_scheduler_type,
        warmup_steps=ours.warmup_steps, weight_decay=ours.weight_decay, max_grad_norm=ours.max_grad_norm,
        optim=ours.optim, seed=ours.seed, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=ours.use_cpu, max_length=args.max_length, dataset_num_proc=None,
        # RewardConfig's own defaults differ from TrainingArguments: bf16 and activation checkpointing on. Same job: off.
        bf16=False, fp16=False, gradient_checkpointing=False, activation_checkpointing=False)
    dataset = Dataset.from_list([{"chosen_ids": f["input_ids_chosen"], "rejected_ids": f["input_ids_rejected"]}
                                 for f in features])
    trainer = counting(RewardTrainer, recorder)(
        model=model, args=training, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora_config(config.adapter, "SEQ_CLS", ["score"]), callbacks=[recorder.callback()])
    trainer.train()
    return {"pairs": len(features), "data": {"rm_" + k: v for k, v in info.items()},
            "settings": {"bf16": training.bf16, "activation_checkpointing": training.activation_checkpointing,
                         "optim": str(training.optim)}}


RUNNERS = {
    "dpo_ours": lambda a, r, o: run_stage(a, r, o, "dpo", bf16=False, packing=True),
    "dpo_ours_bf16": lambda a, r, o: run_stage(a, r, o, "dpo", bf16=True, packing=True),
    "dpo_padded": lambda a, r, o: run_stage(a, r, o, "dpo", bf16=False, packing=False),
    "dpo_trl": lambda a, r, o: run_trl_dpo(a, r, o, bf16=False),
    "dpo_trl_bf16": lambda a, r, o: run_trl_dpo(a, r, o, bf16=True),
    "rm_ours": lambda a, r, o: run_stage(a, r, o, "rm", bf16=False, packing=True),
    "rm_ours_bf16": lambda a, r, o: run_stage(a, r, o, "rm", bf16=True, packing=True),
    "rm_padded": lambda a, r, o: run_stage(a, r, o, "rm", bf16=False, packing=False),
    "rm_trl": run_trl_rm,
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
    with tempfile.TemporaryDirectory(prefix=f"preference-bench-{args.only}-") as output_dir:
        extra = RUNNERS[args.only](args, recorder, output_dir)
    return child_result(args.only, recorder, args.warmup, extra)


# ---------------------------------------------------------------------------------------------- parent side


def summary_line(results: dict[str, dict], cpu_bf16: str) -> str:
    fields = []
    if "dpo_ours" in results and "dpo_trl" in results:
        ours, trl = results["dpo_ours"], results["dpo_trl"]
        fields += [f"useful_tokens_per_s_ratio_vs_trl={ratio(results, 'dpo_ours', 'dpo_trl'):.2f}",
                   f"padding_fraction={ours['padding_fraction']:.3f}",
                   f"peak_rss_ratio={ours['peak_rss_bytes'] / trl['peak_rss_bytes']:.2f}"]
    named = [("bf16_over_fp32", "dpo_ours_bf16", "dpo_ours"), ("bf16_ratio_vs_trl", "dpo_ours_bf16", "dpo_trl_bf16"),
             ("vs_padded", "dpo_ours", "dpo_padded"), ("rm_useful_tokens_per_s_ratio_vs_trl", "rm_ours", "rm_trl"),
             ("rm_bf16_over_fp32", "rm_ours_bf16", "rm_ours"), ("rm_vs_padded", "rm_ours", "rm_padded")]
    if any(a in results and b in results for _, a, b in named[:2]):
        fields.append(f"cpu_bf16={cpu_bf16}")
    fields += [f"{key}={ratio(results, a, b):.2f}" for key, a, b in named if ratio(results, a, b) is not None]
    if "rm_ours" in results:
        fields.append(f"rm_padding_fraction={results['rm_ours']['padding_fraction']:.3f}")
    return " ".join(fields)


def parent(args) -> int:
    threads = args.threads or len(os.sched_getaffinity(0))
    order = [s for s in SIDES if s in args.sides]
    common = ["--data", str(args.data), "--max-pairs", str(args.max_pairs), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--batch", str(args.batch), "--max-length", str(args.max_length),
              "--seed", str(args.seed), "--threads", str(threads), "--model", args.model]
    where = machine()
    print(f"Preference throughput: model {args.model}, data={args.data} first {args.max_pairs} pairs, {args.steps} "
          f"steps ({args.warmup} warm-up), batch {args.batch} pairs, max_length {args.max_length}, {threads} torch "
          f"threads, {args.rounds} round(s), order per round rotates: {order}; CPU {where['cpu']}, bf16 matrix path: "
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
        print(f"{name}: {LABELS[name]}; {r['pairs']} pairs; data {r.get('data')}; {r.get('settings')}")
    print(table(results, order))
    warn_if_loaded(results, threads)
    line = summary_line(results, where["cpu_bf16"])
    if line:
        print(line, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model (default smollm2-135m, the embedded default)")
    p.add_argument("--data", type=Path, default=PAIRS if PAIRS.is_file() else ROOT / "data" / "demo" / "preference",
                   help="preference pairs: file, folder or glob (default MedicalGPT's dpo_zh_500.jsonl next to the "
                        "checkout, else data/demo/preference)")
    p.add_argument("--max-pairs", type=int, default=100, help="use the first N pairs (default 100)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per side (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed (default 2)")
    p.add_argument("--batch", type=int, default=2, help="pairs per batch (default 2)")
    p.add_argument("--max-length", type=int, default=512, help="longest prompt + reply in tokens (default 512)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch threads in every child (default: CPUs available)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every side this many times, rotating the order; "
                   "rows report medians (default 1)")
    p.add_argument("--wait-quiet", type=float, default=300, help="before each side, wait up to this many seconds "
                   "for the machine to be idle (other processes under 0.25 cores); 0 = do not wait (default 300)")
    p.add_argument("--sides", default=",".join(SIDES), help="comma list of sides to run (default all)")
    p.add_argument("--output", help="also write every number (per step, per round) to this JSON file")
    p.add_argument("--tiny", action="store_true", help="smoke mode: a tiny random model, 3 steps (1 warm-up), 8 "
                   "pairs of data/demo/preference, max length 128, 1 thread, no waiting; measures nothing")
    p.add_argument("--only", choices=SIDES, help="child mode: run one side in this process")
    p.add_argument("--json", help=argparse.SUPPRESS)  # child mode: where to write the result
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup, args.max_pairs, args.max_length, args.threads, args.wait_quiet = 3, 1, 8, 128, 1, 0
        if "--data" not in (argv if argv is not None else sys.argv):
            args.data = ROOT / "data" / "demo" / "preference"
    args.data = args.data if args.data.is_absolute() else (Path.cwd() / args.data).resolve()
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if unknown := set(args.sides) - set(SIDES):
        p.error(f"unknown side(s): {', '.join(sorted(unknown))}")
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must be at least 0 and below --steps")
    with tempfile.TemporaryDirectory(prefix="preference-bench-model-") as tmp:
        if args.tiny and not args.only:
            args.model = str(make_tiny_model(Path(tmp)))
        return child_or_parent(args, child, parent)


if __name__ == "__main__":
    sys.exit(main())
