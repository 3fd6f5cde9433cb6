"""Paired statistics on per-question correctness: exact McNemar and percentile bootstrap.

Correctness arrays are ``[..., n_questions]`` of 0/1 (or means over seeds / draws, in [0, 1]);
the bootstrap resamples questions, the same resample for every array of one comparison (paired).
"""

from __future__ import annotations

import math

import numpy as np
from jaxtyping import Float

CI_LEVEL = 0.95


def mcnemar(before: "np.ndarray", after: "np.ndarray") -> dict[str, float | int]:
    """Exact two-sided McNemar test on paired 0/1 outcomes of the same questions.

    ``b``: right before, wrong after; ``c``: wrong before, right after;
    p = min(1, 2 * P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2); p = 1 when b + c = 0."""
    x, y = np.asarray(before).astype(bool), np.asarray(after).astype(bool)
    if x.shape != y.shape:
        raise ValueError(f"paired outcomes must have the same shape, got {x.shape} and {y.shape}")
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    n = b + c
    p = 1.0 if n == 0 else min(1.0, 2.0 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2.0**n)
    return {"b": b, "c": c, "p": p}


def bootstrap_indices(n: int, draws: int, seed: int) -> "np.ndarray":
    """``[draws, n]`` resamples of question indices (with replacement), reproducible by ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def bootstrap_ci(values: Float[np.ndarray, " n"], idx: "np.ndarray", level: float = CI_LEVEL) -> list[float]:
    """Percentile interval of the mean of ``values`` over the resamples ``idx``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return [math.nan, math.nan]
    means = v[idx].mean(axis=1)
    a = (1.0 - level) / 2.0
    return [float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))]
