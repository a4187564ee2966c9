"""PPO's GAE defaults (gamma, lam), measured: how fast PPO learns a reward that only the FIRST reply token decides,
when the score is paid at the LAST token of long replies and the critic starts knowing nothing.

That is RLHF's situation: the reward model scores the whole reply at its end, and what decides the score is often
chosen early. GAE hands token t the discounted sum of later TD errors; with V = 0 everywhere at the start, the
first of L tokens sees (gamma * lam)^(L - 1) of the score (lam 0.95, L 48: 9%). This script runs the real `ppo`
stage on a tiny random Llama made peaked (its final norm x2, so one token is the runner-up first token with
p ~ 0.1), rewards 1 when that token opens the reply, and compares settings over several seeds: the mean reward of
the last steps and the first step whose reward reaches 0.8. Not a timing benchmark: the numbers do not depend on
the machine's load (seeded runs on CPU are deterministic).

    .venv/bin/python benchmarks/ppo_gae_defaults.py              # 3 settings x 3 seeds x 12 steps, replies of 48
    .venv/bin/python benchmarks/ppo_gae_defaults.py --tiny       # 1 setting, 1 seed, 2 steps: checks the script

The last line printed is `best=<setting> ` followed by `<setting>=<mean reward of the last steps>` per setting.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

from harness import make_tiny_model

SETTINGS = {"lam0.95": {"gamma": 1.0, "lam": 0.95}, "lam1.0": {"gamma": 1.0, "lam": 1.0},
            "gamma0.95": {"gamma": 0.95, "lam": 1.0}}
QUESTION = "What is a fever?"


def sharp_model(directory: Path) -> tuple[Path, int]:
    """The tiny Llama made peaked (final norm x2), and its runner-up first token for the question."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from medgpt.data.records import Message
    from medgpt.data.templates import ChatFormat

    make_tiny_model(directory, initializer_range=0.5, norm_scale=2.0)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompt = ChatFormat(tokenizer).prompt_ids([Message("user", QUESTION)])
    with torch.no_grad():
        first = LlamaForCausalLM.from_pretrained(directory)(torch.tensor([prompt])).logits[0, -1].softmax(-1)
    return directory, int(first.topk(2).indices[1])


def run(setting: dict, seed: int, args, model: Path, target: int, work: Path) -> list[float]:
    from medgpt.config import build_config
    from medgpt.report import read_metrics
    from medgpt.stages import get_stage

    data = work / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": QUESTION, "answer": "x"}) + "\n" for _ in range(16)))
    rule = work / "rule.py"
    rule.write_text(f"def reward(completion_ids, **columns):\n    return [float(bool(ids) and ids[0] == {target}) "
                    "for ids in completion_ids]\n")
    out = work / f"out-{seed}-{setting['gamma']}-{setting['lam']}"
    stage = get_stage("ppo")
    stage.run(build_config(stage, {
        "model_name_or_path": str(model), "train_file_dir": str(data), "output_dir": str(out),
        "reward_funcs": f"{rule}:reward", "max_steps": args.steps, "rollout_batch_size": 16,
        "per_device_train_batch_size": 8, "ppo_epochs": 2, "max_new_tokens": args.length, "learning_rate": 5e-4,
        "kl_coef": 0.02, "lora_dropout": 0.0, "save_strategy": "no", "seed": seed, "critic_init": "zero",
        "critic_learning_rate": 5e-4, **setting}))
    return [row["reward"] for row in read_metrics(out / "metrics.jsonl")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--length", type=int, default=48, help="max_new_tokens: the replies' length (default 48)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--last", type=int, default=4, help="steps averaged at the end (default 4)")
    p.add_argument("--output", help="also write every reward curve to this JSON file")
    p.add_argument("--tiny", action="store_true", help="1 setting, 1 seed, 2 steps of 8 tokens: checks the script")
    args = p.parse_args(argv)
    settings = dict(SETTINGS)
    if args.tiny:
        args.steps, args.length, args.seeds, args.last = 2, 8, 1, 1
        settings = {"lam1.0": SETTINGS["lam1.0"]}
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    curves: dict[str, list[list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="gae-defaults-") as tmp:
        model, target = sharp_model(Path(tmp) / "model")
        for name, setting in settings.items():
            curves[name] = [run(setting, seed, args, model, target, Path(tmp)) for seed in range(args.seeds)]
            print(f"{name}: " + " | ".join(" ".join(f"{r:.2f}" for r in c) for c in curves[name]), flush=True)
    summary = {}
    for name, runs in curves.items():
        ends = [statistics.fmean(c[-args.last:]) for c in runs]
        reached = [next((i + 1 for i, r in enumerate(c) if r >= 0.8), None) for c in runs]
        summary[name] = {"last_mean": statistics.fmean(ends), "per_seed": ends, "first_step_at_0.8": reached}
        print(f"{name} ({settings[name]}): mean reward of the last {args.last} steps {statistics.fmean(ends):.3f} "
              f"(per seed {', '.join(f'{e:.2f}' for e in ends)}), first step >= 0.8: {reached}")
    if args.output:
        Path(args.output).write_text(json.dumps({"options": vars(args), "curves": curves, "summary": summary}, indent=2))
    best = max(summary, key=lambda n: summary[n]["last_mean"])
    print(f"best={best} " + " ".join(f"{n}={s['last_mean']:.3f}" for n, s in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
