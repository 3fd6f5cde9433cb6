"""The result of the downstream experiment for one run: accuracies per group (removed / kept /
unlinked questions) of the original, remaining and randomly pruned models with bootstrap
intervals, their differences with McNemar tests per seed (:func:`summarize`), and the headline."""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import Float

from kcs_lens.discovery.rundir import RunInfo
from kcs_lens.downstream.groups import GROUPS
from kcs_lens.downstream.stats import mcnemar
from kcs_lens.downstream.tasks import Question
from kcs_lens.stats import bootstrap_ci, bootstrap_indices


def summarize(
    info: RunInfo,
    questions: list[Question],
    groups: list[str],
    original: list[dict[str, Any]],
    remaining: list[dict[str, Any]],
    random: list[list[dict[str, Any]]],
    n_boot: int,
    boot_seed: int,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The result of one run::

        {"run": ..., "groups": {"removed": N, "kept": N, "unlinked": N},
         "models": {"original": M, "remaining": M, "random": M},
         "differences": {"remaining": D, "random": D}, "headline": {...}, "settings": ..., ...}

    ``M[group]`` = {"accuracy": mean over seeds (and draws), "ci": 95% bootstrap interval over
    questions, "per_seed": [{"seed", "accuracy", "ci"(, "per_draw")}]}; ``D[group]`` = {"difference":
    mean over seeds of (model - original), "ci", "per_seed": [{"seed", "difference", "mcnemar":
    {"b", "c", "p"}}]}. A group with no questions is left out."""
    orig: Float[np.ndarray, "seed q"] = np.stack([r["correct"] for r in original]).astype(np.float64)
    rem = np.stack([r["correct"] for r in remaining]).astype(np.float64)
    rnd: Float[np.ndarray, "draw seed q"] = np.array([[r["correct"] for r in draw] for draw in random], dtype=np.float64)
    g = np.array(groups)
    seeds = [r["seed"] for r in original]
    models: dict[str, dict[str, Any]] = {"original": {}, "remaining": {}, "random": {}}
    diffs: dict[str, dict[str, Any]] = {"remaining": {}, "random": {}}
    for gi, group in enumerate(GROUPS):
        sel = g == group
        if not sel.any():
            continue
        idx = bootstrap_indices(int(sel.sum()), n_boot, boot_seed + gi)
        o, r, x = orig[:, sel], rem[:, sel], rnd[:, :, sel]

        models["original"][group] = _block(o, idx, seeds)
        models["remaining"][group] = _block(r, idx, seeds)
        models["random"][group] = _block(x.mean(0), idx, seeds, per_draw=x)
        diffs["remaining"][group] = {
            "difference": float(r.mean() - o.mean()),
            "ci": bootstrap_ci(r.mean(0) - o.mean(0), idx),
            "per_seed": [
                {"seed": seed, "difference": float(r[k].mean() - o[k].mean()), "mcnemar": mcnemar(o[k], r[k])}
                for k, seed in enumerate(seeds)
            ],
        }
        diffs["random"][group] = {
            "difference": float(x.mean() - o.mean()),
            "ci": bootstrap_ci(x.mean((0, 1)) - o.mean(0), idx),
            "per_seed": [
                {
                    "seed": seed,
                    "difference": float(x[:, k].mean() - o[k].mean()),
                    "mcnemar_per_draw": [mcnemar(o[k], x[d, k]) for d in range(x.shape[0])],
                }
                for k, seed in enumerate(seeds)
            ],
        }
    same = all(
        len({m["order_sha"] for m in [original[k], remaining[k], *[d[k] for d in random]]}) == 1 for k in range(len(seeds))
    )
    if not same:  # a bug: every model must see the same batches
        raise RuntimeError("the compared models were not finetuned on the same batches")
    train = lambda rs: [{k: v for k, v in r.items() if k != "correct"} for r in rs]
    return {
        **info.header(),
        "groups": {k: groups.count(k) for k in GROUPS},
        "models": models,
        "differences": diffs,
        "headline": headline(diffs),
        **meta,
        "same_batches": same,
        "training": {"original": train(original), "remaining": train(remaining), "random": [train(d) for d in random]},
        "questions": [{"id": q.id, "group": grp} for q, grp in zip(questions, groups)],
        "correct": {
            "original": _per_seed(original),
            "remaining": _per_seed(remaining),
            "random": [_per_seed(d) for d in random],
        },
    }


def _per_seed(results: list[dict[str, Any]]) -> dict[str, list]:
    """Each seed's per-question correctness."""
    return {str(r["seed"]): r["correct"].tolist() for r in results}


def before_finetuning_block(
    groups: list[str], original: np.ndarray, remaining: np.ndarray, random: list[np.ndarray]
) -> dict[str, dict[str, float]]:
    """``lm`` style: accuracy per model and group of the models as they are, before finetuning
    (random: the mean over draws); one deterministic pass, so no seeds."""
    g = np.array(groups)
    rnd = np.stack(random).astype(np.float64)
    out: dict[str, dict[str, float]] = {"original": {}, "remaining": {}, "random": {}}
    for group in GROUPS:
        sel = g == group
        if sel.any():
            out["original"][group] = float(original[sel].mean())
            out["remaining"][group] = float(remaining[sel].mean())
            out["random"][group] = float(rnd[:, sel].mean())
    return out


def _block(a: np.ndarray, idx: np.ndarray, seeds: list[int], per_draw: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy (mean over seeds), its interval and the per-seed values of correctness ``a[seed, q]``
    (for random draws: ``a`` = the mean over draws, ``per_draw[draw, seed, q]``)."""
    per = []
    for k, seed in enumerate(seeds):
        e: dict[str, Any] = {"seed": seed, "accuracy": float(a[k].mean()), "ci": bootstrap_ci(a[k], idx)}
        if per_draw is not None:
            e["per_draw"] = [float(v) for v in per_draw[:, k].mean(1)]
        per.append(e)
    flat = a.mean(0)
    return {"accuracy": float(flat.mean()), "ci": bootstrap_ci(flat, idx), "per_seed": per}


def headline(diffs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether the paper's prediction held, by three stated criteria on the 95% intervals."""
    rem, rnd = diffs["remaining"], diffs["random"]
    d_removed = rem["removed"]["difference"]
    c1 = rem["removed"]["ci"][1] < 0
    c2 = None if "kept" not in rem else rem["kept"]["difference"] > d_removed / 2
    c3 = all(rnd[g]["ci"][1] >= 0 for g in ("removed", "kept") if g in rnd)
    criteria = {
        "remaining drops on removed (interval of the difference below 0)": c1,
        "remaining drops on kept by less than half its drop on removed": c2,
        "random removal drops neither removed nor kept (intervals reach 0)": c3,
    }
    held = c1 and c3 and c2 is not False
    f = lambda d: f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
    parts = [f"remaining - original: removed {f(rem['removed'])}"]
    if "kept" in rem:
        parts.append(f"kept {f(rem['kept'])}")
    parts.append(f"random - original: removed {f(rnd['removed'])}" + (f", kept {f(rnd['kept'])}" if "kept" in rnd else ""))
    failed = [k for k, v in criteria.items() if v is False]
    text = ("HELD: " if held else "NOT HELD: ") + "; ".join(parts) + ("" if held else " (failed: " + "; ".join(failed) + ")")
    return {"held": held, "criteria": criteria, "statement": text}


# ------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------
