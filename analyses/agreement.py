"""Agreement between per-unit importance scores (units = every head and every MLP layer).

Scores are compared by magnitude (``|effect|``: a component that strongly hurts the tail is as
"important" as one that supports it; densities are non-negative anyway). Statistics: Spearman
and Kendall (tau-b) rank correlation, and top-k overlap (Jaccard of the k largest units). Ties
in top-k are broken by unit order. Confidence intervals: percentile bootstrap over prompts
(every per-prompt method is re-averaged on the same resample; densities do not depend on
prompts). A top-k overlap with k >= the number of units is trivially 1 and reported as None.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from jaxtyping import Float
from scipy import stats

from kcs_lens.stats import percentile_interval

KS = (5, 10)


def flatten_units(heads: np.ndarray, mlp: np.ndarray) -> np.ndarray:
    """[..., L, H] and [..., L] -> [..., L*H + L]: heads row-major, then MLP layers."""
    return np.concatenate([heads.reshape(*heads.shape[:-2], -1), mlp], axis=-1)


def unit_names(n_layers: int, n_heads: int) -> list[str]:
    return [f"L{l}H{h}" for l in range(n_layers) for h in range(n_heads)] + [f"L{l}MLP" for l in range(n_layers)]


def _ranks(x: Float[np.ndarray, "n unit"]) -> np.ndarray:
    return stats.rankdata(x, axis=-1)  # average ranks for ties


def spearman(a: Float[np.ndarray, "... unit"], b: Float[np.ndarray, "... unit"]) -> np.ndarray | float:
    """Spearman rho along the last axis (Pearson of average ranks); NaN if either is constant."""
    ra, rb = _ranks(np.atleast_2d(a)), _ranks(np.atleast_2d(b))
    ra, rb = ra - ra.mean(-1, keepdims=True), rb - rb.mean(-1, keepdims=True)
    den = np.sqrt((ra**2).sum(-1) * (rb**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, (ra * rb).sum(-1) / np.where(den > 0, den, 1), np.nan)
    return out if np.ndim(a) > 1 else out[0]


def kendall(a: Float[np.ndarray, "... unit"], b: Float[np.ndarray, "... unit"]) -> np.ndarray | float:
    """Kendall tau-b along the last axis: sum sign(da) sign(db) / sqrt(untied pairs of a * of b)."""
    A, B = np.atleast_2d(a), np.atleast_2d(b)
    out = np.empty(A.shape[0])
    step = max(1, 4_000_000 // max(A.shape[1] ** 2, 1))  # bound the [rows, unit, unit] temporaries
    for i in range(0, A.shape[0], step):
        x, y = A[i : i + step], B[i : i + step]
        sa = np.sign(x[:, :, None] - x[:, None, :])
        sb = np.sign(y[:, :, None] - y[:, None, :])
        den = np.sqrt(np.abs(sa).sum((1, 2)) * np.abs(sb).sum((1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i : i + step] = np.where(den > 0, (sa * sb).sum((1, 2)) / np.where(den > 0, den, 1), np.nan)
    return out if np.ndim(a) > 1 else out[0]


def topk_mask(a: Float[np.ndarray, "... unit"], k: int) -> np.ndarray:
    A = np.atleast_2d(a)
    idx = np.argsort(-A, axis=-1, kind="stable")[:, :k]
    m = np.zeros(A.shape, bool)
    np.put_along_axis(m, idx, True, axis=-1)
    return m


def jaccard_topk(a: Float[np.ndarray, "... unit"], b: Float[np.ndarray, "... unit"], k: int) -> np.ndarray | float | None:
    """|top-k(a) & top-k(b)| / |top-k(a) | top-k(b)|; None when k >= the number of units."""
    if k >= np.shape(a)[-1]:
        return None
    ma, mb = topk_mask(a, k), topk_mask(b, k)
    out = (ma & mb).sum(-1) / (ma | mb).sum(-1)
    return out if np.ndim(a) > 1 else float(out[0])


def rank_agreement(a: np.ndarray, b: np.ndarray, ks: Sequence[int] = KS) -> dict[str, Any]:
    """Spearman, Kendall and top-k Jaccard of |a| and |b| over the last axis (units); leading
    axes (e.g. bootstrap draws) are kept."""
    a, b = np.abs(np.asarray(a, float)), np.abs(np.asarray(b, float))
    out: dict[str, Any] = {"spearman": spearman(a, b), "kendall": kendall(a, b)}
    for k in ks:
        out[f"jaccard@{k}"] = jaccard_topk(a, b, k)
    if a.ndim == 1:
        out = {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in out.items()}
    return out


def _mean(x: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Per-unit mean over prompts (NaN prompts skipped); a prompt-independent vector is returned as is."""
    if x.ndim == 1:
        return x
    x = x if idx is None else x[idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN units stay NaN
        return np.nanmean(x, axis=0)


def compare_scores(
    a: Float[np.ndarray, "... unit"],
    b: Float[np.ndarray, "... unit"],
    units: np.ndarray,
    boot: np.ndarray,
    ks: Sequence[int] = KS,
) -> dict[str, Any]:
    """Agreement of two methods over the selected units, with bootstrap CIs over prompts.

    ``a``/``b``: [prompt, unit] per-prompt values, or [unit] when prompt-independent (density).
    ``units``: boolean selection of units. ``boot``: [n_boot, n_prompt] resampled prompt indices.
    """
    point = rank_agreement(_mean(a)[units], _mean(b)[units], ks)
    A = _boot_means(a, boot)[:, units]
    B = _boot_means(b, boot)[:, units]
    ok = np.isfinite(A).all(1) & np.isfinite(B).all(1)
    draws = rank_agreement(A[ok], B[ok], ks) if ok.any() else {k: None for k in point}
    out: dict[str, Any] = {"n_units": int(units.sum())}
    for k, v in point.items():
        d = draws[k]
        d = np.asarray([] if d is None else d, float)
        d = d[np.isfinite(d)]
        ci = percentile_interval(d) if v is not None and len(d) else None
        out[k] = {"value": v, "ci95": ci}
    return out


def _boot_means(x: np.ndarray, boot: np.ndarray) -> Float[np.ndarray, "n_boot unit"]:
    if x.ndim == 1:
        return np.broadcast_to(x, (len(boot), x.shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x[boot], axis=1)  # [n_boot, n_prompt, unit] -> [n_boot, unit]


def unit_summary(values: Float[np.ndarray, "prompt unit"], boot: np.ndarray) -> dict[str, np.ndarray]:
    """Per-unit mean, standard error and 95% bootstrap CI over prompts."""
    n = np.sum(np.isfinite(values), axis=0)
    mean = _mean(values)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        se = np.nanstd(values, axis=0, ddof=1) / np.sqrt(np.maximum(n, 1))
        means = _boot_means(values, boot)
        lo, hi = np.nanpercentile(means, 2.5, axis=0), np.nanpercentile(means, 97.5, axis=0)
    return {"mean": mean, "se": se, "ci95_low": lo, "ci95_high": hi, "n": n}


def decision_agreement(
    decisions: np.ndarray, scores: Float[np.ndarray, "... unit"], boot: np.ndarray | None = None
) -> dict[str, Any]:
    """How well |scores| of another method single out the units a head-granularity subnetwork
    holds (``decisions``, boolean per unit): AUROC (probability that a unit in the subnetwork
    scores above one outside it, ties 1/2) and precision@k (share of the k top-scoring units
    that are in the subnetwork, k = number of units in it). ``scores``: [prompt, unit] (bootstrap
    CI over prompts with ``boot``) or [unit]. None where the subnetwork holds no unit or all."""
    d = np.asarray(decisions, bool)
    k = int(d.sum())
    out: dict[str, Any] = {"n_units": int(d.size), "n_in_subnetwork": k}
    if k == 0 or k == d.size:
        return {**out, "auroc": {"value": None, "ci95": None}, "precision@k": {"value": None, "ci95": None}}

    def stats_of(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # x: [n, unit]
        x = np.abs(np.nan_to_num(x, nan=0.0))
        r = stats.rankdata(x, axis=-1)  # average ranks: ties count 1/2
        auc = (r[:, d].sum(-1) - k * (k + 1) / 2) / (k * (d.size - k))
        prec = (topk_mask(x, k) & d).sum(-1) / k
        return auc, prec

    point = stats_of(np.atleast_2d(_mean(scores)))
    draws = stats_of(_boot_means(scores, boot)) if boot is not None and np.ndim(scores) > 1 else None
    for i, name in enumerate(("auroc", "precision@k")):
        ci = percentile_interval(draws[i]) if draws is not None else None
        out[name] = {"value": float(point[i][0]), "ci95": ci}
    return out
