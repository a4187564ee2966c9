"""Which MCQ scoring rule should be the default? Accuracy of every rule on the same questions and model (default:
the embedded SmolLM2-135M on the 117 demo MCQs, chat prompts, zero-shot), with Wilson intervals and a paired
comparison of each rule against `mean` (today's default). Accuracy, not time: it can run on a loaded machine.

  .venv/bin/python benchmarks/mcq_scoring.py                 # embedded model, 117 demo questions (~5 min on 2 cores)
  .venv/bin/python benchmarks/mcq_scoring.py --tiny          # seconds: a tiny random model, 8 questions
  .venv/bin/python benchmarks/mcq_scoring.py --model DIR --file FILE --prompt plain

The last line is `best=RULE accuracy=A` (ties broken in the order of the table).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
RULES = ("mean", "sum", "char", "byte", "letter", "generate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--file", default=str(ROOT / "data" / "demo" / "eval" / "mcq.jsonl"))
    parser.add_argument("--prompt", default="chat", choices=["chat", "plain"])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and 8 questions: checks the script")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from medgpt.evaluation import EvalSpec, evaluate_model
    from medgpt.evaluation.compare import compare_mcq
    from medgpt.hardware import cpu_bf16

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.tiny:
            from harness import make_tiny_model

            model = str(make_tiny_model(scratch / "tiny"))
        else:
            model = args.model
        for rule in RULES:
            spec = EvalSpec(mcq_file=args.file, mcq_scoring=rule, mcq_prompt=args.prompt, torch_dtype="fp32",
                            limit=8 if args.tiny else None)
            metrics = evaluate_model(model, spec, scratch / rule)
            paired = compare_mcq(scratch / rule, scratch / "mean") if rule != "mean" else None
            results.append({"scoring": rule, "accuracy": metrics["mcq_accuracy"], "ci": metrics["mcq_accuracy_ci"],
                            "n": metrics["mcq_n"], "chance": metrics["mcq_chance"],
                            "unanswered": metrics.get("mcq_unanswered"),
                            "vs_mean": None if paired is None else {k: paired[k] for k in
                                                                     ("difference", "difference_ci", "real", "p_value")}})
            r = results[-1]
            versus = "" if paired is None else (f" vs mean {paired['difference']:+.3f} [{paired['difference_ci'][0]:+.3f}, "
                                                f"{paired['difference_ci'][1]:+.3f}] McNemar p={paired['p_value']:.2g}")
            print(f"{rule:9s} accuracy={r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] n={r['n']}"
                  + (f" unanswered={r['unanswered']}" if r["unanswered"] is not None else "") + versus, flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"model": "tiny" if args.tiny else args.model, "file": args.file,
                                                 "prompt": args.prompt, "cpu_bf16": cpu_bf16(), "results": results},
                                                indent=2))
    best = max(results, key=lambda r: r["accuracy"])
    print(f"best={best['scoring']} accuracy={best['accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
