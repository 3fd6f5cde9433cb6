"""Seeds: the overlap of several runs' subnetworks, and their combinations (union,
intersection, at least k of n), each written as a run directory that every command accepts."""

from __future__ import annotations

import os
import shutil
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from kcs_lens.discovery.run_model import ModelOverrides
from kcs_lens.discovery.rundir import RunInfo, load_run
from kcs_lens.errors import RunError, SubnetworkError
from kcs_lens.evaluation.evaluate import Evaluator
from kcs_lens.files import atomic_write_json, make_temp_dir
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.canonical import parse_weight_name
from kcs_lens.model.lens import LensModel

Log = Callable[[str], None]


def check_compatible(runs: Sequence[RunInfo]) -> None:
    """Runs to combine must share model weights, masked layers/matrices and granularity."""
    if len(runs) < 2:
        raise RunError("overlap needs at least two runs")
    seen: dict[Path, Path] = {}
    for r in runs:
        key = Path(r.dir).resolve()
        if key in seen:
            raise RunError(f"overlap: {r.dir} is given twice (as {seen[key]}); give the runs of different seeds")
        seen[key] = Path(r.dir)
    a = runs[0]
    for r in runs[1:]:
        if r.fingerprint != a.fingerprint:
            raise SubnetworkError(
                f"{r.dir} was found on model {r.config.model!r} (fingerprint {r.fingerprint}) and {a.dir} on "
                f"{a.config.model!r} (fingerprint {a.fingerprint}); only runs of the same model can be combined"
            )
        ma, mr = a.subnetwork.mask_config, r.subnetwork.mask_config
        for field in ("layers", "matrices", "granularity"):
            if getattr(ma, field) != getattr(mr, field):
                raise SubnetworkError(
                    f"{r.dir} masks {field} {getattr(mr, field)} but {a.dir} masks {getattr(ma, field)}; "
                    "only runs with the same layer range, matrices and granularity can be combined"
                )
        if r.subnetwork.shape != a.subnetwork.shape:
            raise SubnetworkError(f"{r.dir} and {a.dir} come from models of different shapes")


def at_least(subs: Sequence[Subnetwork], k: int, **meta: Any) -> Subnetwork:
    """Weights in at least k of the n subnetworks (k=1: union, k=n: intersection)."""
    bins = [s.binary() for s in subs]
    comb = {n: torch.stack([b[n] for b in bins]).sum(0) >= k for n in bins[0]}
    return subs[0].with_binary(comb, **meta)


def combination_name(k: int, n: int) -> str:
    return "union" if k == 1 else "intersection" if k == n else f"at-least-{k}-of-{n}"


def overlap_stats(subs: Sequence[Subnetwork]) -> dict[str, Any]:
    """Pairwise Jaccard, and per layer / matrix how much of the subnetworks is shared by all seeds."""
    fulls = [s.full_binary() for s in subs]
    names = list(fulls[0])
    count = lambda f, sel: sum(int(f[n].sum()) for n in sel)
    n = len(subs)
    jac = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            inter = sum(int((fulls[i][x] & fulls[j][x]).sum()) for x in names)
            union = sum(int((fulls[i][x] | fulls[j][x]).sum()) for x in names)
            jac[i][j] = jac[j][i] = inter / union if union else 1.0

    def shared(sel: list[str]) -> dict[str, float]:
        inter = sum(int(torch.stack([f[x] for f in fulls]).all(0).sum()) for x in sel)
        union = sum(int(torch.stack([f[x] for f in fulls]).any(0).sum()) for x in sel)
        sizes = [count(f, sel) for f in fulls]
        return {
            "jaccard_all": inter / union if union else 1.0,
            "shared_frac": statistics.fmean(inter / s if s else 1.0 for s in sizes),  # of each seed's part, shared by all
            "n_intersection": inter,
            "n_union": union,
        }

    layers = sorted({parse_weight_name(x)[0] for x in names})
    matrices = list(dict.fromkeys(parse_weight_name(x)[1] for x in names))
    pairs = [jac[i][j] for i in range(n) for j in range(i + 1, n)]
    return {
        "jaccard": jac,
        "jaccard_mean": statistics.fmean(pairs),
        "all": shared(names),
        "per_layer": {str(l): shared([x for x in names if parse_weight_name(x)[0] == l]) for l in layers},
        "per_matrix": {m: shared([x for x in names if parse_weight_name(x)[1] == m]) for m in matrices},
    }


def overlap_runs(
    runs: Sequence[str | os.PathLike | RunInfo],
    *,
    out: str | os.PathLike | None = None,
    evaluate: bool = False,
    evaluator: Evaluator | None = None,
    log: Log = print,
    overrides: ModelOverrides | None = None,
    lens_model: LensModel | None = None,
) -> dict[str, Any]:
    """Union / intersection / at-least-k-of-n of several seeds' subnetworks, with overlap statistics.

    ``out``: a new directory receiving ``overlap.json`` and one run directory per combination
    (``union/``, ``intersection/``, ``at-least-2-of-3/``...; ``kcs-lens evaluate`` works on each).
    ``evaluate``: also evaluate each run and combination on the first run's sets.
    """
    infos = [r if isinstance(r, RunInfo) else load_run(r) for r in runs]
    check_compatible(infos)
    subs = [r.subnetwork for r in infos]
    n = len(subs)
    combos = {
        combination_name(k, n): at_least(
            subs, k, combination=combination_name(k, n), runs=[str(r.dir) for r in infos], seed=None, step=None, selected_by=None
        )
        for k in range(1, n + 1)
    }
    targets = sorted({str(r.config.target_kg) for r in infos})
    if len(targets) > 1:
        log(f"note: the runs have different TargetKGs {targets}; combinations are evaluated on {infos[0].config.target_kg!r}")
    result: dict[str, Any] = {
        "runs": [{**r.header(), "sparsity": r.subnetwork.sparsity, "n_in_subnetwork": r.subnetwork.stats.n_sub} for r in infos],
        "target_kgs": targets,
        "overlap": overlap_stats(subs),
        "combinations": {
            name: {"k": k, "sparsity": c.sparsity, "sparsity_all_linear": c.sparsity_all_linear, "n_in_subnetwork": c.stats.n_sub}
            for k, (name, c) in enumerate(combos.items(), start=1)
        },
    }
    if evaluate:
        ev = evaluator or Evaluator(infos[0], log=log, overrides=overrides, lens_model=lens_model)
        for row, r in zip(result["runs"], infos):
            row["metrics"] = ev.metrics(r.subnetwork, ("remaining",))
        for name, c in combos.items():
            result["combinations"][name]["metrics"] = ev.metrics(c, ("remaining",))
    if out is not None:
        write_combinations(Path(out), infos[0], combos, result)
        result["out"] = str(out)
    return result


def write_combinations(out: Path, first: RunInfo, combos: dict[str, Subnetwork], result: dict[str, Any]) -> None:
    """``out/<combination>/{config.json, subnetwork.safetensors}`` + ``out/overlap.json``, atomically."""
    if out.exists():
        raise RunError(f"{out} exists; choose a new --out directory for the combinations")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, out.name)
    try:
        for name, c in combos.items():
            cfg = {**first.raw_config, "combination": {"name": name, "runs": [r["run"] for r in result["runs"]]}}
            atomic_write_json(tmp / name / "config.json", cfg)
            c.save(tmp / name / "subnetwork.safetensors")
        atomic_write_json(tmp / "overlap.json", result)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
