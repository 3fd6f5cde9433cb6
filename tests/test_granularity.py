"""Granularities (issue 12): ``head`` (one logit per attention head and per MLP neuron), ``row``
(formerly ``neuron``) and its deprecated alias.

Tensor-level tests use synthetic canonical shapes (grouped-query attention, gated MLP); model-level
tests use tiny random GPT-2s on every installed backend and zero weights by hand to compare.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import bundled_available

from kcs_lens.errors import SubnetworkError
from kcs_lens.masks.granularity import expand_unit, expand_unit_logits, kv_group, normalize_granularity, unit_name
from kcs_lens.masks.mask import WeightMask, gumbel_sigmoid_ste
from kcs_lens.masks.mask_config import MaskConfig
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.canonical import canonical_shape, weight_name
from kcs_lens.model.loading import available_backends

BACKENDS = available_backends()
pytest_plugins = ["_eval_fixtures"]


# ------------------------------------------------------------------------------------------
# Pure tensor functions (synthetic shapes: GQA and gated MLPs)
# ------------------------------------------------------------------------------------------
def test_gqa_kv_head_is_masked_only_when_all_its_query_heads_are():
    n_heads, n_kv = 8, 2  # query head h uses K/V head h // 4
    sub = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.float)
    assert kv_group(sub, n_kv, "subnetwork").tolist() == [1.0, 0.0]
    assert kv_group(1 - sub, n_kv, "remaining").tolist() == [0.0, 1.0]  # the remaining model keeps K/V head 1
    for h in range(n_heads):  # rule written per head
        one = torch.zeros(n_heads)
        one[h] = 1
        assert kv_group(one, n_kv, "subnetwork").sum() == 0  # one head alone never removes a shared K/V head
    assert torch.equal(kv_group(sub, n_heads, "subnetwork"), sub)  # no GQA: K/V heads are the query heads
    # the per-matrix logits obey the same rule: min over the group (> 0 iff all are)
    units = {unit_name(0, "heads"): torch.tensor([2.0, 1.0, 3.0, 0.5, 4.0, -1.0, 2.0, 2.0])}
    lg = expand_unit_logits(units, [weight_name(0, "W_K"), weight_name(0, "W_Q")], n_kv)
    assert lg["blocks.0.attn.W_K"].flatten().tolist() == [0.5, -1.0] and lg["blocks.0.attn.W_Q"].shape == (8, 1, 1)


def test_gqa_and_gated_expansion_equals_zeroing_slices_by_hand():
    """Canonical GQA / gated shapes: every matrix masked through expand_unit equals the slices
    zeroed one by one (query head h -> W_Q[h], W_O[h]; K/V head g -> W_K[g], W_V[g] only if all
    of its query heads are removed; neuron j -> W_in[:, j], W_gate[:, j], W_out[j])."""
    H, K, d_model, d_head, d_mlp = 6, 2, 5, 3, 7
    g = torch.Generator().manual_seed(0)
    W = {
        "W_Q": torch.randn(H, d_model, d_head, generator=g),
        "W_K": torch.randn(K, d_model, d_head, generator=g),  # TL's _W_K layout
        "W_V": torch.randn(K, d_model, d_head, generator=g),
        "W_O": torch.randn(H, d_head, d_model, generator=g),
        "W_in": torch.randn(d_model, d_mlp, generator=g),
        "W_gate": torch.randn(d_model, d_mlp, generator=g),
        "W_out": torch.randn(d_mlp, d_model, generator=g),
    }
    heads_in = [0, 1, 2, 4]  # K/V head 0 (heads 0-2) fully removed, K/V head 1 (3-5) not
    neurons_in = [1, 6]
    heads = torch.zeros(H)
    heads[heads_in] = 1
    neurons = torch.zeros(d_mlp)
    neurons[neurons_in] = 1
    by_hand = {m: w.clone() for m, w in W.items()}
    for h in heads_in:
        by_hand["W_Q"][h] = 0
        by_hand["W_O"][h] = 0
    by_hand["W_K"][0] = 0
    by_hand["W_V"][0] = 0
    for j in neurons_in:
        by_hand["W_in"][:, j] = 0
        by_hand["W_gate"][:, j] = 0
        by_hand["W_out"][j] = 0
    for m, w in W.items():
        unit = heads if m in ("W_Q", "W_K", "W_V", "W_O") else neurons
        remaining = expand_unit(1 - unit, m, K, "remaining")  # complement of the subnetwork
        assert torch.equal(w * remaining, by_hand[m]), m
        subnet = expand_unit(unit, m, K, "subnetwork")
        assert torch.equal(w * subnet + w * remaining, w), m  # a partition of the weights


def test_gqa_gradients_reach_every_query_head_of_a_group():
    H, K = 4, 2
    logits = torch.zeros(H, requires_grad=True)
    r = gumbel_sigmoid_ste(logits, 1.0, "remaining", torch.Generator().manual_seed(3))
    kv = expand_unit(r, "W_K", K, "remaining")
    (kv.sum() + expand_unit(r, "W_Q", K, "remaining").sum()).backward()
    assert logits.grad is not None and (logits.grad != 0).all()


# ------------------------------------------------------------------------------------------
# Head granularity on a model: gradients, exactness, density
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_one_logit_per_head_and_neuron(backend, make_tiny_lm):
    lm = make_tiny_lm(backend)
    s = lm.shape
    wm = WeightMask(s, MaskConfig((2, 3), granularity="head"), seed=0).attach(lm)
    assert wm.param_names == ["blocks.2.attn.heads", "blocks.2.mlp.neurons", "blocks.3.attn.heads", "blocks.3.mlp.neurons"]
    x = torch.randint(0, s.d_vocab, (2, 10))
    loss = lambda: lm(x).logsumexp(-1).mean()
    wm.mode = "sample"  # training: one sample per head / neuron, straight-through
    loss().backward()
    for n, p in wm.items():
        assert p.grad is not None and p.grad.shape == ((s.n_heads,) if n.endswith("heads") else (s.d_mlp,)), n
        assert p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in lm.model.parameters()), "the model is frozen"
    # where each head's gradient comes from: a sample that keeps every unit, the unit masks as
    # leaves, and the per-matrix masks derived from them
    units = {n: torch.ones_like(p, requires_grad=True) for n, p in wm.items()}
    with wm.using_sample(units, "remaining"):
        per_matrix = {n: m for n, m in wm._current.items()}
        for m in per_matrix.values():
            m.retain_grad()
        loss().backward()
    for l in (2, 3):
        heads = units[f"blocks.{l}.attn.heads"].grad
        contrib = {m: per_matrix[weight_name(l, m)].grad.flatten(1).sum(1) for m in ("W_Q", "W_K", "W_V", "W_O")}
        for m, gm in contrib.items():  # each of the four matrices sends gradient to every head
            assert (gm != 0).all(), (l, m)
        torch.testing.assert_close(heads, sum(contrib.values()))  # and the head's logit gets their sum
        neurons = units[f"blocks.{l}.mlp.neurons"].grad
        torch.testing.assert_close(
            neurons, per_matrix[weight_name(l, "W_in")].grad.flatten() + per_matrix[weight_name(l, "W_out")].grad.flatten()
        )
        assert (neurons != 0).all()
    wm.detach()


def _zero(lm, layer: int, matrix: str, index) -> None:
    """Zero canonical entries ``[index]`` of one matrix of a plain model, in its native layout."""
    site = lm.site(weight_name(layer, matrix))
    keep = torch.ones(canonical_shape(lm.shape, matrix))
    keep[index] = 0
    with torch.no_grad():
        site.native_weight().mul_(site.to_native(keep))


@pytest.mark.parametrize("backend", BACKENDS)
def test_removing_a_head_or_neuron_equals_zeroing_its_slices_by_hand(backend, make_tiny_lm):
    lm = make_tiny_lm(backend)
    x = torch.randint(0, lm.shape.d_vocab, (2, 12))
    wm = WeightMask(lm.shape, MaskConfig((1, 3), granularity="head")).attach(lm)
    with torch.no_grad():
        for _, p in wm.items():
            p.fill_(-3.0)
        wm.logit("blocks.3.attn.heads")[1] = 3.0  # head L3H1 in the subnetwork
        wm.logit("blocks.1.mlp.neurons")[7] = 3.0  # neuron 7 of block 1
        removed = lm(x)
        with wm.using("eval", "subnetwork"):
            alone = lm(x)
    wm.detach()
    ref = make_tiny_lm(backend)
    for m in ("W_Q", "W_K", "W_V", "W_O"):
        _zero(ref, 3, m, 1)
    _zero(ref, 1, "W_in", (slice(None), 7))
    _zero(ref, 1, "W_out", 7)
    with torch.no_grad():
        torch.testing.assert_close(removed, ref(x), atol=1e-6, rtol=0)
        assert not torch.allclose(removed, lm(x), atol=1e-4)
    # the subnetwork alone: every other weight of the masked blocks zeroed
    only = make_tiny_lm(backend)
    for l in (1, 3):
        for m in ("W_Q", "W_K", "W_V", "W_O"):
            _zero(only, l, m, [h for h in range(lm.shape.n_heads) if (l, h) != (3, 1)])
        rest = [j for j in range(lm.shape.d_mlp) if (l, j) != (1, 7)]
        _zero(only, l, "W_in", (slice(None), rest))
        _zero(only, l, "W_out", rest)
    with torch.no_grad():
        torch.testing.assert_close(alone, only(x), atol=1e-6, rtol=0)


def test_head_sparsity_loss_is_the_expected_weight_density(make_tiny_lm):
    """At head granularity the sparsity term is the expected share of masked weights in the
    subnetwork (the weight-granularity loss of the tied mask), not a mean over units."""
    lm = make_tiny_lm()
    s = lm.shape
    wm = WeightMask(s, MaskConfig((2,), matrices=("W_Q", "W_O", "W_in"), granularity="head"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in wm.items():
            p.copy_(torch.randn(p.shape, generator=g))
    ph, pn = torch.sigmoid(wm.logit("blocks.2.attn.heads")), torch.sigmoid(wm.logit("blocks.2.mlp.neurons"))
    per_head = 2 * s.d_model * s.d_head  # its W_Q and W_O slices
    want = (ph.sum() * per_head + pn.sum() * s.d_model) / (s.n_heads * per_head + s.d_mlp * s.d_model)
    torch.testing.assert_close(wm.expected_density(), want)
    assert not wm.plain_density


# ------------------------------------------------------------------------------------------
# The saved subnetwork
# ------------------------------------------------------------------------------------------
def test_head_subnetwork_file_has_per_matrix_masks_and_unit_logits(tmp_path, make_tiny_lm):
    from safetensors.torch import load_file

    lm = make_tiny_lm()
    s = lm.shape
    wm = WeightMask(s, MaskConfig((2, 3), granularity="head"))
    with torch.no_grad():
        for _, p in wm.items():
            p.fill_(-1.0)
        wm.logit("blocks.2.attn.heads")[[0, 3]] = 1.5
        wm.logit("blocks.3.mlp.neurons")[5] = 0.5
    sub = Subnetwork.from_mask(wm, lm)
    path = sub.save(tmp_path / "s.safetensors")
    raw = load_file(str(path))
    assert raw["units/blocks.2.attn.heads"].shape == (s.n_heads,) and raw["units/blocks.3.mlp.neurons"].shape == (s.d_mlp,)
    assert raw["mask/blocks.2.attn.W_K"].flatten().tolist() == [1, 0, 0, 1]  # per matrix, canonical names
    back = Subnetwork.load(path)
    assert back.mask_config.granularity == "head" and back.units is not None
    full = back.full_binary()
    assert full["blocks.2.attn.W_O"].shape == canonical_shape(s, "W_O")
    assert full["blocks.2.attn.W_V"][3].all() and not full["blocks.2.attn.W_V"][1].any()
    assert full["blocks.3.mlp.W_in"][:, 5].all() and int(full["blocks.3.mlp.W_in"].sum()) == s.d_model
    assert back.stats.n_sub == 2 * 4 * s.d_model * s.d_head + 2 * s.d_model
    assert back.density_stats()["units"]["heads"]["2"] == [1, 0, 0, 1]
    x = torch.randint(0, s.d_vocab, (2, 9))
    with torch.no_grad(), wm.applied(lm):
        want = lm(x)
    with torch.no_grad(), back.applied(lm):
        torch.testing.assert_close(lm(x), want, atol=0, rtol=0)
    # a membership that is not head-structured is refused, naming the matrices
    bad = {n: b.clone() for n, b in back.binary().items()}
    bad["blocks.2.attn.W_O"][1] = True
    with pytest.raises(SubnetworkError, match="W_O and W_Q disagree"):
        back.with_binary(bad)


def test_random_baseline_of_a_head_run_draws_heads_and_neurons(make_tiny_lm):
    from kcs_lens.masks.subnetwork import random_like

    lm = make_tiny_lm()
    units = {
        "blocks.3.attn.heads": torch.tensor([2.0, -2.0, 2.0, -2.0]),
        "blocks.3.mlp.neurons": torch.where(torch.arange(lm.shape.d_mlp) < 9, 2.0, -2.0),
    }
    sub = Subnetwork({}, MaskConfig((3,), granularity="head"), lm.shape, units=units)
    draws = [random_like(sub, torch.Generator().manual_seed(i)) for i in range(4)]
    for r in draws:
        ub = r.unit_binary()
        assert ub is not None and int(ub["blocks.3.attn.heads"].sum()) == 2 and int(ub["blocks.3.mlp.neurons"].sum()) == 9
        assert r.stats.n_sub == sub.stats.n_sub  # whole heads and neurons: the same number of weights
    assert len({r.membership_sha() for r in draws}) > 1


# ------------------------------------------------------------------------------------------
# row granularity and the deprecated name 'neuron'
# ------------------------------------------------------------------------------------------
def test_neuron_is_a_deprecated_alias_of_row():
    with pytest.warns(FutureWarning, match="use 'row'"):
        assert normalize_granularity("neuron", warn=True) == "row"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # saved runs are read silently
        assert MaskConfig.from_dict({"layers": [1], "granularity": "neuron"}).granularity == "row"


def test_old_run_directory_with_neuron_granularity_loads_and_evaluates(tmp_path, tiny_lm, tiny_kg, tiny_model_dir):
    """A run written before the rename: config.json and the subnetwork's metadata say 'neuron'."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from kcs_lens.discovery.rundir import load_run
    from kcs_lens.evaluation.evaluate import evaluate_run

    run = write_run(tmp_path / "old", tiny_lm, tiny_kg, tiny_model_dir, granularity="row", density=0.2)
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"]["granularity"] = cfg["mask"]["granularity"] = "neuron"
    (run / "config.json").write_text(json.dumps(cfg))
    f = run / "subnetwork.safetensors"
    with safe_open(str(f), framework="pt") as h:
        meta = dict(h.metadata())
    mc = json.loads(meta["mask_config"])
    mc["granularity"] = "neuron"
    meta["mask_config"] = json.dumps(mc)
    save_file(load_file(str(f)), str(f), metadata=meta)

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        info = load_run(run)
    assert info.config.granularity == "row" and info.subnetwork.mask_config.granularity == "row"
    assert info.subnetwork.logits["blocks.3.mlp.W_in"].shape == (tiny_lm.shape.d_model, 1)
    out = evaluate_run(run, save=False, lens_model=tiny_lm, log=lambda m: None)
    assert out["subnetwork"]["granularity"] == "row" and out["metrics"]["remaining"]["target"]["ppl"] > 0


# ------------------------------------------------------------------------------------------
# End to end: discover --granularity head on the bundled model, evaluate, compare-circuits
# ------------------------------------------------------------------------------------------
def write_run(*a, **kw):
    from _eval_fixtures import write_run as w

    return w(*a, **kw)


@pytest.mark.slow
@pytest.mark.skipif(not bundled_available(), reason="bundled model not built")
def test_discover_head_granularity_on_the_bundled_model(tmp_path):
    from typer.testing import CliRunner

    from kcs_lens.cli.main import app
    from kcs_lens.discovery.rundir import load_run

    run = tmp_path / "head"
    args = ["discover", "--granularity", "head", "--steps", "4", "--eval-every", "2", "--checkpoint-every", "2"]
    args += ["--control-batch", "16", "--lm-batch", "1", "--out", str(run)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    info = load_run(run)
    sub = info.subnetwork
    assert info.config.granularity == "head" and sub.units is not None
    assert sorted(sub.units) == [f"blocks.{l}.{k}" for l in (2, 3) for k in ("attn.heads", "mlp.neurons")]
    assert sub.units["blocks.2.attn.heads"].shape == (sub.shape.n_heads,)
    r = CliRunner().invoke(app, ["evaluate", str(run), "--json", str(tmp_path / "ev.json")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "cmp"
    r = CliRunner().invoke(app, ["compare-circuits", str(run), "--out", str(out), "--n-bootstrap", "10", "--no-control"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "comparison.json").read_text())
    hd = data["sets"]["target"]["head_decisions"]
    n_heads_masked = 2 * sub.shape.n_heads
    assert len(hd["heads"]) == n_heads_masked and set(hd["agreement"]) == {"knockout", "patching", "attribution", "dla"}
    heads_in = [f"L{l}H{h}" for l in (2, 3) for h in range(sub.shape.n_heads) if sub.units[f"blocks.{l}.attn.heads"][h] > 0]
    assert hd["in_subnetwork"] == heads_in == [h["head"] for h in hd["heads"] if h["in_subnetwork"]]
    assert "mask vs patching" in data["sets"]["target"]["agreement"]["masked_layers"]
    # every head of the masked layers, in or out, with its decision, σ(l) and each method's mean
    # effect: in the terminal and as a row of the report's per-head table (docs/cli.md)
    lines = r.output.splitlines()
    html = (out / "report.html").read_text()
    rows = html.split('class="units head-decisions"')[1].split("</table>")[0].split("<tr>")[2:]
    assert len(rows) == n_heads_masked
    for h, row in zip(hd["heads"], rows):
        line = next(x.split() for x in lines if x.split()[:1] == [h["head"]])
        assert line[1:3] == ["yes" if h["in_subnetwork"] else "no", f"{h['mask_prob']:.3f}"], line
        assert line[3] == ("n/a" if h["knockout"] is None else f"{h['knockout']:+.3f}"), line
        assert f"<td>{h['head']}</td><td>{'yes' if h['in_subnetwork'] else 'no'}</td><td>{h['mask_prob']:.3f}</td>" in row
    # the attention views show heads of the masked layers (2 and 3), never layer 0
    assert data["top_heads"] and all(x.startswith(("L2H", "L3H")) for x in data["top_heads"]), data["top_heads"]


def test_decision_agreement_auroc_and_precision():
    from kcs_lens.analyses.agreement import decision_agreement
    from kcs_lens.stats import bootstrap_indices

    d = np.array([True, False, True, False, False])
    perfect = np.array([[3.0, 0.1, -2.0, 0.0, 0.5], [2.0, 0.2, -4.0, 0.1, 0.3]])  # |effect| ranks the two first
    a = decision_agreement(d, perfect, bootstrap_indices(2, 20, 0))
    assert a["auroc"]["value"] == 1.0 and a["precision@k"]["value"] == 1.0 and a["auroc"]["ci95"] == [1.0, 1.0]
    worst = decision_agreement(d, np.array([0.0, 1.0, 0.0, 2.0, 3.0]))
    assert worst["auroc"]["value"] == 0.0 and worst["precision@k"]["value"] == 0.0
    ties = decision_agreement(d, np.ones(5))
    assert ties["auroc"]["value"] == 0.5
    assert decision_agreement(np.zeros(5, bool), np.ones(5))["auroc"]["value"] is None


def test_compare_circuits_on_a_head_run_uses_the_head_decisions(tmp_path, tiny_lm, tiny_kg, tiny_model_dir):
    from kcs_lens.analyses.compare import compare_circuits
    from kcs_lens.discovery.rundir import load_run

    run = write_run(tmp_path / "head", tiny_lm, tiny_kg, tiny_model_dir, granularity="head", density=0.4, seed=3)
    sub = load_run(run).subnetwork
    assert sub.units is not None
    data = compare_circuits(run, out=tmp_path / "cmp", n_bootstrap=10, control=False, lens_model=tiny_lm, log=lambda m: None)
    res = data["sets"]["target"]
    hd = res["head_decisions"]
    H = tiny_lm.shape.n_heads
    want = [f"L{l}H{h}" for l in (2, 3) for h in range(H) if sub.units[f"blocks.{l}.attn.heads"][h] > 0]
    assert want and hd["in_subnetwork"] == want
    assert data["structure"]["head_decisions"] == want
    for row in hd["heads"]:
        l, h = (int(x) for x in row["head"][1:].split("H"))
        assert row["mask_prob"] == pytest.approx(float(torch.sigmoid(sub.units[f"blocks.{l}.attn.heads"][h])))
        assert data["structure"]["head"][l][h] == float(row["in_subnetwork"])  # density = the decision
        if not row["in_subnetwork"]:
            assert row["knockout"] == 0.0  # nothing of the subnetwork lives in that head
    assert set(hd["agreement"]) == {"knockout", "patching", "attribution", "dla"}
    assert hd["agreement"]["knockout"]["n_in_subnetwork"] == len(want)
    assert "mask vs attribution" in res["agreement"]["masked_layers"]
    assert "Heads in the subnetwork vs each method" in (tmp_path / "cmp" / "report.html").read_text()


def test_head_knockout_equals_the_weight_level_knockout(make_tiny_lm, tiny_kg):
    """Without GQA, knocking out head h through its logit is the weight-level restriction to its slices."""
    from kcs_lens.analyses.knockout import knockout
    from kcs_lens.analyses.prompts import build_prompts
    from kcs_lens.data.loaders import load_kg

    lm = make_tiny_lm()
    units = {
        "blocks.2.attn.heads": torch.tensor([2.0, -2.0, 2.0, -2.0]),
        "blocks.2.mlp.neurons": torch.where(torch.arange(lm.shape.d_mlp) % 5 == 0, 2.0, -2.0),
        "blocks.3.attn.heads": torch.tensor([-2.0, -2.0, -2.0, 2.0]),
        "blocks.3.mlp.neurons": torch.full((lm.shape.d_mlp,), -2.0),
    }
    sub = Subnetwork({}, MaskConfig((2, 3), granularity="head"), lm.shape, units=units)
    prompts = build_prompts(list(load_kg(str(tiny_kg["target"]))), lm.tokenizer)
    a, b = knockout(lm, sub, prompts), knockout(lm, sub.at_weight_granularity(), prompts)
    np.testing.assert_allclose(a.heads, b.heads, atol=1e-6)
    np.testing.assert_allclose(a.mlp, b.mlp, atol=1e-6)
    np.testing.assert_allclose(a.remaining_logprob, b.remaining_logprob, atol=1e-6)
    assert (a.heads[:, 2, [1, 3]] == 0).all() and np.abs(a.heads[:, 2, 0]).max() > 0


def test_overlap_of_head_runs_combines_heads_and_neurons(make_tiny_lm):
    from kcs_lens.evaluation.overlap import at_least

    lm = make_tiny_lm()
    mc = MaskConfig((3,), granularity="head")
    F = lm.shape.d_mlp

    def sub(heads, neurons):
        u = {"blocks.3.attn.heads": torch.full((4,), -2.0), "blocks.3.mlp.neurons": torch.full((F,), -2.0)}
        u["blocks.3.attn.heads"][heads] = 2.0
        u["blocks.3.mlp.neurons"][neurons] = 2.0
        return Subnetwork({}, mc, lm.shape, units=u)

    a, b = sub([0, 1], [1, 2]), sub([1, 2], [2, 3])
    union, inter = at_least([a, b], 1), at_least([a, b], 2)
    assert union.unit_binary()["blocks.3.attn.heads"].tolist() == [True, True, True, False]
    assert inter.unit_binary()["blocks.3.attn.heads"].tolist() == [False, True, False, False]
    assert inter.unit_binary()["blocks.3.mlp.neurons"].nonzero().flatten().tolist() == [2]
    assert union.stats.n_sub == 3 * 4 * lm.shape.d_model * lm.shape.d_head + 3 * 2 * lm.shape.d_model
