"""Evaluating found subnetworks (method.md, "Evaluation"): the remaining model and the subnetwork
alone against the original, random baselines of the same per-matrix size, seed overlap, and
paper-shaped reports. Each CLI command (``evaluate``, ``baseline``, ``overlap``, ``report``) is
one function here: :func:`evaluate_run`, :func:`baseline_run`, :func:`overlap_runs`, :func:`report_runs`.

Metrics are nested dicts ``{variant: {set: {metric: value}}}`` with variants ``original``,
``remaining`` (theta * (1 - m)) and ``subnetwork`` (theta * m), sets ``target`` (TargetKG),
``control`` (ControlKG validation), ``lm`` (held-out ControlLM text), ``paraphrases`` and any extra
KG given by its spec. Deltas are against the original model, per triplet where they are per triplet.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import statistics
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from kcs_lens.config import DiscoveryConfig
from kcs_lens.data.triplets import KGError, TripletBatch, tokenize_triplets
from kcs_lens.discovery import RunError, load_run_data
from kcs_lens.masks import Keep, total_linear_weights
from kcs_lens.models import ATTN_MATRICES, LensModel, canonical_shape, load_model, parse_weight_name
from kcs_lens.scoring import TailScores, lm_nll, tail_scores
from kcs_lens.subnetwork import Subnetwork, SubnetworkError, atomic_write_bytes, atomic_write_json

VARIANTS: dict[str, Keep | None] = {"original": None, "remaining": "remaining", "subnetwork": "subnetwork"}
NEAR = 0.05  # a mask probability sigmoid(l) <= NEAR is "near 0", >= 1 - NEAR "near 1"
Metrics = dict[str, dict[str, dict[str, float]]]  # variant -> set -> metric -> value
Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------
# Run directories
# ------------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    """A finished discovery run directory: its config, model fingerprint and subnetwork."""

    dir: Path
    config: DiscoveryConfig
    fingerprint: str
    subnetwork: Subnetwork
    summary: dict[str, Any] | None
    raw_config: dict[str, Any]


def load_run(path: str | os.PathLike, subnetwork: str | os.PathLike | None = None) -> RunInfo:
    """Read a run directory (``config.json`` + ``subnetwork.safetensors``); ``subnetwork`` replaces
    the selected subnetwork by another file (a checkpoint, an overlap combination)."""
    d = Path(path)
    if not d.is_dir():
        raise RunError(f"{d}: no such run directory")
    cfg_file = d / "config.json"
    if not cfg_file.exists():
        raise RunError(f"{d}: not a run directory (config.json missing)")
    try:
        raw = json.loads(cfg_file.read_text())
        cfg = DiscoveryConfig(**raw["config"])
        fp = raw["model_fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RunError(f"{cfg_file}: not a kcs-lens run config ({type(e).__name__}: {e})") from e
    sub_file = Path(subnetwork) if subnetwork else d / "subnetwork.safetensors"
    if not sub_file.exists():
        hint = "" if subnetwork else f"; the run has not finished (continue it: kcs-lens discover --resume {d})"
        raise RunError(f"{d}: incomplete run, {sub_file.name} is missing{hint}")
    sub = Subnetwork.load(sub_file)
    sfp = sub.meta.get("model_fingerprint")
    if sfp and sfp != fp:
        raise SubnetworkError(f"{sub_file}: found on a model with fingerprint {sfp}, but run {d} used {fp}")
    summary_file = d / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    return RunInfo(d, cfg, fp, sub, summary, raw)


def expand_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories; a folder without config.json stands for the run directories inside it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "config.json").exists():
            inner = sorted(q for q in p.iterdir() if (q / "config.json").exists())
            if not inner:
                raise RunError(f"{p}: neither a run directory nor a folder of run directories")
            out += inner
        else:
            out.append(p)
    return out


def subnetwork_sha(sub: Subnetwork) -> str:
    """Identity of a subnetwork's membership (binary mask), independent of file metadata."""
    h = hashlib.sha256()
    for n, b in sorted(sub.binary().items()):
        h.update(n.encode())
        h.update(b.to(torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# Statistics of a subnetwork (no model needed)
# ------------------------------------------------------------------------------------------
def full_binary(sub: Subnetwork) -> dict[str, Bool[Tensor, "..."]]:
    """Membership per weight at canonical shape (neuron masks broadcast over their rows)."""
    b = sub.binary()
    return {n: b[n].expand(canonical_shape(sub.shape, parse_weight_name(n)[1])) for n in sub.mask_config.names}


def subnetwork_stats(sub: Subnetwork) -> dict[str, Any]:
    """Sparsity, density per layer / matrix / attention head, and the share of logits near 0 and 1."""
    full = full_binary(sub)
    per_layer: dict[int, list[int]] = {}
    per_matrix: dict[str, list[int]] = {}
    per_lm: dict[int, dict[str, float]] = {}
    per_head: dict[int, dict[str, list[float]]] = {}
    for n, b in full.items():
        layer, matrix = parse_weight_name(n)
        k, tot = int(b.sum()), b.numel()
        for acc, key in ((per_layer, layer), (per_matrix, matrix)):
            a = acc.setdefault(key, [0, 0])
            a[0] += k
            a[1] += tot
        per_lm.setdefault(layer, {})[matrix] = k / tot
        if matrix in ATTN_MATRICES:  # [h, m, d] or [h, d, m]: head first
            per_head.setdefault(layer, {})[matrix] = b.flatten(1).float().mean(1).tolist()
    for heads in per_head.values():
        heads["all"] = torch.tensor([heads[m] for m in ATTN_MATRICES if m in heads]).mean(0).tolist()
    probs = torch.sigmoid(torch.cat([l.flatten().float() for l in sub.logits.values()]))
    st = sub.stats
    return {
        "sparsity": st.sparsity,
        "sparsity_all_linear": sub.sparsity_all_linear,
        "n_in_subnetwork": st.n_sub,
        "n_masked": st.n_total,
        "n_linear": total_linear_weights(sub.shape),
        "granularity": sub.mask_config.granularity,
        "layers": list(sub.mask_config.layers),
        "density": {
            "per_layer": {str(l): a / t for l, (a, t) in sorted(per_layer.items())},
            "per_matrix": {m: a / t for m, (a, t) in per_matrix.items()},
            "per_layer_matrix": {str(l): v for l, v in sorted(per_lm.items())},
            "per_head": {str(l): v for l, v in sorted(per_head.items())},
        },
        "logits": {"near_threshold": NEAR, "near_0": float((probs <= NEAR).float().mean()), "near_1": float((probs >= 1 - NEAR).float().mean())},
    }


# ------------------------------------------------------------------------------------------
# Scoring the three variants
# ------------------------------------------------------------------------------------------
def set_metrics(s: TailScores, o: TailScores | None) -> dict[str, float]:
    """PPL, mean tail rank / log-prob, top-k; with ``o`` (original) also deltas (per-triplet mean/min/max)."""
    m = {
        "ppl": s.ppl,
        "rank_mean": float(s.first_rank.float().mean()),
        "logprob_mean": float(s.first_logprob.mean()),
        **{f"top{k}": s.topk(k) for k in (1, 5, 10)},
    }
    if o is not None:
        dr, dl = (s.first_rank - o.first_rank).float(), s.first_logprob - o.first_logprob
        m.update(dppl=s.ppl - o.ppl, ppl_ratio=s.ppl / o.ppl)
        for name, d in (("drank", dr), ("dlogprob", dl)):
            m.update({f"{name}_mean": float(d.mean()), f"{name}_min": float(d.min()), f"{name}_max": float(d.max())})
        m.update({f"dtop{k}": s.topk(k) - o.topk(k) for k in (1, 5, 10)})
    return m


class Evaluator:
    """A model plus the evaluation sets of one run; the original model's scores are computed once.

    ``kgs``: extra KG specs evaluated against the same subnetwork. ``paraphrases``: KG specs of
    other verbalizations of the TargetKG (merged into the set ``paraphrases``); ``None`` looks for
    the bundled ``<target>-paraphrases`` set.
    """

    def __init__(
        self,
        run: RunInfo,
        *,
        kgs: Sequence[str] = (),
        paraphrases: Sequence[str] | None = None,
        lens_model: LensModel | None = None,
        model: str | None = None,
        backend: str | None = None,
        device: str | None = None,
        log: Log = print,
    ):
        from kcs_lens.data.loaders import concat, load_kg

        cfg = self.config = run.config
        self.lm = lens_model or load_model(model or cfg.model, backend=backend or cfg.backend, device=device or cfg.device)
        check_model(run, self.lm)
        data = load_run_data(cfg, self.lm, log)
        self.batches: dict[str, TripletBatch] = {"target": data.target_batch, "control": data.control_val_batch}
        self.sets: dict[str, dict[str, Any]] = {
            "target": {"spec": cfg.target_kg, "n": len(data.target)},
            "control": {"spec": cfg.control_val_kg or f"{cfg.control_kg} (first {cfg.control_val_size})", "n": len(data.control_val)},
        }
        tok = lambda ts, src: tokenize_triplets(
            ts, self.lm.tokenizer, prepend_bos=cfg.prepend_bos, tail_scoring=cfg.tail_scoring, d_vocab=self.lm.shape.d_vocab, source=src
        ).to(self.lm.device)
        if paraphrases is None:
            paraphrases = self._auto_paraphrases(load_kg)
        if paraphrases:
            ts = concat([load_kg(p, model_name=self.lm.spec) for p in paraphrases], name="paraphrases")
            self.batches["paraphrases"] = tok(ts, "paraphrases")
            self.sets["paraphrases"] = {"spec": ", ".join(paraphrases), "n": len(ts)}
        for spec in kgs:
            name = str(spec) if str(spec) not in self.batches else f"kg:{spec}"
            ts = load_kg(spec, model_name=self.lm.spec)
            self.batches[name] = tok(ts, str(spec))
            self.sets[name] = {"spec": str(spec), "n": len(ts)}
        self.lm_blocks = data.lm_heldout
        self.sets["lm"] = {"spec": f"{cfg.lm_source} (held-out)", "n_blocks": int(self.lm_blocks.shape[0]), "block_len": int(self.lm_blocks.shape[1])}
        self.original = self.scores(None)

    def _auto_paraphrases(self, load_kg) -> list[str]:
        spec = f"{self.config.target_kg}-paraphrases"
        if any(c in str(self.config.target_kg) for c in "/:\\."):
            return []
        try:
            load_kg(spec, model_name=self.lm.spec)
        except KGError:
            return []
        return [spec]

    def scores(self, sub: Subnetwork | None, keep: Keep = "remaining") -> dict[str, Any]:
        """Raw scores of every set: TailScores per triplet set, mean NLL for ``lm``."""
        with nullcontext() if sub is None else sub.applied(self.lm, keep=keep):
            out: dict[str, Any] = {k: tail_scores(self.lm, b) for k, b in self.batches.items()}
            out["lm"] = lm_nll(self.lm, self.lm_blocks)
        return out

    def metrics(self, sub: Subnetwork, variants: Sequence[str] = tuple(VARIANTS)) -> Metrics:
        out: Metrics = {}
        for v in variants:
            keep = VARIANTS[v]
            s = self.original if keep is None else self.scores(sub, keep)
            o = None if keep is None else self.original
            m = {k: set_metrics(s[k], None if o is None else o[k]) for k in self.batches}
            ppl = math.exp(s["lm"])
            m["lm"] = {"ppl": ppl} if o is None else {"ppl": ppl, "dppl": ppl - math.exp(o["lm"]), "ppl_ratio": ppl / math.exp(o["lm"])}
            out[v] = m
        return out


def check_model(run: RunInfo, lm: LensModel) -> None:
    """The model must be the run's: same shape (checked first) and the same weights."""
    run.subnetwork.check_model(lm, strict_fingerprint=False)
    if lm.fingerprint() != run.fingerprint:
        raise SubnetworkError(
            f"run {run.dir} was found on model {run.config.model!r} (weights fingerprint {run.fingerprint}), "
            f"but {lm.spec!r} has different weights (fingerprint {lm.fingerprint()})"
        )


def run_header(run: RunInfo) -> dict[str, Any]:
    c = run.config
    return {
        "run": str(run.dir),
        "model": c.model,
        "model_fingerprint": run.fingerprint,
        "target_kg": c.target_kg,
        "seed": c.seed,
        "ablation": c.ablation,
        "combination": run.raw_config.get("combination"),
        "subnetwork_sha": subnetwork_sha(run.subnetwork),
        "selected_step": (run.summary or {}).get("selected_step"),
        "meets_criteria": (run.summary or {}).get("meets_criteria"),
    }


# ------------------------------------------------------------------------------------------
# evaluate / baseline
# ------------------------------------------------------------------------------------------
def evaluate_run(
    run: str | os.PathLike | RunInfo,
    *,
    kgs: Sequence[str] = (),
    paraphrases: Sequence[str] | None = None,
    subnetwork: str | os.PathLike | None = None,
    evaluator: Evaluator | None = None,
    save: str | os.PathLike | bool = True,
    log: Log = print,
    **model_kw: Any,
) -> dict[str, Any]:
    """Everything ``kcs-lens evaluate`` shows. ``save``: True writes ``RUN/evaluation.json``, a path
    writes there, False nothing. ``model_kw``: ``model``, ``backend``, ``device``, ``lens_model``
    for the Evaluator (``device``: default the run's)."""
    info = run if isinstance(run, RunInfo) else load_run(run, subnetwork)
    ev = evaluator or Evaluator(info, kgs=kgs, paraphrases=paraphrases, log=log, **model_kw)
    out = {
        **run_header(info),
        "sets": ev.sets,
        "subnetwork": subnetwork_stats(info.subnetwork),
        "metrics": ev.metrics(info.subnetwork),
    }
    _save(out, save, info.dir / "evaluation.json")
    return out


def random_like(sub: Subnetwork, generator: torch.Generator) -> Subnetwork:
    """A subnetwork with, in every matrix, as many members as ``sub`` (weights, or rows at neuron
    granularity) placed uniformly at random."""
    out = {}
    for n, b in sub.binary().items():
        flat = torch.zeros(b.numel(), dtype=torch.bool)
        flat[torch.randperm(b.numel(), generator=generator)[: int(b.sum())]] = True
        out[n] = flat.view(b.shape)
    return sub.with_binary(out, random_baseline=True)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


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
    return {name: unflatten({k: fn(v) for k, v in col.items()}) for name, fn in (("mean", statistics.fmean), ("std", std), ("min", min), ("max", max))}


def baseline_run(
    run: str | os.PathLike | RunInfo,
    *,
    draws: int = 5,
    seed: int = 0,
    kgs: Sequence[str] = (),
    paraphrases: Sequence[str] | None = None,
    subnetwork: str | os.PathLike | None = None,
    evaluator: Evaluator | None = None,
    save: str | os.PathLike | bool = True,
    log: Log = print,
    **model_kw: Any,
) -> dict[str, Any]:
    """Random subnetworks of the run's per-matrix sizes (``draws`` of them, seeds ``seed``, ``seed+1``...):
    mean and spread of every metric, next to the run's own (``run_metrics``)."""
    if draws < 1:
        raise RunError(f"--draws must be at least 1, got {draws}")
    info = run if isinstance(run, RunInfo) else load_run(run, subnetwork)
    ev = evaluator or Evaluator(info, kgs=kgs, paraphrases=paraphrases, log=log, **model_kw)
    per_draw = []
    for i in range(draws):
        rnd = random_like(info.subnetwork, torch.Generator().manual_seed(seed + i))
        per_draw.append({"metrics": ev.metrics(rnd, ("remaining", "subnetwork")), "density": subnetwork_stats(rnd)["density"]})
    out = {
        **run_header(info),
        "draws": draws,
        "draw_seeds": [seed + i for i in range(draws)],
        "sets": ev.sets,
        "subnetwork": subnetwork_stats(info.subnetwork),
        "run_metrics": ev.metrics(info.subnetwork),
        "baseline": spread(per_draw),
        "per_draw": [p["metrics"] for p in per_draw],
    }
    _save(out, save, info.dir / "baseline.json")
    return out


def _save(obj: dict[str, Any], save: str | os.PathLike | bool, default: Path) -> None:
    if save:
        atomic_write_json(default if save is True else Path(save), obj)


# ------------------------------------------------------------------------------------------
# Seeds: overlap and combinations
# ------------------------------------------------------------------------------------------
def check_compatible(runs: Sequence[RunInfo]) -> None:
    """Runs to combine must share model weights, masked layers/matrices and granularity."""
    if len(runs) < 2:
        raise RunError("overlap needs at least two runs")
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
    fulls = [full_binary(s) for s in subs]
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
    **model_kw: Any,
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
        combination_name(k, n): at_least(subs, k, combination=combination_name(k, n), runs=[str(r.dir) for r in infos], seed=None, step=None, selected_by=None)
        for k in range(1, n + 1)
    }
    targets = sorted({str(r.config.target_kg) for r in infos})
    if len(targets) > 1:
        log(f"note: the runs have different TargetKGs {targets}; combinations are evaluated on {infos[0].config.target_kg!r}")
    result: dict[str, Any] = {
        "runs": [{**run_header(r), "sparsity": r.subnetwork.sparsity, "n_in_subnetwork": r.subnetwork.stats.n_sub} for r in infos],
        "target_kgs": targets,
        "overlap": overlap_stats(subs),
        "combinations": {
            name: {"k": k, "sparsity": c.sparsity, "sparsity_all_linear": c.sparsity_all_linear, "n_in_subnetwork": c.stats.n_sub}
            for k, (name, c) in enumerate(combos.items(), start=1)
        },
    }
    if evaluate:
        ev = evaluator or Evaluator(infos[0], log=log, **model_kw)
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
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
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


# ------------------------------------------------------------------------------------------
# Report: the paper's table per model, the random baseline beside it, loss ablations
# ------------------------------------------------------------------------------------------
KEYS = (("target", "TargetKG"), ("control", "ControlKG"), ("lm", "ControlLM"))


def _cached(path: Path, sha: str, draws: int | None = None) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if d.get("subnetwork_sha") != sha or (draws is not None and d.get("draws", 0) < draws):
        return None
    return d


def run_row(info: RunInfo, ev_: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """One report row: sparsity and dPPLs of the remaining model, and of the random baseline."""
    rem, b_mean, b_std = ev_["metrics"]["remaining"], base["baseline"]["mean"]["metrics"]["remaining"], base["baseline"]["std"]["metrics"]["remaining"]
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
    row["random_draws"] = base["draws"]
    row["config"] = info.config.to_dict()
    row["density_per_layer"] = ev_["subnetwork"]["density"]["per_layer"]
    return row


NUMERIC = ["sparsity", "sparsity_all_linear"] + [f"{p}{k}" for p in ("dppl_", "ratio_") for k, _ in KEYS] + [
    f"random_dppl_{k}{s}" for k, _ in KEYS for s in ("", "_std")
] + [f"ppl_original_{k}" for k, _ in KEYS]


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds; ``<col>_seed_std`` the spread over seeds."""
    m = {k: rows[0][k] for k in ("model", "fingerprint", "ablation", "target_kg")}
    m.update(seed="mean", run="", meets_criteria=all(bool(r["meets_criteria"]) for r in rows), random_draws=rows[0]["random_draws"])
    for k in NUMERIC:
        xs = [r[k] for r in rows]
        m[k] = statistics.fmean(xs)
        m[f"{k}_seed_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return m


def report_runs(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    draws: int = 5,
    seed: int = 0,
    recompute: bool = False,
    lens_model: LensModel | None = None,
    device: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Evaluate (or reuse ``evaluation.json`` / ``baseline.json`` of) every run and write
    ``<out>.md``, ``<out>.csv`` and ``<out>.png`` (per-layer density). Returns the rows."""
    infos = [load_run(p) for p in expand_runs(runs)]
    if not infos:
        raise RunError("report needs at least one run")
    base_out = Path(out)
    if base_out.suffix in (".md", ".csv", ".png"):
        base_out = base_out.with_suffix("")
    groups: dict[str, list[RunInfo]] = {}
    for r in infos:
        groups.setdefault(r.fingerprint, []).append(r)
    rows: list[dict[str, Any]] = []
    for fp, group in groups.items():
        lm = lens_model if lens_model is not None and lens_model.fingerprint() == fp else None
        for r in group:
            sha = subnetwork_sha(r.subnetwork)
            ev_ = None if recompute else _cached(r.dir / "evaluation.json", sha)
            base = None if recompute else _cached(r.dir / "baseline.json", sha, draws)
            if ev_ is None or base is None:
                if lm is None:
                    lm = load_model(r.config.model, backend=r.config.backend, device=device or r.config.device)
                log(f"evaluating {r.dir} ({draws} random draws)")
                evr = Evaluator(r, lens_model=lm, log=log)
                ev_ = ev_ or evaluate_run(r, evaluator=evr)
                base = base or baseline_run(r, draws=draws, seed=seed, evaluator=evr)
            rows.append(run_row(r, ev_, base))
    table = with_means(rows)
    write_report(base_out, table, infos)
    return {"rows": table, "files": [str(base_out.with_suffix(s)) for s in (".md", ".csv", ".png")]}


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


def _fmt(x: float, pm: float | None = None) -> str:
    s = f"{x:+.3g}" if abs(x) < 1e4 else f"{x:+.3e}"
    return s if pm is None else f"{s} ± {pm:.2g}"


def markdown(table: list[dict[str, Any]], infos: list[RunInfo]) -> str:
    sel = infos[0].raw_config.get("selection", {}).get("rule", "")
    lines = ["# kcs-lens report", ""]
    lines.append(
        "dPPL = PPL(remaining model) - PPL(original) on TargetKG, ControlKG (validation) and held-out ControlLM text. "
        "Random = the same number of weights removed uniformly at random in every masked matrix (mean ± std over draws). "
        "Mean rows: mean ± std over seeds."
    )
    if sel:
        lines += ["", f"Checkpoint selection: {sel}."]
    for fp in dict.fromkeys(r["fingerprint"] for r in table):
        rows = [r for r in table if r["fingerprint"] == fp]
        info, model = next(i for i in infos if i.fingerprint == fp), rows[0]["model"]
        mc = info.subnetwork.mask_config
        lines += ["", f"## Model `{model}`", "", f"Masked layers {list(mc.layers)}, matrices {', '.join(mc.matrices)}, {mc.granularity} granularity; "
                  f"fingerprint `{info.fingerprint}`. Original model: ControlKG PPL {rows[0]['ppl_original_control']:.4g}, ControlLM PPL {rows[0]['ppl_original_lm']:.4g}.", ""]
        head = ["ablation", "TargetKG", "seed", "PPL TargetKG (original)", "sparsity %", "dPPL TargetKG", "dPPL ControlKG", "dPPL ControlLM", "random dPPL TargetKG", "random dPPL ControlKG", "random dPPL ControlLM", "criteria met"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            mean = r["seed"] == "mean"
            sd = (lambda k: r[f"{k}_seed_std"]) if mean else (lambda k: None)
            cells = [r["ablation"], short(r["target_kg"]), f"**{r['seed']}**" if mean else r["seed"], f"{r['ppl_original_target']:.3g}", f"{100 * r['sparsity']:.2f}" + (f" ± {100 * sd('sparsity'):.2f}" if mean else "")]
            cells += [_fmt(r[f"dppl_{k}"], sd(f"dppl_{k}")) for k, _ in KEYS]
            cells += [_fmt(r[f"random_dppl_{k}"], r[f"random_dppl_{k}_std"] if not mean else sd(f"random_dppl_{k}")) for k, _ in KEYS]
            cells.append("yes" if r["meets_criteria"] else "no")
            lines.append("| " + " | ".join(cells) + " |")
        lines += config_note(rows) + ablation_lines(rows)
    return "\n".join(lines) + "\n"


def config_note(rows: list[dict[str, Any]]) -> list[str]:
    """A warning when the runs of one table differ in anything but TargetKG, seed and ablation."""
    cfgs = [r["config"] for r in rows if "config" in r]
    skip = {"seed", "target_kg", "ablation"}
    diff = {k: sorted({json.dumps(c.get(k)) for c in cfgs}) for k in sorted({k for c in cfgs for k in c} - skip)}
    diff = {k: v for k, v in diff.items() if len(v) > 1}
    if not diff:
        return []
    return ["", "**Warning: these runs differ in their configuration:** " + "; ".join(f"{k} ({', '.join(v)})" for k, v in diff.items()) + "."]


def ablation_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Loss ablations next to the full objective on the same TargetKG and seed."""
    runs = [r for r in rows if r["seed"] != "mean"]
    full = {(r["target_kg"], r["seed"]): r for r in runs if r["ablation"] == "full"}
    others = [r for r in runs if r["ablation"] != "full" and (r["target_kg"], r["seed"]) in full]
    if not others:
        return []
    head = ["ablation", "TargetKG", "seed", "sparsity % (full)", "dPPL TargetKG (full)", "dPPL ControlKG (full)", "dPPL ControlLM (full)"]
    out = ["", "### Loss ablations (each term dropped; the full objective on the same TargetKG and seed in parentheses)", ""]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(others, key=lambda r: (r["ablation"], r["target_kg"], r["seed"])):
        f = full[(r["target_kg"], r["seed"])]
        cells = [r["ablation"], short(r["target_kg"]), r["seed"], f"{100 * r['sparsity']:.2f} ({100 * f['sparsity']:.2f})"]
        cells += [f"{_fmt(r[f'dppl_{k}'])} ({_fmt(f[f'dppl_{k}'])})" for k, _ in KEYS]
        out.append("| " + " | ".join(cells) + " |")
    return out


CSV_COLUMNS = ["model", "fingerprint", "ablation", "target_kg", "seed", "meets_criteria", "random_draws"] + NUMERIC


def csv_text(table: list[dict[str, Any]]) -> str:
    cols = CSV_COLUMNS + [f"{k}_seed_std" for k in NUMERIC] + ["run"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in table:
        w.writerow({c: r.get(c, "") for c in cols})
    return buf.getvalue()


def density_png(table: list[dict[str, Any]]) -> bytes:
    """Per-layer density (% of masked weights in the subnetwork), one panel per model, a line per
    run of the full objective (per ablation run only where a model has no full run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fps = list(dict.fromkeys(r["fingerprint"] for r in table))
    fig, axes = plt.subplots(1, len(fps), figsize=(5.5 * len(fps), 3.8), squeeze=False)
    for ax, fp in zip(axes[0], fps):
        rows = [r for r in table if r["fingerprint"] == fp and r["seed"] != "mean"]
        model = rows[0]["model"]
        rows = [r for r in rows if r["ablation"] == "full"] or rows  # ablations would dwarf the full objective
        targets = list(dict.fromkeys(r["target_kg"] for r in rows))
        seeds = list(dict.fromkeys(r["seed"] for r in rows))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for r in rows:
            layers = sorted(r["density_per_layer"], key=int)
            ls = "-" if r["ablation"] == "full" else ":"
            ax.plot([int(l) for l in layers], [100 * r["density_per_layer"][l] for l in layers], ls, marker="osd^v<>*"[seeds.index(r["seed"]) % 8],
                    color=colors[targets.index(r["target_kg"]) % len(colors)], alpha=0.8,
                    label=f"{short(r['target_kg'])} s{r['seed']}" + ("" if r["ablation"] == "full" else f" ({r['ablation']})"))
            ax.set_xticks([int(l) for l in layers])
        ax.set_title(f"{short(model)} ({fp[:8]}): density per layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("density (% of masked weights)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_report(base: Path, table: list[dict[str, Any]], infos: list[RunInfo]) -> None:
    atomic_write_bytes(base.with_suffix(".md"), markdown(table, infos).encode())
    atomic_write_bytes(base.with_suffix(".csv"), csv_text(table).encode())
    atomic_write_bytes(base.with_suffix(".png"), density_png(table))
