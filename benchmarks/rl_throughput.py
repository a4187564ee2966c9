"""RL throughput and memory: PPO (critic, GAE) vs GRPO (group baseline, no critic) in our one RL loop, steps per
minute, peak RSS, and the weights the four roles of RLHF hold against one base model.

One invocation runs both through medgpt's real stages (`get_stage("ppo"|"grpo").run(build_config(...))`), each
in its own child process (peak RSS = that child's `ru_maxrss`), one after the other, on the same model, the same
prompt file, template, sampling, rewards and LoRA. Both score with a reward model that is a LoRA adapter of the
policy's base (mounted on it: `medgpt.rl.reward_adapter`; a random one made here unless `--reward-model` names a
`medgpt rm` output) plus `answer_f1` + 0.2 x `length_penalty`. A step:

  ppo   N prompts, one reply each (one `generate` call of N rows) -> rewards -> actor, reference and critic
        forward passes -> `ppo_epochs` passes of minibatch updates (policy and value losses; one optimizer
        step per minibatch of M rollouts); the critic starts from the reward model
  grpo  N / G prompts x G replies (one `generate` call of N rows) -> rewards -> one pass of minibatch updates
        (policy loss only; kl_coef 0: no reference pass), one optimizer step per minibatch

so both generate N replies of at most L new tokens per step and train on minibatches of M sequences. Sampled
replies differ in length, so the ratio is taken at equal generated tokens: ppo_over_grpo_step_time = (PPO s/step
/ PPO generated tokens per step) / (GRPO s/step / GRPO generated tokens per step). Timing comes from the
trainer's own step boundaries (a `PPOTrainer` subclass marks the end of `train_step`), so model loading, data
preparation and the final save are not timed; the first `--warmup` steps are not timed either. Time inside HF
`generate` is measured per step as well, and other processes' CPU use during the timed steps (from /proc/stat).
roles_memory_over_base is the PPO run's `roles_memory_over_base` (train_results.json): the bytes of every weight
actor, critic, reference and reward model hold together (each storage once) over one base model's. The last
line printed is

  ppo_steps_per_min=X grpo_steps_per_min=Y ppo_peak_rss_gb=Z ppo_over_grpo_step_time=R roles_memory_over_base=M

See benchmarks/README.md for measured numbers.

    .venv/bin/python benchmarks/rl_throughput.py                  # embedded smollm2-135m, ~10 min
    .venv/bin/python benchmarks/rl_throughput.py --tiny           # seconds: a tiny random model, checks the script
    .venv/bin/python benchmarks/rl_throughput.py --only grpo      # one side, in this process
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

from harness import QUIET_CORES, Recorder, child_or_parent, machine_busy_seconds, make_tiny_model, versions, wait_until_quiet

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("ppo", "grpo")
LABELS = {"ppo": "medgpt ppo (critic from the reward model, GAE; actor, critic, reference, reward on one base)",
          "grpo": "medgpt grpo (the same loop, group baseline, no critic, no reference pass)"}


# ---------------------------------------------------------------------------------------------- child side


def job_options(side: str, args, output_dir: str) -> dict:
    """The stage options of one side: what the two share, then what each algorithm does differently."""
    shared = {
        "model_name_or_path": args.model, "torch_dtype": "fp32", "bf16": False,
        "train_file_dir": str(args.data), "output_dir": output_dir, "seed": args.seed,
        "max_steps": args.steps, "learning_rate": 1e-5, "lr_scheduler_type": "constant",
        "logging_steps": 1, "save_strategy": "no",
        "use_peft": True, "target_modules": "all", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": args.max_new_tokens,
        "max_prompt_length": 256, "reward_model_name_or_path": str(args.reward_model),
        "reward_funcs": ["reward_model", "answer_f1", "length_penalty"], "reward_weights": [1.0, 1.0, 0.2],
        "per_device_train_batch_size": args.minibatch, "missing_eos_penalty": 1.0,
    }
    if side == "ppo":  # the rest as configs/ppo.yaml
        return {**shared, "rollout_batch_size": args.completions, "ppo_epochs": args.ppo_epochs, "kl_coef": 0.05,
                "target_kl": 6.0, "reward_normalization": "running", "reward_clip": 5.0}
    # the rest as configs/grpo.yaml: the stage's defaults (grpo estimator, kl_coef 0, one pass)
    return {**shared, "num_samples_per_prompt": args.num_generations,
            "rollout_batch_size": args.completions // args.num_generations, "kl_coef": args.grpo_kl}


class StepClock(Recorder):
    """The SFT benchmark's clocks (wall time, own CPU time and the machine's busy CPU time at each step's end),
    plus the `generate` calls in between (rows, new positions, seconds) and each step's mean completion length
    as the stage logs it."""

    def __init__(self, side: str, total_steps: int):
        super().__init__(side, total_steps)
        self.generate_calls: list[dict] = []  # since the last step end
        self.steps: list[dict] = []

    def begin(self) -> None:
        self.start_busy, self.start_cpu, self.start = machine_busy_seconds(), time.process_time(), time.perf_counter()

    def end_step(self, step: int) -> None:
        now = time.perf_counter()
        self.cpu_ends.append(time.process_time())
        self.busy_ends.append(machine_busy_seconds())
        previous = self.step_ends[-1] if self.step_ends else self.start
        self.step_ends.append(now)
        calls, self.generate_calls = self.generate_calls, []
        record = {"seconds": now - previous, "generate_seconds": sum(c["seconds"] for c in calls),
                  "generated_rows": sum(c["rows"] for c in calls), "generate_calls": len(calls),
                  "new_positions": max((c["new_positions"] for c in calls), default=0),
                  "other_cores": self.foreign_cores(len(self.step_ends) - 1), "mean_completion_length": None}
        self.steps.append(record)
        print(f"[{self.name}] step {step}/{self.total_steps}: {record['seconds']:6.2f} s "
              f"(generate {record['generate_seconds']:.2f} s, {record['generated_rows']} rows x "
              f"{record['new_positions']} positions), other processes {record['other_cores']:.2f} cores",
              file=sys.stderr, flush=True)

    def completion_length(self, step: int, length: float) -> None:
        if 0 < step <= len(self.steps):
            self.steps[step - 1]["mean_completion_length"] = float(length)

    def time_generate(self) -> None:
        """Wrap HF `generate` (both stages call it on the PEFT policy, which calls the base model's) to time it."""
        from transformers.generation.utils import GenerationMixin

        generate, clock = GenerationMixin.generate, self

        def timed(model, *a, **kw):
            prompt = kw.get("input_ids", a[0] if a else None)
            t0 = time.perf_counter()
            out = generate(model, *a, **kw)
            sequences = out if hasattr(out, "shape") else out.sequences
            clock.generate_calls.append({"seconds": time.perf_counter() - t0, "rows": int(sequences.shape[0]),
                                         "new_positions": int(sequences.shape[1] - prompt.shape[1])})
            return out

        GenerationMixin.generate = timed


def run_stage(side: str, args, clock: StepClock, output_dir: str) -> dict:
    import medgpt.rl.recipe as recipe
    from medgpt.config import build_config
    from medgpt.stages import get_stage

    class TimedTrainer(recipe.PPOTrainer):
        def train(self, resume=None):
            clock.begin()
            return super().train(resume)

        def train_step(self):
            stats, samples = super().train_step()
            clock.end_step(self.step)
            clock.completion_length(self.step, stats["response_length"])
            return stats, samples

    recipe.PPOTrainer = TimedTrainer  # in this child process only: the recipe builds this subclass
    stage = get_stage(side)
    return stage.run(build_config(stage, job_options(side, args, output_dir)))


def summarise(side: str, clock: StepClock, warmup: int) -> dict:
    steps = clock.steps
    if len(steps) <= warmup:
        raise RuntimeError(f"{side}: only {len(steps)} steps ran, nothing left to time after {warmup} warm-up steps")
    timed = steps[warmup:]
    seconds = clock.step_ends[-1] - (clock.step_ends[warmup - 1] if warmup else clock.start)
    per_step = seconds / len(timed)
    lengths = [s["mean_completion_length"] for s in timed if s["mean_completion_length"] is not None]
    completions = statistics.fmean(s["generated_rows"] for s in timed)
    length = statistics.fmean(lengths) if lengths else float("nan")
    other = [s["other_cores"] for s in timed]
    return {
        "side": side, "steps": len(steps), "timed_steps": len(timed), "seconds": seconds,
        "seconds_per_step": per_step, "steps_per_min": 60 / per_step,
        "generate_seconds_per_step": statistics.fmean(s["generate_seconds"] for s in timed),
        "completions_per_step": completions, "mean_completion_length": length,
        "completion_tokens_per_s": completions * length / per_step,
        "other_cores": statistics.fmean(other), "quiet_steps": sum(o < QUIET_CORES for o in other),
        "per_step": steps,
    }


def child(args) -> dict:
    import torch
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    clock = StepClock(args.only, args.steps)
    clock.time_generate()
    with tempfile.TemporaryDirectory(prefix=f"rl-bench-{args.only}-") as output_dir:
        metrics = run_stage(args.only, args, clock, output_dir)
    result = summarise(args.only, clock, args.warmup)
    result["global_step"] = metrics.get("global_step")
    result["roles_memory_over_base"] = metrics.get("roles_memory_over_base")
    result["reward_model_shares_base"] = metrics.get("reward_model_shares_base")
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    result["torch_threads"] = torch.get_num_threads()
    return result


# ---------------------------------------------------------------------------------------------- parent side


def make_reward_adapter(base: str, directory: Path, seed: int) -> Path:
    """A LoRA reward model of `base` as `medgpt rm` saves one (adapter + score head), with random weights: it
    costs what a trained one costs, which is all a throughput run needs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medgpt.arguments import ModelArguments
    from medgpt.models.load import load_model, load_tokenizer

    torch.manual_seed(seed)
    args = ModelArguments(model_name_or_path=base, torch_dtype="fp32")
    tokenizer = load_tokenizer(args)
    model = load_model(args, tokenizer, head="sequence_classification")
    config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["score"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # a trained adapter is not the identity
    peft_model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "-"


def combine(runs: list[dict]) -> dict:
    """Several rounds of one side -> one row: median seconds per step, largest peak RSS."""
    out = dict(runs[-1])
    for key in ("seconds_per_step", "generate_seconds_per_step", "completion_tokens_per_s", "other_cores",
                "mean_completion_length"):
        out[key] = statistics.median(r[key] for r in runs)
    out["steps_per_min"] = 60 / out["seconds_per_step"]
    out["timed_steps"] = sum(r["timed_steps"] for r in runs)
    out["quiet_steps"] = sum(r["quiet_steps"] for r in runs)
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    out["rounds"] = [{k: r[k] for k in ("seconds_per_step", "peak_rss_bytes", "other_cores", "load_average")}
                     for r in runs]
    return out


def table(results: dict[str, dict]) -> str:
    head = ("side", "timed steps", "s/step", "steps/min", "generate s/step", "completions/step", "mean length",
            "completion tok/s", "peak RSS GB", "other load", "quiet steps")
    rows = [head]
    for side, r in results.items():
        rows.append((side, str(r["timed_steps"]), f"{r['seconds_per_step']:.2f}", f"{r['steps_per_min']:.2f}",
                     f"{r['generate_seconds_per_step']:.2f}", f"{r['completions_per_step']:g}",
                     f"{r['mean_completion_length']:.1f}", f"{r['completion_tokens_per_s']:.1f}",
                     f"{r['peak_rss_bytes'] / 1e9:.2f}", f"{r['other_cores']:.2f}",
                     f"{r['quiet_steps']}/{r['timed_steps']}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_side(side: str, args, common: list[str], path: Path) -> dict:
    if args.wait_quiet > 0:
        waited, load = wait_until_quiet(args.wait_quiet)
        print(f"    waited {waited:.0f} s for a quiet machine: other processes use {load:.2f} cores now", flush=True)
    before = load_average()
    command = [sys.executable, str(Path(__file__).resolve()), "--only", side, "--json", str(path), *common]
    subprocess.run(command, cwd=ROOT, check=True)
    result = json.loads(path.read_text())
    result["load_average"] = f"{before} -> {load_average()}"
    print(f"    {side}: {result['seconds_per_step']:.2f} s/step, peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB, "
          f"other processes {result['other_cores']:.2f} cores, load average {result['load_average']}", flush=True)
    return result


def parent(args) -> int:
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="rl-bench-") as tmp:
        common = ["--model", args.model, "--data", str(args.data), "--steps", str(args.steps),
                  "--warmup", str(args.warmup), "--completions", str(args.completions),
                  "--num-generations", str(args.num_generations), "--minibatch", str(args.minibatch),
                  "--max-new-tokens", str(args.max_new_tokens), "--ppo-epochs", str(args.ppo_epochs),
                  "--grpo-kl", str(args.grpo_kl), "--seed", str(args.seed), "--threads", str(args.threads),
                  "--reward-model", str(args.reward_model)]
        print(f"RL throughput: model {'tiny random Llama (smoke mode: measures nothing)' if args.tiny else args.model}, "
              f"data {args.data}, {args.completions} completions of <= {args.max_new_tokens} new tokens per step "
              f"(PPO {args.completions} prompts x 1, {args.ppo_epochs} PPO epochs; GRPO "
              f"{args.completions // args.num_generations} prompts x {args.num_generations}), minibatch "
              f"{args.minibatch}, {args.steps} steps ({args.warmup} warm-up), fp32, {args.threads} torch threads, "
              f"{args.rounds} round(s)", flush=True)
        for round_index in range(args.rounds):
            order = SIDES if round_index % 2 == 0 else SIDES[::-1]
            for side in order:
                print(f"--- round {round_index + 1}/{args.rounds}: {side} ({LABELS[side]})", flush=True)
                runs[side].append(run_side(side, args, common, Path(tmp) / f"{side}-{round_index}.json"))
    results = {side: combine(r) for side, r in runs.items()}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": args.threads, "versions": versions(), "wall_seconds": time.time() - started,
            "options": {k: str(v) for k, v in vars(args).items()}}
    if args.output:
        Path(args.output).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print()
    print(f"{meta['date']}  {meta['machine']}  {meta['cpus']} CPUs, {args.threads} torch threads  "
          + " ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    for side in SIDES:
        print(f"{side}: {LABELS[side]}; load average per round: {[r['load_average'] for r in results[side]['rounds']]}")
    print(table(results))
    loaded = [side for side, r in results.items() if r["other_cores"] >= QUIET_CORES]
    if loaded:
        print("WARNING: other processes kept cores busy during the timed steps ("
              + ", ".join(f"{side} {results[side]['other_cores']:.2f}" for side in loaded)
              + f" cores on average, {args.threads} torch threads): the numbers are indicative only")
    ppo, grpo = results["ppo"], results["grpo"]
    per_token = [r["seconds_per_step"] / (r["completions_per_step"] * r["mean_completion_length"]) for r in (ppo, grpo)]
    print(f"raw step-time ratio {ppo['seconds_per_step'] / grpo['seconds_per_step']:.2f}; generated tokens per step "
          f"ppo {ppo['completions_per_step'] * ppo['mean_completion_length']:.0f}, "
          f"grpo {grpo['completions_per_step'] * grpo['mean_completion_length']:.0f}; reward model mounted on the "
          f"policy's base: {ppo['reward_model_shares_base']}")
    print(f"ppo_steps_per_min={ppo['steps_per_min']:.2f} grpo_steps_per_min={grpo['steps_per_min']:.2f} "
          f"ppo_peak_rss_gb={ppo['peak_rss_bytes'] / 1e9:.2f} ppo_over_grpo_step_time={per_token[0] / per_token[1]:.2f} "
          f"roles_memory_over_base={ppo['roles_memory_over_base']:.3f}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="policy to start from (default: the embedded smollm2-135m)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "demo" / "grpo" / "qa.jsonl",
                   help="prompt file, the same for both (default data/demo/grpo/qa.jsonl)")
    p.add_argument("--steps", type=int, default=8, help="steps per side (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed (default 2)")
    p.add_argument("--completions", type=int, default=8, help="completions generated per step, N (default 8)")
    p.add_argument("--num-generations", type=int, default=4, help="GRPO completions per prompt, G (default 4)")
    p.add_argument("--minibatch", type=int, default=4, help="sequences per forward/backward, M (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest completion, L (default 64)")
    p.add_argument("--ppo-epochs", type=int, default=2, help="PPO passes over each rollout batch (default 2)")
    p.add_argument("--grpo-kl", type=float, default=0.0,
                   help="GRPO kl_coef (default 0, as configs/grpo.yaml; > 0 adds a reference forward)")
    p.add_argument("--reward-model", type=Path, help="a `medgpt rm` LoRA output on --model (default: a random "
                   "LoRA reward adapter made here, saved with the run's temporary files)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=0, help="torch threads in every child (default: CPUs available; on a shared machine use 1: 2 threads with one busy neighbour ran a PPO step ~8x slower, see benchmarks/README.md)")
    p.add_argument("--rounds", type=int, default=1, help="repeat ppo/grpo, alternating the order; medians (default 1)")
    p.add_argument("--wait-quiet", type=float, default=300, help="before each side, wait up to this many seconds for "
                   "the machine to be idle (other processes under 0.25 cores); 0 = do not wait (default 300)")
    p.add_argument("--output", help="also write every number (per step, per round) to this JSON file")
    p.add_argument("--tiny", action="store_true", help="smoke mode: a tiny random model, 3 steps (1 warm-up), "
                   "4 completions of 8 tokens, 1 thread, no waiting; checks the script, measures nothing")
    p.add_argument("--only", choices=SIDES, help="child mode: run one side in this process")
    p.add_argument("--json", help=argparse.SUPPRESS)  # child mode: where to write the result
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup, args.completions, args.num_generations = 3, 1, 4, 2
        args.minibatch, args.max_new_tokens, args.threads, args.wait_quiet = 2, 8, 1, 0
    args.data = args.data if args.data.is_absolute() else (Path.cwd() / args.data).resolve()
    args.threads = args.threads or len(os.sched_getaffinity(0))
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must be at least 0 and below --steps")
    if args.completions % args.num_generations or args.completions % args.minibatch:
        p.error("--completions must be a multiple of --num-generations and of --minibatch")
    with tempfile.TemporaryDirectory(prefix="rl-bench-model-") as tmp:
        if args.tiny and not args.only:
            args.model = str(make_tiny_model(Path(tmp) / "model"))
        if args.reward_model is None:
            args.reward_model = make_reward_adapter(args.model, Path(tmp) / "reward", args.seed)
        return child_or_parent(args, child, parent, lambda result: table({args.only: result}))


if __name__ == "__main__":
    sys.exit(main())
