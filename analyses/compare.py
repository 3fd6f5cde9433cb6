"""``compare_circuits``: a knowledge-critical subnetwork against activation patching, attribution
and knock-out localisation, on the TargetKG prompts and, as a specificity check, the ControlKG.

Reading order: :func:`compare_circuits` loads the run (model, subnetwork, prompts), then for each
prompt set :func:`analyse_set` runs the lenses, each in its own module:

1. :mod:`.structure`  density per layer / head (Q, K, V, O, combined) / MLP layer / neuron
2. :mod:`.patching`   activation patching (TL ``patching``), head-swap / zero / mean corruption
3. :mod:`.attribution` attribution patching and direct logit attribution
4. :mod:`.knockout`   the subnetwork removed inside one head or MLP layer at a time
5. :mod:`.agreement`  rank correlations and top-k overlap, bootstrap CIs over prompts

and writes ``comparison.json`` (every number), PNG heatmaps, and ``report.html``
(:mod:`.report`, offline, circuitsvis inlined once). Every effect is "original/clean tail
log-prob minus intervened": positive = the component supports the tail.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kcs_lens.analyses import agreement as agr
from kcs_lens.analyses.attribution import attribution_patching, direct_logit_attribution
from kcs_lens.analyses.figures import heatmap_png, heatmap_row_png, structure_png, unit_grid
from kcs_lens.analyses.knockout import knockout
from kcs_lens.analyses.patching import (
    CORRUPT_MODES,
    activation_patching,
    hook_names,
    replacement_acts,
    run_cache,
)
from kcs_lens.analyses.prompts import Prompts, build_prompts, head_swap, tail_logprob
from kcs_lens.analyses.structure import structure, unit_density
from kcs_lens.data.triplets import TripletSet
from kcs_lens.discovery.rundir import RunInfo, load_run, load_run_data
from kcs_lens.errors import ConfigError
from kcs_lens.evaluation.evaluate import check_model
from kcs_lens.files import atomic_write_bytes
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.backends import LensModel
from kcs_lens.model.loading import load_model
from kcs_lens.threads import torch_threads

METHODS = ("density", "knockout", "patching", "attribution", "dla")
METHOD_TITLES = {
    "density": "subnetwork density",
    "knockout": "knock-out (logp drop)",
    "patching": "activation patching (logp drop)",
    "attribution": "attribution patching (est. logp drop)",
    "dla": "direct logit attribution",
}
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


def kg_sets(info: RunInfo, lm: LensModel, kg: str, log: Callable[[str], None]) -> dict[str, TripletSet]:
    """The primary prompt set (``target``, ``control`` or any KG spec) and the run's ControlKG
    validation set (disjoint from the TargetKG) for the specificity check, verbalized as the run's
    data was (its ``templates`` included)."""
    from kcs_lens.data.loaders import load_kg

    data = load_run_data(info.config, lm, log, text=False)
    if kg == "target":
        return {"target": data.target, "control": data.control_val}
    if kg == "control":
        return {"control": data.control_val}
    return {kg_key(kg): load_kg(kg, model_name=lm.spec, templates=info.config.templates), "control": data.control_val}


def kg_key(kg: str) -> str:
    """A file-name-safe key for a prompt set given by spec (``building-paraphrases``, a path...)."""
    if kg in ("target", "control"):
        return kg
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(kg).stem if os.sep in kg else kg).strip("_") or "kg"


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
    corruption, valid, corrupted_lp = None, None, None
    with t("corrupt"):
        if corrupt == "swap":
            corruption = head_swap(clean, lm.tokenizer, prepend_bos=prepend_bos, seed=seed)
            corruption.prompts.tokens = corruption.prompts.tokens.to(lm.device)
            valid = corruption.valid
            if corruption.fallback:
                log(
                    f"  {len(corruption.fallback)} of {len(clean)} prompts have no length-aligned head swap; left out of patching"
                )
            with torch.no_grad():
                corrupted_lp = tail_logprob(lm(corruption.prompts.tokens), clean).cpu().numpy()
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
        "patching": agr.flatten_units(patch.heads, patch.mlp),
        "attribution": agr.flatten_units(attr.heads, attr.mlp),
        "dla": agr.flatten_units(dla.heads, dla.mlp),
    }
    by_head = "head_prob" in st  # head granularity: compare the per-head decisions one to one
    pairs = PAIRS + HEAD_PAIRS if by_head else PAIRS
    if by_head:
        per_prompt["mask"] = agr.flatten_units(np.nan_to_num(st["head_prob"]), np.nan_to_num(st["mlp_prob"]))
    with t("agreement"):
        boot = agr.bootstrap_indices(len(clean), n_bootstrap, seed)
        agreement = {
            scope: {f"{a} vs {b}": agr.compare_scores(per_prompt[a], per_prompt[b], units, boot) for a, b in pairs}
            for scope, units in _units_scope(st).items()
        }
        summaries = {m: agr.unit_summary(per_prompt[m], boot) for m in METHODS if m != "density"}
        heads_out = head_decisions(st, per_prompt, boot) if by_head else None

    L, H = lm.shape.n_layers, lm.shape.n_heads
    prompts_out = []
    for i, tr in enumerate(trip):
        prompts_out.append(
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
        )
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
            "patching": {"heads": patch.heads, "mlp": patch.mlp},
            "attribution": {"heads": attr.heads, "mlp": attr.mlp},
            "dla": {"heads": dla.heads, "mlp": dla.mlp},
            "knockout": {"heads": ko.heads, "mlp": ko.mlp},
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
# Views: attention patterns of the top heads and per-token log-prob changes
# ------------------------------------------------------------------------------------------
def top_heads(res: dict[str, Any], st: dict[str, Any], k: int) -> list[tuple[int, int]]:
    """The ``k`` heads of the masked layers that the methods rank highest: per method, each head's
    mean |effect| as a share of that method's largest; the heads with the largest mean share over
    knock-out, patching, attribution and DLA (density breaks ties). Heads outside the masked layers
    cannot hold the subnetwork (their original and remaining attention are the same) and are not shown."""
    masked = np.isfinite(st["head"])
    score = np.zeros(masked.shape)
    for m in ("knockout", "patching", "attribution", "dla"):
        eff = np.where(masked, np.nan_to_num(np.abs(np.asarray(res["unit_mean"][m]["heads"], float)), nan=0.0), 0.0)
        top = eff.max()
        if top > 0:
            score += eff / top
    score += 1e-9 * np.nan_to_num(st["head"], nan=0.0)
    score[~masked] = -np.inf
    order = [i for i in np.argsort(-score.ravel(), kind="stable") if masked.ravel()[i]][:k]
    H = score.shape[1]
    return [(int(i) // H, int(i) % H) for i in order]


@torch.no_grad()
def views(lm: LensModel, sub: Subnetwork, clean: Prompts, heads: list[tuple[int, int]], n_attention: int, n_tokens: int):
    """Attention patterns (original vs remaining model) of ``heads`` on the first prompts, and the
    per-token log-prob change (remaining - original) of every prompt token. Where the backend has
    no attention-pattern hook (TransformerLens 3.9's bridge for OPT and GPT-J), no attention views."""
    names = sorted({f"blocks.{l}.attn.hook_pattern" for l, _ in heads})
    n = max(n_attention, n_tokens)
    sel = clean.tokens[:n]

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, cache = lm.model.run_with_cache(sel, names_filter=lambda x: x in names)
        return torch.log_softmax(logits.float(), -1), {k: cache[k] for k in names if k in cache}

    lp_o, pat_o = run()
    with sub.applied(lm, strict_fingerprint=False):
        lp_r, pat_r = run()
    if len(pat_o) < len(names):  # the hook exists but this attention never calls it
        n_attention = 0
    attention, tokens = [], []
    for i in range(min(n, len(clean))):
        n_tok = int(clean.lengths[i])
        toks = clean.str_tokens(lm.tokenizer, i)
        nxt = clean.tokens[i, 1:n_tok]
        delta = (lp_r[i, : n_tok - 1].gather(-1, nxt[:, None]) - lp_o[i, : n_tok - 1].gather(-1, nxt[:, None]))[:, 0]
        if i < n_tokens:
            tokens.append(
                {"prompt": i, "tokens": toks, "delta_logprob": [0.0] + delta.cpu().tolist(), "tail_from": int(clean.pos[i]) + 1}
            )
        if i < n_attention:
            grab = lambda pat, i=i, n_tok=n_tok: [
                pat[f"blocks.{l}.attn.hook_pattern"][i, h, :n_tok, :n_tok].cpu().tolist() for l, h in heads
            ]
            attention.append(
                {
                    "prompt": i,
                    "tokens": toks,
                    "heads": [f"L{l}H{h}" for l, h in heads],
                    "original": grab(pat_o),
                    "remaining": grab(pat_r),
                }
            )
    return attention, tokens


# ------------------------------------------------------------------------------------------
# Orchestrator
# ------------------------------------------------------------------------------------------
def compare_circuits(
    run_dir: str | Path,
    kg: str = "target",
    out: str | Path | None = None,
    *,
    corrupt: str = "swap",
    n_bootstrap: int = 200,
    seed: int = 0,
    max_prompts: int | None = 64,
    top_k_heads: int = 3,
    attention_prompts: int = 2,
    token_prompts: int = 8,
    backend: str | None = None,
    lens_model: LensModel | None = None,
    device: str | None = None,
    control: bool = True,
    threads: int | str | None = "auto",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compare a run's subnetwork with patching, attribution and knock-out; write the report.

    Returns the content of ``comparison.json`` (plus ``files``: the paths written). ``out``
    defaults to ``RUN/compare-<kg>``; ``kg``: ``target``, ``control`` or any KG spec;
    ``max_prompts``: the first N prompts of each set. ``threads``: torch CPU threads during the
    analysis (restored afterwards); ``"auto"`` uses 1 for small models (d_model <= 256), whose
    many tiny matmuls run several times slower multi-threaded on a busy machine; None leaves it.
    """
    from kcs_lens.analyses.report import write_report

    if corrupt not in CORRUPT_MODES:
        raise ConfigError(f"--corrupt {corrupt!r}: expected one of {', '.join(CORRUPT_MODES)}")
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    info = load_run(run_dir)
    cfg, sub = info.config, info.subnetwork
    lm = lens_model or load_model(cfg.model, backend=backend or cfg.backend, device=device or cfg.device)
    check_model(info, lm)
    out_dir = Path(out) if out else run_dir / f"compare-{kg_key(kg)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = kg_sets(info, lm, kg, log)
    if not control:
        sets = dict(list(sets.items())[:1])
    st = structure(sub)
    prepend_bos = cfg.prepend_bos
    n_threads = (1 if lm.shape.d_model <= 256 else None) if threads == "auto" else threads
    timing = {"load": time.perf_counter() - t_start}

    results: dict[str, dict[str, Any]] = {}
    with torch_threads(n_threads):  # type: ignore[arg-type]
        for name, ts in sets.items():
            log(f"{name}: {min(len(ts), max_prompts or len(ts))} prompts ({ts.name})")
            results[name] = analyse_set(
                lm,
                sub,
                ts,
                st,
                corrupt=corrupt,
                prepend_bos=prepend_bos,
                n_bootstrap=n_bootstrap,
                seed=seed,
                max_prompts=max_prompts,
                log=log,
            )
        primary = next(iter(results))
        t0 = time.perf_counter()
        heads = top_heads(results[primary], st, top_k_heads)
        for name, res in results.items():
            n_att = attention_prompts if name == primary else 0
            res["attention_views"], res["token_views"] = views(lm, sub, res.pop("_clean"), heads, n_att, token_prompts)
            if n_att and not res["attention_views"]:
                log(f"{lm.backend} backend: {lm.model_type} attention records no hook_pattern here; no attention views")
        timing["views"] = time.perf_counter() - t0

    L, H = lm.shape.n_layers, lm.shape.n_heads
    data: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model_spec": cfg.model,
        "backend": lm.backend,
        "model_shape": {"n_layers": L, "n_heads": H, "d_model": lm.shape.d_model, "d_mlp": lm.shape.d_mlp},
        "target_kg": cfg.target_kg,
        "primary": primary,
        "settings": {
            "kg": kg,
            "corrupt": corrupt,
            "n_bootstrap": n_bootstrap,
            "seed": seed,
            "max_prompts": max_prompts,
            "top_k_heads": top_k_heads,
            "attention_prompts": attention_prompts,
            "prepend_bos": prepend_bos,
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
    t0 = time.perf_counter()
    data["files"] = write_figures(data, out_dir)
    data["files"]["report"] = str(write_report(data, out_dir / "report.html"))
    data["files"]["comparison"] = str(out_dir / "comparison.json")
    timing["figures_and_report"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    data["timing_s"] = timing
    atomic_write_bytes(out_dir / "comparison.json", (json.dumps(to_jsonable(data), indent=1, allow_nan=False) + "\n").encode())
    return data


def write_figures(data: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """PNG heatmaps per prompt set: one per method and one row with all of them."""
    files: dict[str, Any] = {
        "heatmaps": {},
        "heatmap_rows": {},
        "structure": str(structure_png(data["structure"], out_dir / "structure.png")),
    }
    for name, res in data["sets"].items():
        grids = [unit_grid(res["unit_mean"][m]["heads"], res["unit_mean"][m]["mlp"]) for m in METHODS]
        signed = [m != "density" for m in METHODS]
        files["heatmaps"][name] = {}
        for m, g, s in zip(METHODS, grids, signed):
            p = heatmap_png(g, f"{name}: {METHOD_TITLES[m]}", out_dir / f"heatmap_{name}_{m}.png", signed=s)
            files["heatmaps"][name][m] = str(p)
        files["heatmap_rows"][name] = str(
            heatmap_row_png(
                grids,
                [METHOD_TITLES[m] for m in METHODS],
                signed,
                out_dir / f"heatmaps_{name}.png",
                suptitle=f"{name} prompts (n={res['n_prompts']}); last column: MLP layer",
            )
        )
    return files


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
