"""kcs_lens.analyses: patching, attribution, knock-out, agreement and compare-circuits end to end.

Run directories are written by hand (random subnetwork of the tiny model) so no discovery run is
needed; every model-level test runs on each TransformerLens backend the environment provides
(4.x: bridge; 3.9: bridge and hooked).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run_kwargs

from kcs_lens.model.loading import available_backends

BACKENDS = available_backends()


def make_run_dir(path: Path, lm, cfg_kwargs: dict, *, density: float = 0.1, granularity: str = "weight", seed: int = 0) -> Path:
    """config.json + subnetwork.safetensors of a random subnetwork (``density`` of the logits) for
    the discovery config ``cfg_kwargs`` (e.g. ``tiny_run_kwargs(...)``; ``{}`` = the bundled model)."""
    from kcs_lens.discovery.config import build_config
    from kcs_lens.masks.granularity import mask_shape, param_shape
    from kcs_lens.masks.mask_config import MaskConfig, param_names_of, resolve_layers
    from kcs_lens.masks.subnetwork import Subnetwork

    cfg = build_config(**{**cfg_kwargs, "granularity": granularity, "seed": seed})
    mc = MaskConfig(resolve_layers(cfg.layers, lm.shape.n_layers), tuple(cfg.matrices), granularity)
    g = torch.Generator().manual_seed(seed)
    logits = {
        n: torch.where(torch.rand(mask_shape(lm.shape, n.split(".")[-1], granularity), generator=g) < density, 2.0, -2.0)
        for n in mc.model_names(lm.shape)
    }
    meta = {"model_spec": cfg.model, "model_fingerprint": lm.fingerprint()}
    if mc.granularity == "head":  # one logit per head / neuron; the matrices follow
        units = {
            n: torch.where(torch.rand(param_shape(lm.shape, n, "head"), generator=g) < density, 2.0, -2.0)
            for n in param_names_of(mc, mc.model_names(lm.shape))
        }
        sub = Subnetwork({}, mc, lm.shape, meta, units=units)
    else:
        sub = Subnetwork(logits, mc, lm.shape, meta)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps({"config": cfg.to_dict(), "model_fingerprint": lm.fingerprint(), "mask": mc.to_dict()})
    )
    sub.save(path / "subnetwork.safetensors")
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models' many small matmuls run several times faster on one thread (shared CI cores)."""
    from kcs_lens.analyses.compare import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_kg, tiny_model_dir):
    from kcs_lens.model.loading import load_model

    lm = load_model(str(tiny_model_dir))
    return make_run_dir(tmp_path_factory.mktemp("cc") / "run", lm, tiny_run_kwargs(tiny_kg, tiny_model_dir))


def _prompts(lm, tiny_kg):
    from kcs_lens.analyses.prompts import build_prompts
    from kcs_lens.data.loaders import load_kg

    return build_prompts(list(load_kg(str(tiny_kg["target"]))), lm.tokenizer)


# ------------------------------------------------------------------------------------------
# Patching and attribution
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_patching_with_own_clean_activation_is_zero(make_tiny_lm, tiny_kg, backend):
    from kcs_lens.analyses.attribution import attribution_patching
    from kcs_lens.analyses.patching import activation_patching, hook_names, run_cache

    lm = make_tiny_lm(backend)
    clean = _prompts(lm, tiny_kg)
    _, acts = run_cache(lm, clean, hook_names(lm.shape.n_layers))
    res = activation_patching(lm, clean, acts)
    assert res.heads.shape == (len(clean), 4, 4) and res.mlp.shape == (len(clean), 4)
    assert np.abs(res.heads).max() < 1e-5 and np.abs(res.mlp).max() < 1e-5
    attr = attribution_patching(lm, clean, acts)
    assert np.abs(attr.heads).max() == 0 and np.abs(attr.mlp).max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_patching_matches_a_manual_hook(make_tiny_lm, tiny_kg, backend):
    """Per-prompt values recorded from TL's patching loop land on the right (layer, head)."""
    from kcs_lens.analyses.patching import activation_patching, replacement_acts
    from kcs_lens.analyses.prompts import tail_logprob

    lm = make_tiny_lm(backend)
    clean = _prompts(lm, tiny_kg)
    acts = replacement_acts(lm, clean, "zero")
    res = activation_patching(lm, clean, acts)
    for l, h in [(0, 3), (2, 1)]:

        def hook(z, hook, h=h):
            z = z.clone()
            z[:, :, h] = 0
            return z

        with torch.no_grad():
            base = tail_logprob(lm.model(clean.tokens), clean)
            patched = tail_logprob(lm.model.run_with_hooks(clean.tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)]), clean)
        np.testing.assert_allclose(res.heads[:, l, h], (base - patched).numpy(), atol=1e-5)
    with torch.no_grad():
        patched = tail_logprob(
            lm.model.run_with_hooks(clean.tokens, fwd_hooks=[("blocks.1.hook_mlp_out", lambda a, hook: torch.zeros_like(a))]),
            clean,
        )
    np.testing.assert_allclose(res.mlp[:, 1], (base - patched).numpy(), atol=1e-5)
    assert np.abs(res.heads).max() > 1e-3  # zero ablation does something on a random model


@pytest.mark.parametrize("backend", BACKENDS)
def test_attribution_patching_approximates_small_patches(make_tiny_lm, tiny_kg, backend):
    """For a tiny activation change, gradient x difference equals the patching effect."""
    from kcs_lens.analyses.attribution import attribution_patching
    from kcs_lens.analyses.patching import activation_patching, hook_names, run_cache

    lm = make_tiny_lm(backend)
    clean = _prompts(lm, tiny_kg)
    _, acts = run_cache(lm, clean, hook_names(lm.shape.n_layers))
    g = torch.Generator().manual_seed(0)
    eps = {n: a + 1e-3 * torch.randn(a.shape, generator=g) for n, a in acts.items()}
    exact = activation_patching(lm, clean, eps)
    est = attribution_patching(lm, clean, eps)
    np.testing.assert_allclose(est.heads, exact.heads, atol=2e-4, rtol=0.05)
    np.testing.assert_allclose(est.mlp, exact.mlp, atol=2e-4, rtol=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dla_components_sum_to_the_logit_difference(make_tiny_lm, tiny_kg, backend):
    from kcs_lens.analyses.attribution import direct_logit_attribution, dla_projector
    from kcs_lens.analyses.patching import run_cache

    lm = make_tiny_lm(backend)
    p = _prompts(lm, tiny_kg)
    dla = direct_logit_attribution(lm, p)
    L = lm.shape.n_layers
    names = ["hook_embed", "hook_pos_embed", f"blocks.{L - 1}.hook_resid_post"]
    logits, cache = run_cache(lm, p, names)
    rows = torch.arange(len(p))
    project = dla_projector(lm, p, cache[names[2]][rows, p.pos])
    sd = lm.hf_state_dict()
    rest = project(cache["hook_embed"][rows, p.pos] + cache["hook_pos_embed"][rows, p.pos])
    for l in range(L):  # attention output biases are not attributed to any head
        rest += project(sd[f"transformer.h.{l}.attn.c_proj.bias"].expand(len(p), -1))
    W_U = sd["lm_head.weight"].T
    direction = W_U[:, p.target].T - W_U.mean(1)[None]
    rest += (sd["transformer.ln_f.bias"][None] * direction).sum(-1)
    total = dla.heads.sum((1, 2)) + dla.mlp.sum(1) + rest.double().numpy()
    lg = logits[rows, p.pos]
    want = (lg[rows, p.target] - lg.mean(-1)).double().numpy()
    np.testing.assert_allclose(total, want, atol=1e-3, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# Knock-out and structure
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["weight", "row"])
def test_knockout_localises_a_one_head_subnetwork(make_tiny_lm, tiny_kg, granularity):
    from kcs_lens.analyses.knockout import knockout
    from kcs_lens.analyses.structure import structure
    from kcs_lens.masks.mask import WeightMask
    from kcs_lens.masks.mask_config import MaskConfig
    from kcs_lens.masks.subnetwork import Subnetwork

    lm = make_tiny_lm()
    p = _prompts(lm, tiny_kg)
    mc = MaskConfig((2, 3), granularity=granularity)
    sub = Subnetwork.from_mask(WeightMask(lm.shape, mc), lm)
    binary = {n: torch.zeros_like(b) for n, b in sub.binary().items()}
    if granularity == "weight":
        for m in ("W_Q", "W_O"):
            binary[f"blocks.3.attn.{m}"][1, :5] = True  # only head 1 of layer 3
    else:
        binary["blocks.3.attn.W_O"][1, :5] = True  # W_O neuron logits are per head and d_head row
    one = sub.with_binary(binary)
    ko = knockout(lm, one, p)
    assert np.isnan(ko.heads[:, :2]).all() and np.isnan(ko.mlp[:, :2]).all()  # unmasked layers
    others = np.delete(ko.heads[:, 2:].reshape(len(p), -1), 4 + 1, axis=1)
    assert np.abs(others).max() == 0 and np.abs(ko.mlp[:, 2:]).max() == 0
    full_effect = ko.original_logprob - ko.remaining_logprob
    np.testing.assert_allclose(ko.heads[:, 3, 1], full_effect, atol=1e-5)
    assert np.abs(full_effect).max() > 1e-4
    st = structure(one)
    assert st["head"][3, 1] > 0 and np.nansum(st["head"]) == pytest.approx(st["head"][3, 1])
    assert np.isnan(st["head"][0]).all() and st["mlp"][2] == 0


def test_structure_counts_weights(make_tiny_lm):
    from kcs_lens.analyses.structure import structure
    from kcs_lens.masks.mask import WeightMask
    from kcs_lens.masks.mask_config import MaskConfig
    from kcs_lens.masks.subnetwork import Subnetwork

    lm = make_tiny_lm()
    sub = Subnetwork.from_mask(WeightMask(lm.shape, MaskConfig((1,), matrices=("W_K", "W_in"))), lm)
    b = {n: torch.zeros_like(v) for n, v in sub.binary().items()}
    b["blocks.1.attn.W_K"][2] = True  # all of head 2's W_K
    b["blocks.1.mlp.W_in"][:, 7] = True  # neuron 7's input column
    st = structure(sub.with_binary(b))
    assert st["head_by_matrix"]["W_K"][1, 2] == 1.0 and np.isnan(st["head_by_matrix"]["W_Q"][1, 2])
    assert st["head"][1, 2] == 1.0 and st["head"][1, 0] == 0.0
    assert st["mlp"][1] == pytest.approx(1 / lm.shape.d_mlp)
    assert st["mlp_neuron"]["1"][7] == 1.0 and sum(st["mlp_neuron"]["1"]) == 1.0


# ------------------------------------------------------------------------------------------
# Agreement statistics
# ------------------------------------------------------------------------------------------
def test_correlation_of_a_score_vector_with_itself_is_one():
    from kcs_lens.analyses.agreement import compare_scores, rank_agreement
    from kcs_lens.stats import bootstrap_indices

    x = np.random.default_rng(0).normal(size=(9, 20))
    r = rank_agreement(x.mean(0), x.mean(0))
    assert r == {"spearman": 1.0, "kendall": 1.0, "jaccard@5": 1.0, "jaccard@10": 1.0}
    out = compare_scores(x, x, np.ones(20, bool), bootstrap_indices(9, 50, 0))
    for k in ("spearman", "kendall", "jaccard@5", "jaccard@10"):
        assert out[k]["value"] == pytest.approx(1.0) and out[k]["ci95"] == pytest.approx([1.0, 1.0])


def test_rank_statistics_match_scipy():
    from scipy import stats

    from kcs_lens.analyses.agreement import jaccard_topk, kendall, rank_agreement, spearman

    rng = np.random.default_rng(1)
    for _ in range(20):
        a = rng.integers(0, 4, size=15).astype(float)  # ties
        b = rng.normal(size=15)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
        assert kendall(a, b) == pytest.approx(stats.kendalltau(a, b).statistic)
    assert jaccard_topk(np.arange(12.0), np.arange(12.0)[::-1], 5) == 0.0
    assert jaccard_topk(np.arange(6.0), np.arange(6.0), 10) is None  # k >= units: trivial
    assert rank_agreement(np.zeros(8), np.arange(8.0))["spearman"] is None  # constant: undefined
    assert rank_agreement(-np.arange(8.0), np.arange(8.0))["spearman"] == 1.0  # magnitudes


# ------------------------------------------------------------------------------------------
# Prompts and corruption
# ------------------------------------------------------------------------------------------
def test_head_swap_is_aligned_and_records_fallbacks(tiny_tokenizer):
    from kcs_lens.analyses.prompts import build_prompts, head_swap, swap_head
    from kcs_lens.data.triplets import Triplet

    t = Triplet("apple", "IsA", "fruit", "An apple is a fruit")
    assert swap_head(t, "car").text == "A car is a fruit"
    trip = [Triplet(h, "IsA", tl, f"A {h} is a {tl}") for h, tl in [("cat", "animal"), ("car", "vehicle"), ("tree", "plant")]]
    trip.append(Triplet("house", "IsA", "building", "A house is a very long building"))
    clean = build_prompts(trip, tiny_tokenizer)
    c = head_swap(clean, tiny_tokenizer, seed=0)
    assert torch.equal(c.prompts.pos, clean.pos) and c.prompts.tokens.shape == clean.tokens.shape
    for i, d in enumerate(c.donors):
        if d is None:
            assert i in c.fallback and c.prompts.triplets[i] == trip[i]
        else:
            assert d != trip[i].head and c.prompts.triplets[i].tail == trip[i].tail
    assert 3 in c.fallback  # no other prefix has its length
    assert torch.equal(c.prompts.target, clean.target)


# ------------------------------------------------------------------------------------------
# compare_circuits end to end, and the CLI
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_compare_circuits_end_to_end(run_dir, tmp_path, backend):
    from kcs_lens.analyses.compare import compare_circuits
    from kcs_lens.discovery.run_model import ModelOverrides

    out = tmp_path / "cmp"
    data = compare_circuits(run_dir, out=out, overrides=ModelOverrides(backend=backend), n_bootstrap=40, log=lambda m: None)
    saved = json.loads((out / "comparison.json").read_text())  # strict JSON (no NaN)
    assert saved["backend"] == backend and set(saved["sets"]) == {"target", "control"}
    tgt = saved["sets"]["target"]
    assert len(tgt["per_prompt"]["patching"]["heads"]) == tgt["n_prompts"] == 6
    agree = tgt["agreement"]["masked_layers"]
    assert set(agree) >= {"density vs patching", "knockout vs attribution", "knockout vs dla"}
    assert agree["density vs patching"]["n_units"] == 10  # layers 2-3: 8 heads + 2 MLPs
    assert tgt["agreement"]["all_units"]["density vs patching"]["jaccard@10"]["value"] is not None
    assert saved["structure"]["head_by_matrix"]["W_Q"][0][0] is None  # layer 0 is not masked
    for m in ("density", "knockout", "patching", "attribution", "dla"):
        assert (out / f"heatmap_target_{m}.png").stat().st_size > 1000
    assert (out / "heatmaps_control.png").exists()
    assert tgt["attention_views"] and len(tgt["attention_views"][0]["original"]) == 3
    html = (out / "report.html").read_text()
    assert html.count("CircuitsVis.render(") >= 4 and html.count("var CircuitsVis=") == 1
    assert data["files"]["report"] == str(out / "report.html")


def test_backends_agree_on_the_numbers(run_dir, tmp_path):
    if len(BACKENDS) < 2:
        pytest.skip("only one TransformerLens backend installed (HookedTransformer needs transformer-lens 3.x)")
    from kcs_lens.analyses.compare import compare_circuits
    from kcs_lens.discovery.run_model import ModelOverrides

    res = {
        b: compare_circuits(
            run_dir, out=tmp_path / b, overrides=ModelOverrides(backend=b), n_bootstrap=10, control=False, log=lambda m: None
        )
        for b in BACKENDS
    }
    a, b = (res[x]["sets"]["target"]["unit_mean"] for x in BACKENDS)
    for m in ("knockout", "patching", "attribution", "dla"):
        np.testing.assert_allclose(np.nan_to_num(a[m]["heads"]), np.nan_to_num(b[m]["heads"]), atol=1e-4)


def test_cli_compare_circuits(run_dir, tmp_path):
    from typer.testing import CliRunner

    from kcs_lens.cli.main import app

    r = CliRunner().invoke(
        app,
        [
            "compare-circuits",
            str(run_dir),
            "--out",
            str(tmp_path / "o"),
            "--corrupt",
            "mean",
            "--n-bootstrap",
            "20",
            "--no-control",
        ],
        env={"COLUMNS": "200"},  # wide enough that no label wraps (at 80 columns labels wrap at spaces)
    )
    assert r.exit_code == 0, r.output
    assert "density vs patching" in r.output and (tmp_path / "o" / "report.html").exists()
    bad = CliRunner().invoke(app, ["compare-circuits", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "no such run directory" in bad.output
    bad = CliRunner().invoke(app, ["compare-circuits", str(run_dir), "--corrupt", "blur", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--corrupt" in bad.output
