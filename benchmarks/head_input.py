"""What a contiguous LM-head input (`medgpt.models.load.contiguous_head_input`) saves: a frozen model's forward
with `logits_to_keep=1` (generation's prefill, the MCQ prompt pass), with the hook and without it, side by side
in interleaved rounds in one process. Model: the embedded SmolLM2-135M as `medgpt eval` loads it (bf16 on CPUs
with bf16 matrix units, else fp32), every weight frozen.

  .venv/bin/python benchmarks/head_input.py                  # embedded model, rows 1/4/8 x 128 tokens (~1 min)
  .venv/bin/python benchmarks/head_input.py --tiny           # seconds: a tiny random model (checks the script)

The last line is `speedup_rows_R=X … cpu_bf16=…`: seconds per forward without the hook over with it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def seconds_per_forward(model, ids, repeats: int) -> float:
    import torch

    with torch.inference_mode():
        model(input_ids=ids, logits_to_keep=1)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, logits_to_keep=1)
    return (time.perf_counter() - started) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--length", type=int, default=128, help="prompt tokens per row")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="forwards per side per round")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model, one short round")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from medgpt.arguments import ModelArguments
    from medgpt.models.load import load_model, load_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        model_path = args.model
        if args.tiny:
            from harness import make_tiny_model

            model_path = str(make_tiny_model(Path(scratch) / "tiny"))
            args.rounds, args.repeats, args.length = 1, 1, 16
        model_args = ModelArguments(model_name_or_path=model_path)
        model = load_model(model_args, load_tokenizer(model_args), purpose="inference").eval().requires_grad_(False)
        return measure(model, args)


def measure(model, args) -> int:
    """Both sides on the same inputs, rounds alternating which goes first; prints and writes the medians."""
    import torch

    from harness import machine
    from medgpt.models.load import _contiguous_input

    head = model.get_output_embeddings()
    hooked = dict(head._forward_pre_hooks)
    assert any(hook is _contiguous_input for hook in hooked.values()), "load_model did not add the hook"
    generator = torch.Generator().manual_seed(0)
    times: dict[str, dict[int, list[float]]] = {"with": {}, "without": {}}
    for round_index in range(args.rounds):
        for rows in args.rows:
            ids = torch.randint(0, head.weight.shape[0], (rows, args.length), generator=generator)
            sides = ("with", "without") if round_index % 2 == 0 else ("without", "with")
            for side in sides:
                head._forward_pre_hooks.clear()
                if side == "with":
                    head._forward_pre_hooks.update(hooked)
                times[side].setdefault(rows, []).append(seconds_per_forward(model, ids, args.repeats))
    head._forward_pre_hooks.clear()
    head._forward_pre_hooks.update(hooked)

    median = {side: {rows: statistics.median(v) for rows, v in per.items()} for side, per in times.items()}
    speedup = {rows: median["without"][rows] / median["with"][rows] for rows in args.rows}
    result = {"model": "tiny" if args.tiny else args.model, "dtype": str(head.weight.dtype), "length": args.length,
              "rounds": args.rounds, "repeats": args.repeats, "seconds_per_forward": median, "speedup": speedup,
              **machine()}
    for rows in args.rows:
        print(f"rows {rows}: {median['without'][rows] * 1e3:8.1f} ms without the hook, "
              f"{median['with'][rows] * 1e3:8.1f} ms with it ({speedup[rows]:.2f}x)")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(" ".join(f"speedup_rows_{rows}={speedup[rows]:.2f}" for rows in args.rows), f"dtype={head.weight.dtype}",
          f"cpu_bf16={result['cpu_bf16']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
