"""Head granularity on a tiny Llama-family model (grouped-query attention 4 query / 2 K/V heads,
gated MLP): removing heads and neurons equals zeroing their slices by hand, the fast objective
equals the reference; on every installed backend (HookedTransformer's ``_W_K`` / ``_W_V`` on the
TL 3.9 line). The tiny model comes from tests/_family_fixtures.py."""

from __future__ import annotations

import _family_fixtures as family_fixtures
import pytest
import torch

from kcs_lens.masks.mask import WeightMask
from kcs_lens.masks.mask_config import MaskConfig
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.canonical import canonical_shape, weight_name


def _backends():
    from kcs_lens.model.loading import available_backends

    have = available_backends()
    return [pytest.param(b, marks=pytest.mark.skipif(b not in have, reason=f"no {b} backend")) for b in ("bridge", "hooked")]


ON_BACKENDS = pytest.mark.parametrize("backend", _backends())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return family_fixtures.make_family_dir("llama", tmp_path_factory.mktemp("fam"))


def _load(d, backend="bridge"):
    from kcs_lens.model.loading import load_model

    return load_model(str(d), backend=backend)


def _zero(lm, layer: int, matrix: str, index) -> None:
    site = lm.site(weight_name(layer, matrix))
    keep = torch.ones(canonical_shape(lm.shape, matrix))
    keep[index] = 0
    with torch.no_grad():
        site.native_weight().mul_(site.to_native(keep))


@ON_BACKENDS
def test_gqa_head_removal_equals_zeroing_slices_by_hand(llama_dir, backend):
    lm = _load(llama_dir, backend)
    s = lm.shape
    assert (s.n_heads, s.kv_heads, s.gated_mlp) == (4, 2, True)
    x = torch.randint(3, s.d_vocab, (2, 10))
    wm = WeightMask(s, MaskConfig((1,), granularity="head")).attach(lm)
    with torch.no_grad():
        for _, p in wm.items():
            p.fill_(-2.0)
        wm.logit("blocks.1.attn.heads")[[0, 1, 2]] = 2.0  # K/V head 0 (query heads 0, 1) complete, K/V head 1 not
        wm.logit("blocks.1.mlp.neurons")[5] = 2.0
        removed = lm(x)
    sub = Subnetwork.from_mask(wm, lm)
    wm.detach()
    assert sub.binary()["blocks.1.attn.W_K"].flatten().tolist() == [True, False]
    ref = _load(llama_dir, backend)
    for m in ("W_Q", "W_O"):
        _zero(ref, 1, m, [0, 1, 2])
    for m in ("W_K", "W_V"):
        _zero(ref, 1, m, 0)
    for m in ("W_in", "W_gate"):
        _zero(ref, 1, m, (slice(None), 5))
    _zero(ref, 1, "W_out", 5)
    with torch.no_grad():
        torch.testing.assert_close(removed, ref(x), atol=1e-5, rtol=0)
        with sub.applied(lm):
            torch.testing.assert_close(lm(x), removed, atol=0, rtol=0)


@ON_BACKENDS
def test_gqa_fast_objective_equals_reference_at_head_granularity(llama_dir, backend):
    from kcs_lens.data.triplets import Triplet, tokenize_triplets
    from kcs_lens.objective.fast import FastObjective
    from kcs_lens.objective.reference import LossConfig, ReferenceObjective

    lm = _load(llama_dir, backend)
    tok = lm.tokenizer
    rows = [Triplet(f"dog{i}", "IsA", "animal", f"A dog{i} is an animal") for i in range(4)]
    ctl = [Triplet(f"cat{i}", "IsA", "fruit", f"A cat{i} is a fruit") for i in range(6)]
    target, control = tokenize_triplets(rows, tok), tokenize_triplets(ctl, tok)
    blocks = torch.randint(3, lm.shape.d_vocab, (2, 12))
    out = {}
    for cls in (ReferenceObjective, FastObjective):
        wm = WeightMask(lm.shape, MaskConfig((0, 1), granularity="head"), seed=5)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in wm.items():
                p.copy_(torch.randn(p.shape, generator=g))
        wm.attach(lm)
        try:
            losses = cls(lm, wm, LossConfig()).step(target, control, blocks, 0, 10)
            out[cls.__name__] = (losses, {n: p.grad.clone() for n, p in wm.items()})
        finally:
            wm.detach()
    (lr, gr), (lf, gf) = out["ReferenceObjective"], out["FastObjective"]
    for k in lr:
        assert lf[k] == pytest.approx(lr[k], rel=1e-5, abs=1e-7), k
    for n in gr:
        torch.testing.assert_close(gf[n], gr[n], rtol=1e-4, atol=1e-6 + 1e-5 * float(gr[n].abs().max()))


@ON_BACKENDS
def test_gqa_head_run_structure_and_knockout(llama_dir, backend):
    """compare-circuits' structure and knock-out read a GQA head run per query head."""
    from kcs_lens.analyses.knockout import knockout
    from kcs_lens.analyses.prompts import build_prompts
    from kcs_lens.analyses.structure import structure
    from kcs_lens.data.triplets import Triplet

    lm = _load(llama_dir, backend)
    units = {
        "blocks.1.attn.heads": torch.tensor([2.0, 2.0, 2.0, -2.0]),
        "blocks.1.mlp.neurons": torch.full((lm.shape.d_mlp,), -2.0),
    }
    units["blocks.1.mlp.neurons"][3] = 2.0
    sub = Subnetwork({}, MaskConfig((1,), granularity="head"), lm.shape, units=units)
    st = structure(sub)
    assert st["head"][1].tolist() == [1.0, 1.0, 1.0, 0.0] and st["head_decisions"] == ["L1H0", "L1H1", "L1H2"]
    assert st["head_by_matrix"]["W_K"][1].tolist() == [1.0, 1.0, 0.0, 0.0]  # K/V head 0 (query heads 0, 1) removed
    prompts = build_prompts([Triplet(f"dog{i}", "IsA", "animal", f"A dog{i} is an animal") for i in range(3)], lm.tokenizer)
    ko = knockout(lm, sub, prompts)
    assert ko.heads.shape == (3, lm.shape.n_layers, 4) and (ko.heads[:, 1, 3] == 0).all()


# --- every family ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    made: dict[str, object] = {}

    def get(name):
        if name not in made:
            made[name] = family_fixtures.make_family_dir(name, root)
        return made[name]

    return get


@ON_BACKENDS
@pytest.mark.parametrize("family", family_fixtures.FAMILY_NAMES)
def test_head_removal_equals_zeroing_slices_by_hand_per_family(family, backend, family_dir):
    """Per family: removing heads (a whole K/V group under GQA, plus one head of the next group)
    and an MLP neuron equals zeroing their canonical slices by hand; head logits get gradients."""
    d = family_dir(family)
    lm = _load(d, backend)
    s = lm.shape
    g = s.group_size
    heads = list(range(g)) + [g]  # K/V head 0 complete; one query head of the next group (or head 1)
    x = torch.randint(3, s.d_vocab, (2, 10))
    wm = WeightMask(s, MaskConfig((1,), granularity="head")).attach(lm)
    with torch.no_grad():
        for _, p in wm.items():
            p.fill_(-2.0)
        wm.logit("blocks.1.attn.heads")[heads] = 2.0
        wm.logit("blocks.1.mlp.neurons")[5] = 2.0
        removed = lm(x)
    wm.detach()
    ref = _load(d, backend)
    for m in ("W_Q", "W_O"):
        _zero(ref, 1, m, heads)
    kv_removed = [k for k in range(s.kv_heads) if all(h in heads for h in range(k * g, (k + 1) * g))]
    for m in ("W_K", "W_V"):
        _zero(ref, 1, m, kv_removed)
    for m in ("W_in", "W_gate") if s.gated_mlp else ("W_in",):
        _zero(ref, 1, m, (slice(None), 5))
    _zero(ref, 1, "W_out", 5)
    with torch.no_grad():
        torch.testing.assert_close(removed, ref(x), atol=1e-5, rtol=0)
    # one gradient entry per head and per neuron, from a sampled (training-mode) pass
    wm = WeightMask(s, MaskConfig((1,), granularity="head"), seed=3).attach(lm)
    wm.mode = "sample"
    try:
        lm(x).float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in wm.items()}
    finally:
        wm.detach()
    assert grads["blocks.1.attn.heads"].shape == (s.n_heads,) and grads["blocks.1.mlp.neurons"].shape == (s.d_mlp,)
    assert (grads["blocks.1.attn.heads"] != 0).any() and (grads["blocks.1.mlp.neurons"] != 0).any()
