"""Summaries of repeated measurements, one owner each: :func:`spread` (mean, std, min, max of
every numeric leaf of nested dicts over draws) and the percentile bootstrap
(:func:`bootstrap_indices`, :func:`percentile_interval`, :func:`bootstrap_ci`) used by the
downstream experiment (over questions) and compare-circuits (over prompts)."""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
from jaxtyping import Float

CI_LEVEL = 0.95


def bootstrap_indices(n: int, draws: int, seed: int) -> "np.ndarray":
    """``[draws, n]`` resamples of item indices (with replacement), reproducible by ``seed``."""
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def percentile_interval(draws: Any, level: float = CI_LEVEL) -> list[float]:
    """The central ``level`` percentile interval of bootstrap draws."""
    a = (1.0 - level) / 2.0
    d = np.asarray(draws, dtype=np.float64)
    return [float(np.quantile(d, a)), float(np.quantile(d, 1.0 - a))]


def bootstrap_ci(values: Float[np.ndarray, " n"], idx: "np.ndarray", level: float = CI_LEVEL) -> list[float]:
    """Percentile interval of the mean of ``values`` over the resamples ``idx``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return [math.nan, math.nan]
    return percentile_interval(v[idx].mean(axis=1), level)


def flatten(d: dict[str, Any], prefix: str = "", *, finite: bool = False, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Numeric leaves of nested dicts as ``a/b`` keys (booleans left out; ``finite``: NaN and inf too;
    ``skip``: top-level keys left out)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if k in skip and not prefix:
            continue
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/", finite=finite))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and (not finite or math.isfinite(v)):
            out[f"{prefix}{k}"] = float(v)
    return out


def flat_numbers(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record (a metrics.jsonl line, a summary) as ``a/b`` keys, the step left out."""
    return flatten(record, finite=True, skip=("step",))


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        *path, last = k.split("/")
        d = out
        for p in path:
            d = d.setdefault(p, {})
        d[last] = v
    return out


def spread(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """mean, std (sample; 0 for one draw), min and max of every numeric leaf over the samples."""
    flats = [flatten(s) for s in samples]
    keys = flats[0].keys()
    col = {k: [f[k] for f in flats] for k in keys}
    std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {
        name: unflatten({k: fn(v) for k, v in col.items()})
        for name, fn in (("mean", statistics.fmean), ("std", std), ("min", min), ("max", max))
    }
