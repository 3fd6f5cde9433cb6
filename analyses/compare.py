"""``compare_circuits``: a knowledge-critical subnetwork against activation patching, attribution
and knock-out localisation, on the TargetKG prompts and, as a specificity check, the ControlKG.

Reading order: :func:`compare_circuits` reads its settings (:mod:`.config`), loads the run (model,
subnetwork, prompts), then for each prompt set :func:`analyse_set` runs the lenses, each in its own
module:

1. :mod:`.structure`  density per layer / head (Q, K, V, O, combined) / MLP layer / neuron
2. :mod:`.patching`   activation patching (TL ``patching``), head-swap / zero / mean corruption
3. :mod:`.attribution` attribution patching and direct logit attribution
4. :mod:`.knockout`   the subnetwork removed inside one head or MLP layer at a time
5. :mod:`.agreement`  rank correlations and top-k overlap, bootstrap CIs over prompts

and writes ``comparison.json`` (every number), PNG heatmaps, and ``report.html``
(:mod:`.report`, offline, circuitsvis inlined once; the views: :mod:`.views`). Every effect is "original/clean tail
log-prob minus intervened": positive = the component supports the tail.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kcs_lens.analyses import agreement as agr
from kcs_lens.analyses.attribution import attribution_patching, direct_logit_attribution
from kcs_lens.analyses.config import CompareConfig
from kcs_lens.analyses.figures import METHODS, write_figures
from kcs_lens.analyses.knockout import knockout
from kcs_lens.analyses.patching import (
    activation_patching,
    hook_names,
    replacement_acts,
    run_cache,
)
from kcs_lens.analyses.prompts import Prompts, build_prompts, head_swap, kg_key, kg_sets, tail_logprob
from kcs_lens.analyses.structure import structure, unit_density
from kcs_lens.analyses.views import top_heads, views
from kcs_lens.data.triplets import TripletSet
from kcs_lens.discovery.run_model import ModelOverrides, load_run_model
from kcs_lens.discovery.rundir import RunInfo, load_run
from kcs_lens.errors import ConfigError
from kcs_lens.files import atomic_write_bytes
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.lens import LensModel
from kcs_lens.settings import build
from kcs_lens.stats import bootstrap_indices
from kcs_lens.threads import torch_threads

PAIRS = (
    ("density", "patching"),
    ("density", "attribution"),
    ("density", "dla"),
    ("knockout", "patching"),
    ("knockout", "attribution"),
    ("knockout", "dla"),
    ("density", "knockout"),
    ("patching", "attribution"),
)
# head-granularity runs: the mask probability of each head (mean over an MLP layer's neurons)
HEAD_PAIRS = (("mask", "patching"), ("mask", "attribution"), ("mask", "dla"), ("mask", "knockout"))


# ------------------------------------------------------------------------------------------
# One prompt set
# ------------------------------------------------------------------------------------------
class Timer:
    """``with t("stage"): ...`` accumulates wall seconds per stage in ``t.seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


def _units_scope(st: dict[str, Any]) -> dict[str, np.ndarray]:
    masked = agr.flatten_units(np.isfinite(st["head"]), np.isfinite(st["mlp"]))
    return {"masked_layers": masked, "all_units": np.ones_like(masked)}


def analyse_set(
    lm: LensModel,
    sub: Subnetwork,
    triplets: TripletSet,
    st: dict[str, Any],
    *,
    corrupt: str,
    prepend_bos: bool,
    n_bootstrap: int,
    seed: int,
    max_prompts: int | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Patching, attribution, DLA and knock-out on one prompt set (the first ``max_prompts``),
    per prompt, and their agreement with the subnetwork's density over heads and MLP layers."""
    trip = list(triplets)[: max_prompts or None]
    clean = build_prompts(trip, lm.tokenizer, prepend_bos=prepend_bos, d_vocab=lm.shape.d_vocab)
    clean.tokens = clean.tokens.to(lm.device)
    t = Timer()
    with t("corrupt"):
        corruption, valid, corrupted_lp = (
            head_swap_corruption(lm, clean, prepend_bos, seed, log) if corrupt == "swap" else (None, None, None)
        )
        acts = replacement_acts(lm, clean, corrupt, corruption.prompts if corruption else None)
        _, clean_acts = run_cache(lm, clean, hook_names(lm.shape.n_layers))
    with t("patching"):
        patch = activation_patching(lm, clean, acts, valid)
    with t("attribution"):
        attr = attribution_patching(lm, clean, acts, clean_acts, valid)
        dla = direct_logit_attribution(lm, clean)
    with t("knockout"):
        ko = knockout(lm, sub, clean, strict_fingerprint=False)

    dens_h, dens_m = unit_density(st)
    per_prompt = {  # [prompt, unit], density [unit]
        "density": agr.flatten_units(dens_h, dens_m),
        "knockout": np.nan_to_num(agr.flatten_units(ko.heads, ko.mlp), nan=0.0),  # unmasked layers: nothing removed
        **{m: agr.flatten_units(r.heads, r.mlp) for m, r in (("patching", patch), ("attribution", attr), ("dla", dla))},
    }
    with t("agreement"):
        agreement, summaries, heads_out = agreements(st, per_prompt, len(clean), n_bootstrap, seed)
    L, H = lm.shape.n_layers, lm.shape.n_heads
    prompts_out = prompt_rows(lm, trip, clean, corruption, ko, corrupted_lp)
    return {
        "name": triplets.name,
        "n_prompts": len(clean),
        "n_available": len(triplets),
        "corruption": {"mode": corrupt, **(corruption.describe() if corruption else {})},
        "prompts": prompts_out,
        "logprob": {
            "original_mean": float(np.mean(ko.original_logprob)),
            "remaining_mean": float(np.mean(ko.remaining_logprob)),
            "delta_mean": float(np.mean(ko.remaining_logprob - ko.original_logprob)),
        },
        "per_prompt": {  # [prompt, layer, head] and [prompt, layer]
            m: {"heads": r.heads, "mlp": r.mlp}
            for m, r in (("patching", patch), ("attribution", attr), ("dla", dla), ("knockout", ko))
        },
        "unit_mean": {
            "density": {"heads": dens_h, "mlp": dens_m},
            **{m: {"heads": s["mean"][: L * H].reshape(L, H), "mlp": s["mean"][L * H :]} for m, s in summaries.items()},
        },
        "unit_summary": {m: {k: v for k, v in s.items()} for m, s in summaries.items()},
        "agreement": agreement,
        **({"head_decisions": heads_out} if heads_out is not None else {}),
        "timing_s": t.seconds,
        "_clean": clean,  # dropped before writing JSON
    }


def prompt_rows(lm: LensModel, trip: list, clean: Prompts, corruption: Any, ko: Any, corrupted_lp: Any) -> list[dict[str, Any]]:
    """Per prompt: its text, tail, corrupted version and donor, and the tail log-probs."""
    return [
        {
            "text": tr.text,
            "prefix": tr.prefix,
            "tail": tr.tail_str,
            "tail_token": lm.tokenizer.decode([int(clean.target[i])]),
            "corrupted": corruption.prompts.triplets[i].text if corruption else None,
            "donor": corruption.donors[i] if corruption else None,
            "logprob_original": float(ko.original_logprob[i]),
            "logprob_remaining": float(ko.remaining_logprob[i]),
            "logprob_corrupted": None if corrupted_lp is None else float(corrupted_lp[i]),
        }
        for i, tr in enumerate(trip)
    ]


def head_swap_corruption(lm: LensModel, clean: Prompts, prepend_bos: bool, seed: int, log: Callable[[str], None]):
    """(the head-swap corruption, the prompts it aligns, the corrupted prompts' tail log-probs)."""
    corruption = head_swap(clean, lm.tokenizer, prepend_bos=prepend_bos, seed=seed)
    corruption.prompts.tokens = corruption.prompts.tokens.to(lm.device)
    if corruption.fallback:
        log(f"  {len(corruption.fallback)} of {len(clean)} prompts have no length-aligned head swap; left out of patching")
    with torch.no_grad():
        corrupted_lp = tail_logprob(lm(corruption.prompts.tokens), clean).cpu().numpy()
    return corruption, corruption.valid, corrupted_lp


def agreements(st: dict[str, Any], per_prompt: dict[str, np.ndarray], n_prompts: int, n_bootstrap: int, seed: int):
    """(agreement of every pair of methods per unit scope, each method's unit summary, the per-head
    decisions at head granularity or None), with bootstrap intervals over prompts."""
    by_head = "head_prob" in st  # head granularity: compare the per-head decisions one to one
    pairs = PAIRS + HEAD_PAIRS if by_head else PAIRS
    if by_head:
        per_prompt["mask"] = agr.flatten_units(np.nan_to_num(st["head_prob"]), np.nan_to_num(st["mlp_prob"]))
    boot = bootstrap_indices(n_prompts, n_bootstrap, seed)
    agreement = {
        scope: {f"{a} vs {b}": agr.compare_scores(per_prompt[a], per_prompt[b], units, boot) for a, b in pairs}
        for scope, units in _units_scope(st).items()
    }
    summaries = {m: agr.unit_summary(per_prompt[m], boot) for m in METHODS if m != "density"}
    return agreement, summaries, head_decisions(st, per_prompt, boot) if by_head else None


def head_decisions(st: dict[str, Any], per_prompt: dict[str, np.ndarray], boot: np.ndarray) -> dict[str, Any]:
    """Head granularity, one to one: for every head of the masked layers, the subnetwork's decision
    and mask probability beside each method's mean effect; and per method, how well its |effect|
    singles out the heads in the subnetwork (AUROC, precision@k; :func:`agreement.decision_agreement`)."""
    L, H = st["head"].shape
    masked = np.isfinite(st["head_prob"]).ravel()
    idx = np.flatnonzero(masked)
    inside = st["head"].ravel()[idx] > 0.5
    methods = ("knockout", "patching", "attribution", "dla")
    heads = [
        {
            "head": f"L{i // H}H{i % H}",
            "in_subnetwork": bool(inside[j]),
            "mask_prob": float(st["head_prob"].ravel()[i]),
            **{m: float(np.nanmean(per_prompt[m][:, i])) if np.isfinite(per_prompt[m][:, i]).any() else None for m in methods},
        }
        for j, i in enumerate(idx)
    ]
    return {
        "in_subnetwork": list(st["head_decisions"]),
        "heads": heads,
        "agreement": {m: agr.decision_agreement(inside, per_prompt[m][:, idx], boot) for m in methods},
    }


# ------------------------------------------------------------------------------------------
# Orchestrator
# ------------------------------------------------------------------------------------------
def compare_circuits(
    run_dir: str | Path,
    config: CompareConfig | None = None,
    *,
    out: str | Path | None = None,
    overrides: ModelOverrides | None = None,
    lens_model: LensModel | None = None,
    log: Callable[[str], None] = print,
    **options: Any,
) -> dict[str, Any]:
    """Compare a run's subnetwork with patching, attribution and knock-out; write the report.

    ``options``: :class:`~kcs_lens.analyses.config.CompareConfig` fields (or pass ``config``).
    Returns the content of ``comparison.json`` (plus ``files``: the paths written). ``out``
    defaults to ``RUN/compare-<kg>``. ``threads`` unset: 1 torch thread for small models
    (d_model <= 256), whose many tiny matmuls run several times slower multi-threaded on a busy
    machine (restored afterwards).
    """
    from kcs_lens.analyses.report import write_report

    if config is not None and options:
        raise ConfigError("pass either a CompareConfig or keyword options, not both")
    c = (config or build(CompareConfig, options)).validate()
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    info = load_run(run_dir)
    lm = load_run_model(info, overrides, lens_model=lens_model)
    out_dir = Path(out) if out else run_dir / f"compare-{kg_key(c.kg)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = kg_sets(info, lm, c.kg, log)
    if not c.control:
        sets = dict(list(sets.items())[:1])
    st = structure(info.subnetwork)
    n_threads = c.threads or (1 if lm.shape.d_model <= 256 else None)
    timing = {"load": time.perf_counter() - t_start}
    with torch_threads(n_threads):
        results, heads = analyse_sets(lm, info, sets, st, c, timing, log)
    data = comparison(info, lm, c, st, results, heads, n_threads)
    t0 = time.perf_counter()
    data["files"] = write_figures(data, out_dir)
    data["files"]["report"] = str(write_report(data, out_dir / "report.html"))
    data["files"]["comparison"] = str(out_dir / "comparison.json")
    timing["figures_and_report"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    data["timing_s"] = timing
    atomic_write_bytes(out_dir / "comparison.json", (json.dumps(to_jsonable(data), indent=1, allow_nan=False) + "\n").encode())
    return data


def analyse_sets(
    lm: LensModel,
    info: RunInfo,
    sets: dict[str, TripletSet],
    st: dict[str, Any],
    c: CompareConfig,
    timing: dict[str, float],
    log: Callable[[str], None],
) -> tuple[dict[str, dict[str, Any]], list[tuple[int, int]]]:
    """:func:`analyse_set` on every prompt set, then the views (attention of the primary set's top
    heads, token log-probs); returns the results and the top heads."""
    results: dict[str, dict[str, Any]] = {}
    for name, ts in sets.items():
        log(f"{name}: {min(len(ts), c.max_prompts or len(ts))} prompts ({ts.name})")
        results[name] = analyse_set(
            lm,
            info.subnetwork,
            ts,
            st,
            corrupt=c.corrupt,
            prepend_bos=info.config.prepend_bos,
            n_bootstrap=c.n_bootstrap,
            seed=c.seed,
            max_prompts=c.max_prompts or None,
            log=log,
        )
    primary = next(iter(results))
    t0 = time.perf_counter()
    heads = top_heads(results[primary], st, c.top_heads)
    for name, res in results.items():
        n_att = c.attention_prompts if name == primary else 0
        res["attention_views"], res["token_views"] = views(lm, info.subnetwork, res.pop("_clean"), heads, n_att, c.token_prompts)
        if n_att and not res["attention_views"]:
            log(f"{lm.backend} backend: {lm.model_type} attention records no hook_pattern here; no attention views")
    timing["views"] = time.perf_counter() - t0
    return results, heads


def comparison(
    info: RunInfo,
    lm: LensModel,
    c: CompareConfig,
    st: dict[str, Any],
    results: dict[str, dict[str, Any]],
    heads: list[tuple[int, int]],
    n_threads: int | None,
) -> dict[str, Any]:
    """The content of ``comparison.json`` (before the files and timings)."""
    L, H = lm.shape.n_layers, lm.shape.n_heads
    return {
        "run_dir": str(info.dir),
        "model_spec": info.config.model,
        "backend": lm.backend,
        "model_shape": {"n_layers": L, "n_heads": H, "d_model": lm.shape.d_model, "d_mlp": lm.shape.d_mlp},
        "target_kg": info.config.target_kg,
        "primary": next(iter(results)),
        "settings": {
            **c.to_dict(),
            "max_prompts": c.max_prompts or None,
            "top_k_heads": c.top_heads,
            "prepend_bos": info.config.prepend_bos,
            "torch_threads": n_threads or torch.get_num_threads(),
            "scores_compared_by": "magnitude |effect|",
            "effect_sign": "original/clean tail log-prob minus intervened (positive = supports the tail)",
            "tail_logprob": "log-prob of the first tail token at the last prefix position",
        },
        "units": agr.unit_names(L, H),
        "structure": st,
        "top_heads": [f"L{l}H{h}" for l, h in heads],
        "sets": results,
    }


def to_jsonable(x: Any) -> Any:
    """Tensors and arrays to lists, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
