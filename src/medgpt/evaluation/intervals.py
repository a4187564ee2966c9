"""95% intervals for what evaluation reports, and paired tests for comparing two models on the same items.

- A proportion (an accuracy: k right of n) gets the Wilson score interval: unlike "p ± 1.96·SE" it stays inside
  [0, 1] and does not collapse to a point at 0 or n right, which matters for the small sets evaluated here.
- A mean of per-item scores that are not 0/1 (a win rate where a tie counts 0.5, partial credit) gets a
  percentile bootstrap over items.
- Two models on the same items are compared paired: the difference of their per-item scores, bootstrapped over
  items (a change is real when the interval excludes 0), and for right/wrong items McNemar's exact test on the
  items where exactly one of them was right.

Numbers are seeded (`seed`), so the same files give the same intervals.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
BOOTSTRAP_SAMPLES = 2000


def wilson(successes: int, n: int, z: float = Z95) -> list[float]:
    """[low, high] of the Wilson score interval for successes / n; [0, 1] when n is 0."""
    if n <= 0:
        return [0.0, 1.0]
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half) if successes else 0.0, min(1.0, centre + half) if successes < n else 1.0]


def _resamples(n: int, seed: int, samples: int) -> np.ndarray:
    """(samples, n) item indices drawn with replacement, the same for every statistic of one seed."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def _percentiles(draws: np.ndarray) -> list[float]:
    low, high = np.percentile(draws, [2.5, 97.5])
    return [float(low), float(high)]


def bootstrap_mean(scores: list[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> list[float]:
    """[low, high] of the percentile bootstrap of the mean of per-item scores."""
    if not scores:
        return [0.0, 1.0]
    values = np.asarray(scores, dtype=float)
    return _percentiles(values[_resamples(len(values), seed, samples)].mean(axis=1))


def paired_difference(a: list[float], b: list[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """Mean of a - b over the same items and its paired-bootstrap interval; `real` when the interval excludes 0."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired comparison needs the same items on both sides (got {len(a)} and {len(b)})")
    differences = [x - y for x, y in zip(a, b)]
    low, high = bootstrap_mean(differences, seed, samples)
    return {"difference": sum(differences) / len(differences), "difference_ci": [low, high],
            "n": len(differences), "real": low > 0 or high < 0}


def paired_ratio_of_sums(a: list[tuple[float, float]], b: list[tuple[float, float]], seed: int = 0,
                         samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """For token-weighted means (perplexity: per document (NLL sum, tokens)): the difference of
    sum(nll) / sum(tokens) between A and B with a paired bootstrap over documents."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired comparison needs the same documents on both sides (got {len(a)} and {len(b)})")

    (a_sum, a_weight), (b_sum, b_weight) = (np.asarray(a, dtype=float).T, np.asarray(b, dtype=float).T)
    picks = _resamples(len(a), seed, samples)
    draws = a_sum[picks].sum(1) / a_weight[picks].sum(1) - b_sum[picks].sum(1) / b_weight[picks].sum(1)
    low, high = _percentiles(draws)
    return {"difference": float(a_sum.sum() / a_weight.sum() - b_sum.sum() / b_weight.sum()),
            "difference_ci": [low, high], "n": len(a), "real": low > 0 or high < 0}


def mcnemar(a_right: list[bool], b_right: list[bool]) -> dict:
    """McNemar's exact test: of the items exactly one model got right, is the split further from even than
    chance? Returns both counts and the two-sided p-value (binomial, p = 0.5)."""
    only_a = sum(x and not y for x, y in zip(a_right, b_right))
    only_b = sum(y and not x for x, y in zip(a_right, b_right))
    discordant = only_a + only_b
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1)) / 2 ** discordant if discordant else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": min(1.0, 2 * tail)}
