"""Paired comparisons of two evaluations of the same items (two `evaluate_model` output directories): MCQ
accuracy (paired bootstrap of the difference, McNemar's exact test), held-out perplexity (paired bootstrap over
documents of the token-weighted NLL), and the mean reward of the open answers (paired bootstrap). A change is
`real` when its 95% interval excludes zero; only items present in both directories are compared."""

from __future__ import annotations

import json
import math
from pathlib import Path

from medgpt.evaluation.intervals import mcnemar, paired_difference, paired_ratio_of_sums


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _matched(a: list[dict], b: list[dict], key) -> list[tuple[dict, dict]]:
    others = {key(row): row for row in b}
    return [(row, others[key(row)]) for row in a if key(row) in others]


def compare_mcq(dir_a: Path, dir_b: Path, seed: int = 0) -> dict | None:
    """A's accuracy minus B's on the questions both answered."""
    pairs = _matched(_rows(Path(dir_a) / "mcq.jsonl"), _rows(Path(dir_b) / "mcq.jsonl"),
                     lambda r: (r.get("source"), r.get("question")))
    if not pairs:
        return None
    a_right, b_right = [bool(x["correct"]) for x, _ in pairs], [bool(y["correct"]) for _, y in pairs]
    result = paired_difference([float(x) for x in a_right], [float(y) for y in b_right], seed)
    return {**result, **mcnemar(a_right, b_right)}


def compare_perplexity(dir_a: Path, dir_b: Path, seed: int = 0) -> dict | None:
    """A's perplexity relative to B's (ratio - 1, so -0.05 is 5% lower) on the documents both scored."""
    pairs = _matched(_rows(Path(dir_a) / "perplexity.jsonl"), _rows(Path(dir_b) / "perplexity.jsonl"),
                     lambda r: r.get("source"))
    if not pairs:
        return None
    result = paired_ratio_of_sums([(x["nll"], x["tokens"]) for x, _ in pairs], [(y["nll"], y["tokens"]) for _, y in pairs],
                                  seed)
    low, high = result["difference_ci"]
    return {"change": math.exp(result["difference"]) - 1, "change_ci": [math.exp(low) - 1, math.exp(high) - 1],
            "n": result["n"], "real": result["real"]}


def compare_rewards(dir_a: Path, dir_b: Path, seed: int = 0) -> dict | None:
    """A's mean reward minus B's on the open questions both answered (scored by the same reward model)."""
    pairs = _matched([r for r in _rows(Path(dir_a) / "answers.jsonl") if "reward" in r],
                     [r for r in _rows(Path(dir_b) / "answers.jsonl") if "reward" in r], lambda r: r.get("question"))
    if not pairs:
        return None
    return paired_difference([x["reward"] for x, _ in pairs], [y["reward"] for _, y in pairs], seed)
