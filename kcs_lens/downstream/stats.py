"""Paired statistics on per-question correctness: the exact McNemar test. Correctness arrays are
``[..., n_questions]`` of 0/1; the bootstrap over questions (the same resample for every array of
one comparison, paired) is :mod:`kcs_lens.stats`."""

from __future__ import annotations

import math

import numpy as np


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
