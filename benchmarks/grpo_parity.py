"""GRPO parity: `medgpt grpo` (our RL loop, grpo estimator) against TRL 1.16's `GRPOTrainer` on the same prompts,
reward, model, LoRA and sampling; reward curves over several seeds, and whether the final rewards agree within
the seed-to-seed noise.

Why: `medgpt grpo` / `rloo` used to be TRL's trainers; they now run our loop (one path per algorithm: the loop that
also runs PPO, mounts a LoRA reward model on the policy's base and shards with FSDP2). This checks that the switch
did not change what GRPO learns. Both sides: a tiny random Llama (init 0.5, so LoRA moves it fast) with the
embedded tokenizer, our chat template (TRL gets its prompt ids from `ChatFormatPrompts`), LoRA r 8 / alpha 16 on
every linear layer, no dropout, lr 5e-2 constant, 1 prompt x 8 replies of 4 tokens per optimizer step,
temperature 1, no KL (beta / kl_coef 0), clip 0.2, one pass per batch, TRL's loss_type dapo (token-level mean, as
ours), group-std scaling (as ours). Reward: the share of reply tokens whose input embedding has a positive first
coordinate (half the vocabulary: every group has variance). Not a timing benchmark: seeded CPU runs are
deterministic whatever the load.

    .venv/bin/python benchmarks/grpo_parity.py            # 5 seeds x 12 steps a side (a few minutes)
    .venv/bin/python benchmarks/grpo_parity.py --tiny     # 1 seed x 2 steps: checks the script

Last line: `trl_final=… medgpt_final=… difference=… noise=… within_noise=true|false`, with final = mean reward
of the last `--last` steps averaged over seeds, noise = 2 x the standard error of the difference.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
from pathlib import Path

from harness import make_tiny_model

QUESTIONS = ["What is a fever?", "Where is the liver?"]


def write_inputs(work: Path, model: Path) -> tuple[Path, Path]:
    """The prompt file and the reward (a file with TRL's signature, which both sides import)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        embeddings = AutoModelForCausalLM.from_pretrained(model).get_input_embeddings().weight
    wanted = (embeddings[:, 0] > 0).nonzero().flatten().tolist()
    (work / "wanted.json").write_text(json.dumps(wanted))
    rule = work / "rule.py"
    rule.write_text(f"import json\nWANTED = set(json.load(open({str(work / 'wanted.json')!r})))\n\n"
                    "def reward(completions, completion_ids, **kwargs):\n"
                    "    return [sum(t in WANTED for t in ids) / max(len(ids), 1) for ids in completion_ids]\n")
    data = work / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in QUESTIONS))
    return data, rule


def run_medgpt(model: Path, data: Path, rule: Path, seed: int, args, out: Path) -> list[float]:
    from medgpt.config import build_config
    from medgpt.report import read_metrics
    from medgpt.stages import get_stage

    stage = get_stage("grpo")
    stage.run(build_config(stage, {
        "model_name_or_path": str(model), "train_file_dir": str(data), "output_dir": str(out),
        "reward_funcs": f"{rule}:reward", "max_steps": args.steps, "rollout_batch_size": 1,
        "num_samples_per_prompt": 8, "per_device_train_batch_size": 8, "max_new_tokens": 4, "kl_coef": 0.0,
        "learning_rate": 5e-2, "lr_scheduler_type": "constant", "lora_rank": 8, "lora_alpha": 16,
        "target_modules": "all", "lora_dropout": 0.0, "logging_steps": 1, "save_strategy": "no", "seed": seed}))
    return [row["reward"] for row in read_metrics(out / "metrics.jsonl")]


def run_trl(model_dir: Path, data: Path, rule: Path, seed: int, args, out: Path) -> list[float]:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from medgpt.arguments import AdapterArguments
    from medgpt.data.readers import read_records
    from medgpt.data.templates import ChatFormat
    from medgpt.models.adapters import lora_config
    from medgpt.rl.rewards import load_user_function
    from medgpt.rl.trl_prompts import ChatFormatPrompts, prompt_dataset, stop_at_end_of_turn

    class Trainer(ChatFormatPrompts, GRPOTrainer):
        pass

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = ChatFormat(tokenizer)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                            lora_config(AdapterArguments(lora_rank=8, lora_alpha=16, target_modules="all",
                                                         lora_dropout=0.0)))
    stop_at_end_of_turn(policy, chat)
    config = GRPOConfig(output_dir=str(out), per_device_train_batch_size=8, num_generations=8,
                        max_completion_length=4, beta=0.0, loss_type="dapo", learning_rate=5e-2,
                        lr_scheduler_type="constant", max_steps=args.steps, logging_steps=1, report_to=[],
                        temperature=1.0, top_k=0, top_p=1.0, seed=seed, use_cpu=True, save_strategy="no",
                        disable_tqdm=True, activation_checkpointing=False, gradient_checkpointing=False)
    records = read_records(str(data), ("qa",)).records
    trainer = Trainer(model=policy, reward_funcs=[load_user_function(f"{rule}:reward")], args=config,
                      train_dataset=prompt_dataset(records), processing_class=tokenizer, chat_format=chat)
    trainer.train()
    return [row["reward"] for row in trainer.state.log_history if "reward" in row]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--last", type=int, default=3, help="final steps averaged (default 3)")
    p.add_argument("--output", help="also write every curve to this JSON file")
    p.add_argument("--tiny", action="store_true", help="1 seed, 2 steps: checks the script")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.seeds, args.last = 2, 1, 1
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.WARNING)
    curves: dict[str, list[list[float]]] = {"trl": [], "medgpt": []}
    with tempfile.TemporaryDirectory(prefix="grpo-parity-") as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "model", initializer_range=0.5)
        data, rule = write_inputs(work, model)
        for seed in range(args.seeds):
            curves["trl"].append(run_trl(model, data, rule, seed, args, work / f"trl-{seed}"))
            curves["medgpt"].append(run_medgpt(model, data, rule, seed, args, work / f"medgpt-{seed}"))
            for side in curves:
                print(f"seed {seed} {side}: " + " ".join(f"{r:.3f}" for r in curves[side][-1]), flush=True)
    finals = {side: [statistics.fmean(c[-args.last:]) for c in runs] for side, runs in curves.items()}
    for step in range(args.steps):
        means = {side: statistics.fmean(c[step] for c in runs) for side, runs in curves.items()}
        print(f"step {step + 1:2d}: trl {means['trl']:.3f}  medgpt {means['medgpt']:.3f}")
    mean = {side: statistics.fmean(v) for side, v in finals.items()}
    spread = {side: statistics.stdev(v) if len(v) > 1 else float("nan") for side, v in finals.items()}
    noise = 2 * math.sqrt(sum(spread[s] ** 2 / len(finals[s]) for s in finals))
    difference = mean["medgpt"] - mean["trl"]
    if args.output:
        Path(args.output).write_text(json.dumps({"options": vars(args), "curves": curves, "finals": finals}, indent=2))
    within = abs(difference) <= noise if noise == noise else "n/a"  # one seed: no spread to compare with
    print(f"trl_final={mean['trl']:.3f} medgpt_final={mean['medgpt']:.3f} difference={difference:+.3f} "
          f"noise={noise:.3f} within_noise={str(within).lower()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
