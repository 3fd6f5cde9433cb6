"""The rows of the paper's table: one per run (:func:`run_row`: its evaluation and random baseline,
the answers and multiple choice, density per layer) and the mean over seeds (:func:`mean_row`).
Evaluations and baselines are cached in each run directory (``evaluation.json``,
``baseline.json``) and reused while the subnetwork is unchanged (:func:`evaluated_rows`). The
report files are :mod:`kcs_lens.evaluation.paper_report`."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kcs_lens.discovery.run_model import ModelOverrides, load_run_model
from kcs_lens.discovery.rundir import RunInfo
from kcs_lens.evaluation.evaluate import Evaluator, baseline_run, evaluate_run
from kcs_lens.model.lens import LensModel

Log = Callable[[str], None]


@dataclass(frozen=True)
class RowSettings:
    """How a run's numbers are obtained, for every table and page built from :func:`evaluated_rows`:
    ``draws`` random-baseline draws from seed ``seed``, ``relearn`` relearning steps (``evaluate
    --relearn``; 0: none), ``recompute`` ignores the cached ``evaluation.json`` / ``baseline.json``;
    the model is ``lens_model`` where its weights are the run's, else the run's own with
    ``overrides``; ``log`` reports what is evaluated."""

    draws: int = 5
    seed: int = 0
    recompute: bool = False
    relearn: int = 0
    lens_model: LensModel | None = None
    overrides: ModelOverrides | None = None
    log: Log = field(default=print, compare=False)

    def run_model(self, run: RunInfo) -> LensModel:
        """The model ``run`` is evaluated with: ``lens_model`` where its weights are the run's, else
        the run's own with ``overrides``."""
        if self.lens_model is not None and self.lens_model.fingerprint() == run.fingerprint:
            return self.lens_model
        return load_run_model(run, self.overrides)


REPORT_SUFFIXES = (".md", ".csv", ".png")  # report --out FILE writes FILE.md, FILE.csv, FILE.png
KEYS = (("target", "TargetKG"), ("control", "ControlKG"), ("lm", "ControlLM"))
# Triplet sets whose answers (top-1 accuracy, mean rank of the tail's first token, multiple choice)
# the tables show, original -> remaining model (kcs_lens.evaluation.scoring.TailScores.headline,
# kcs_lens.evaluation.choice.ChoiceScores.headline), with the random baseline's remaining model.
ANSWER_SETS = (
    ("target", "TargetKG"),
    ("control", "ControlKG"),
    ("control_test", "ControlKG test"),
    ("paraphrases", "paraphrases"),
)
ANSWER_METRICS = (
    ("top1", "top-1"),
    ("rank", "rank"),
    ("mc", "MC"),
    ("mc_norm", "MC norm"),
    ("ratio", "PPL ratio"),
    ("lens_top10", "lens top-10"),
)
# the names in evaluation.json (evaluation.set_metrics)
_EVAL_NAME = {
    "top1": "top1",
    "rank": "rank_mean",
    "mc": "mc",
    "mc_norm": "mc_norm",
    "ratio": "ppl_ratio",
    "lens_top10": "lens_top10_any",
}


def answer_columns(metrics: dict[str, Any], random: dict[str, Any] | None = None) -> dict[str, float | None]:
    """``{metric}_{original,remaining}_{set}`` from an evaluation's metrics and, with ``random`` (the
    baseline's mean metrics of the remaining model), ``{metric}_random_{set}``; None where the
    evaluation lacks the set (no paraphrases) or the metric (older files)."""
    out: dict[str, float | None] = {}
    for s, _ in ANSWER_SETS:
        for m, _ in ANSWER_METRICS:
            for v in ("original", "remaining"):
                out[f"{m}_{v}_{s}"] = metrics.get(v, {}).get(s, {}).get(_EVAL_NAME[m])
            if random is not None:
                out[f"{m}_random_{s}"] = random.get(s, {}).get(_EVAL_NAME[m])
        out[f"mc_chance_{s}"] = metrics.get("original", {}).get(s, {}).get("mc_chance")
    return out


RELEARN_METRICS = ("top1", "mc")


def relearn_columns(r: dict[str, Any] | None) -> dict[str, Any]:
    """``relearn_{top1,mc}_{original,remaining}_target``: the TargetKG after ``evaluate --relearn``
    (None without it), ``relearn_steps``."""
    out: dict[str, Any] = {"relearn_steps": None if r is None else r["steps"]}
    for m in RELEARN_METRICS:
        for v in ("original", "remaining"):
            out[f"relearn_{m}_{v}_target"] = None if r is None else r[v]["after"]["target"].get(m)
    return out


def before_after(orig: float | None, rem: float | None, spec: str = ".2f") -> str:
    """``orig -> rem`` for a table cell; ``-`` for a missing value (older run files)."""
    f = lambda x: "-" if x is None else format(x, spec)
    return f"{f(orig)} → {f(rem)}"


def _cached(path: Path, sha: str, draws: int | None = None, need: Sequence[str] = ()) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if d.get("subnetwork_sha") != sha or (draws is not None and d.get("draws", 0) < draws) or any(k not in d for k in need):
        return None
    return d


def run_row(info: RunInfo, ev_: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """One report row: sparsity and dPPLs of the remaining model, and of the random baseline."""
    rem, b_mean, b_std = (
        ev_["metrics"]["remaining"],
        base["baseline"]["mean"]["metrics"]["remaining"],
        base["baseline"]["std"]["metrics"]["remaining"],
    )
    row: dict[str, Any] = {
        "model": info.config.model,
        "fingerprint": info.fingerprint,
        "ablation": info.config.ablation,
        "target_kg": str(info.config.target_kg),
        "seed": str(info.config.seed),
        "run": str(info.dir),
        "meets_criteria": ev_.get("meets_criteria"),
        "sparsity": ev_["subnetwork"]["sparsity"],
        "sparsity_all_linear": ev_["subnetwork"]["sparsity_all_linear"],
    }
    for k, _ in KEYS:
        row.update({f"dppl_{k}": rem[k]["dppl"], f"ratio_{k}": rem[k]["ppl_ratio"], f"random_dppl_{k}": b_mean[k]["dppl"]})
        row.update({f"random_dppl_{k}_std": b_std[k]["dppl"], f"ppl_original_{k}": ev_["metrics"]["original"][k]["ppl"]})
    row.update(answer_columns(ev_["metrics"], b_mean))
    row.update(relearn_columns(ev_.get("relearn")))
    row["random_draws"] = base["draws"]
    row["config"] = info.config.to_dict()
    row["density_per_layer"] = ev_["subnetwork"]["density"]["per_layer"]
    return row


NUMERIC = (
    ["sparsity", "sparsity_all_linear"]
    + [f"{p}{k}" for p in ("dppl_", "ratio_") for k, _ in KEYS]
    + [f"random_dppl_{k}{s}" for k, _ in KEYS for s in ("", "_std")]
    + [f"ppl_original_{k}" for k, _ in KEYS]
    + [f"{m}_{v}_{s}" for s, _ in ANSWER_SETS for m, _ in ANSWER_METRICS for v in ("original", "remaining", "random")]
    + [f"mc_chance_{s}" for s, _ in ANSWER_SETS]
    + [f"relearn_{m}_{v}_target" for m in RELEARN_METRICS for v in ("original", "remaining")]
)


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds; ``<col>_seed_std`` the spread over seeds."""
    m = {k: rows[0][k] for k in ("model", "fingerprint", "ablation", "target_kg")}
    m.update(
        seed="mean", run="", meets_criteria=all(bool(r["meets_criteria"]) for r in rows), random_draws=rows[0]["random_draws"]
    )
    for k in NUMERIC:
        xs = [r[k] for r in rows if r.get(k) is not None]  # missing in older runs' files
        m[k] = statistics.fmean(xs) if xs else None
        m[f"{k}_seed_std"] = (statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else None
    return m


def evaluated_rows(
    infos: Sequence[RunInfo], settings: RowSettings = RowSettings(), *, facts: bool = False
) -> list[dict[str, Any]]:
    """One :func:`run_row` per run (in the order given), from the cached ``evaluation.json`` and
    ``baseline.json`` when the subnetwork is unchanged, else evaluated (one model load per model).
    ``facts``: a cached evaluation must also hold the per-fact answers (older ones are redone); it
    must hold as many relearning steps as ``settings.relearn``."""
    s = settings
    groups: dict[str, list[RunInfo]] = {}
    for r in infos:
        groups.setdefault(r.fingerprint, []).append(r)
    rows: list[dict[str, Any]] = []
    for group in groups.values():  # one model at a time
        lm: LensModel | None = None
        for r in group:
            sha = r.subnetwork.membership_sha()
            ev_ = None if s.recompute else _cached(r.files.evaluation, sha, need=("facts",) if facts else ())
            if s.relearn and ev_ is not None and (ev_.get("relearn") or {}).get("steps") != s.relearn:
                ev_ = None
            base = None if s.recompute else _cached(r.files.baseline, sha, s.draws)
            if ev_ is None or base is None:
                lm = lm or s.run_model(r)
                s.log(f"evaluating {r.dir} ({s.draws} random draws)")
                evr = Evaluator(r, lens_model=lm, log=s.log)
                ev_ = ev_ or evaluate_run(r, evaluator=evr, relearn_steps=s.relearn, log=s.log)
                base = base or baseline_run(r, draws=s.draws, seed=s.seed, evaluator=evr)
            rows.append(run_row(r, ev_, base))
    order = {str(r.dir): i for i, r in enumerate(infos)}
    return sorted(rows, key=lambda row: order[row["run"]])


def with_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows sorted by model, ablation (full first), TargetKG, seed; a mean row after each TargetKG."""
    order = lambda a: (a != "full", a)
    key = lambda r: (r["model"], r["fingerprint"], order(r["ablation"]), r["target_kg"])
    out: list[dict[str, Any]] = []
    for k in sorted({key(r) for r in rows}):
        grp = sorted((r for r in rows if key(r) == k), key=lambda r: (len(r["seed"]), r["seed"]))
        out += grp
        if len(grp) > 1:
            out.append(mean_row(grp))
    return out


def short(spec: str) -> str:
    """A KG or model spec for a table cell: the file stem of a path, else the spec itself."""
    return Path(spec).stem if ("/" in spec or os.sep in spec) else spec
