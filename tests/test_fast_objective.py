"""FastObjective computes the reference Objective's losses and mask gradients (issue 7).

Both paths draw their masks from the same seeded generator in the same order, so with the same
logits they see the same samples; losses must agree to float tolerance and the gradients of the
mask logits too. Runs on whichever TransformerLens backend is installed (4.x bridge, 3.x
HookedTransformer); scripts/test.sh runs the suite on both.
"""

from __future__ import annotations

import json

import pytest
import torch

from kcs_lens.data.triplets import Triplet, tokenize_triplets
from kcs_lens.masks.mask import WeightMask, gumbel_sigmoid_ste
from kcs_lens.masks.mask_config import MaskConfig
from kcs_lens.model.loading import available_backends
from kcs_lens.objective.fast import FastObjective, FastSwitches
from kcs_lens.objective.fast_ops import FusedNoise, final_at
from kcs_lens.objective.reference import LossConfig, ObjectiveOptions, ReferenceObjective

BACKENDS = available_backends()
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7


def _triplets(path):
    return [Triplet(r["head"], r["relation"], r["tail"], r["text"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.fixture(scope="module")
def data(tiny_kg, tiny_tokenizer):
    tok = lambda ts, **kw: tokenize_triplets(ts, tiny_tokenizer, **kw)
    target = tok(_triplets(tiny_kg["target"]))
    control = tok(_triplets(tiny_kg["control"]))
    text = tiny_tokenizer.encode(tiny_kg["text"].read_text())
    blocks = torch.tensor(text[: 3 * 24]).view(3, 24)
    return {
        "target": target,
        "control": control,
        "blocks": blocks,
        "tok": tok,
        "triplets": _triplets(tiny_kg["control"]),
        "target_triplets": _triplets(tiny_kg["target"]),
    }


def _masks(lm, layers=(2, 3), seed=7, granularity="weight"):
    m = WeightMask(lm.shape, MaskConfig(tuple(layers), granularity=granularity), seed=seed)
    g = torch.Generator().manual_seed(123)  # varied logits, the same in every copy
    with torch.no_grad():
        for _, p in m.items():
            p.copy_(torch.randn(p.shape, generator=g) * 1.5 - 0.2)
    return m


def _run(lm, objective_cls, batches, steps=2, loss=None, masks_kw=None, pools=None, share_sample=False, **switches):
    """Run ``steps`` steps (no optimizer update in between); returns [(losses, grads)] per step."""
    masks = _masks(lm, **(masks_kw or {}))
    masks.attach(lm)
    try:
        obj = objective_cls(lm, masks, loss or LossConfig(), ObjectiveOptions(share_sample, pools), **switches)
        out = []
        for s in range(steps):
            t, c, b = batches(s)
            masks.zero_grad(set_to_none=True)
            losses = obj.step(t, c, b, s, 10)
            grads = {n: p.grad.detach().clone() for n, p in masks.items()}
            out.append((losses, grads))
        return out
    finally:
        masks.detach()


def _compare(ref, fast):
    for (lr, gr), (lf, gf) in zip(ref, fast):
        assert lr.keys() == lf.keys()
        for k in lr:
            assert lf[k] == pytest.approx(lr[k], rel=LOSS_RTOL, abs=1e-7), (k, lr, lf)
        for n in gr:
            scale = float(gr[n].abs().max())
            torch.testing.assert_close(gf[n], gr[n], rtol=GRAD_RTOL, atol=GRAD_ATOL + 1e-5 * scale, msg=n)


def _batches(data, control_batch=8):
    ctl = data["control"]

    def get(step):
        idx = torch.arange(step * control_batch, (step + 1) * control_batch) % len(ctl)
        return data["target"], ctl.select(idx), data["blocks"][step % 2 : step % 2 + 2]

    return get


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_matches_reference_default(make_tiny_lm, data, backend):
    lm = make_tiny_lm(backend)
    get = _batches(data)
    ref = _run(lm, ReferenceObjective, get, steps=3)
    fast = _run(lm, FastObjective, get, steps=3)
    _compare(ref, fast)
    # the terms are real: non-zero, and the gradients are not all zero
    assert all(ref[0][0][k] > 0 for k in ("suppression", "control_kg", "control_lm"))
    assert any(float(g.abs().sum()) > 0 for g in ref[0][1].values())


SWITCH_SETS = {
    "all-off": FastSwitches.none().to_dict(),
    "no-prefix-cache": {"prefix_cache": False},
    "no-p-cache": {"p_cache": False},
    "no-scored-only": {"scored_only": False},
    "no-scored-last-block": {"scored_last_block": False},
    "no-fused-noise": {"fused_noise": False},
    "no-chunked-kl": {"chunked_kl": False},
    "small-chunks": {"kl_chunk": 5},
    "tiny-p-cache-budget": {"p_cache_mb": 0.05},
    "lm-cache": {"lm_cache_mb": 64.0},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SWITCH_SETS))
def test_each_switch_matches_reference(make_tiny_lm, data, backend, name):
    lm = make_tiny_lm(backend)
    get = _batches(data)
    if name == "lm-cache":  # the same blocks twice: the second step hits the cache
        get = lambda s, g=_batches(data): (g(s)[0], g(s)[1], data["blocks"][:2])
    _compare(_run(lm, ReferenceObjective, get), _run(lm, FastObjective, get, **SWITCH_SETS[name]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "loss",
    [
        LossConfig(tail_position="released"),
        LossConfig(use_suppression=False),
        LossConfig(use_control_kg=False),
        LossConfig(use_control_lm=False),
        LossConfig(use_sparsity=False),
        LossConfig(suppression=0.7, control_kg=2.0, control_lm=0.3),
        LossConfig(tail=2.0),
        LossConfig(tail=2.0, tail_kind="uniform"),
        LossConfig(tail=2.0, use_suppression=False),
    ],
    ids=[
        "released-tail",
        "no-suppression",
        "no-control-kg",
        "no-control-lm",
        "no-sparsity",
        "weights",
        "tail-term",
        "tail-term-uniform",
        "tail-ablated",
    ],
)
def test_loss_options_match_reference(make_tiny_lm, data, backend, loss):
    lm = make_tiny_lm(backend)
    get = _batches(data)
    _compare(_run(lm, ReferenceObjective, get, loss=loss), _run(lm, FastObjective, get, loss=loss))


def _pools(data, tiny_tokenizer, k=3, seed=5):
    from kcs_lens.objective.distractors import DistractorPools

    return DistractorPools.build(data["target_triplets"], data["target"], data["triplets"], tiny_tokenizer, k=k, seed=seed)


NEW_TERMS = {
    "distractor-margin": LossConfig(distractor=2.0),
    "distractor-uniform": LossConfig(distractor=2.0, distractor_kind="uniform"),
    "lens": LossConfig(lens=2.0, lens_topk=3),
    "all-target-terms": LossConfig(tail=0.5, distractor=1.0, lens=0.7, lens_topk=5),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(NEW_TERMS))
def test_new_target_terms_match_reference(make_tiny_lm, data, tiny_tokenizer, backend, name):
    """The distractor and lens terms (issue 22): equal losses and gradients in both objectives,
    with every fast switch on and with all of them off, and with the shared-sample option."""
    lm = make_tiny_lm(backend)
    get, loss, pools = _batches(data), NEW_TERMS[name], _pools(data, tiny_tokenizer)
    ref = _run(lm, ReferenceObjective, get, loss=loss, pools=pools)
    for kw in ({}, FastSwitches.none().to_dict()):
        _compare(ref, _run(lm, FastObjective, get, loss=loss, pools=pools, **kw))
    _compare(
        _run(lm, ReferenceObjective, get, loss=loss, pools=pools, share_sample=True),
        _run(lm, FastObjective, get, loss=loss, pools=pools, share_sample=True),
    )
    for term in loss.target_terms():
        assert term in ref[0][0]
    if name == "distractor-uniform":  # KL(U || q over 4 candidates) of a random model: positive, not huge
        assert 0 < ref[0][0]["distractor"] < 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_target_pass_for_every_target_term(make_tiny_lm, data, tiny_tokenizer, backend):
    """Issue 24: the TargetKG terms share one masked pass (one mask sample): a step with the tail,
    distractor and lens terms draws as many samples as the paper's objective (three passes), and
    its suppression loss equals that of the paper's objective under the same generator state."""
    lm = make_tiny_lm(backend)
    get, pools = _batches(data), _pools(data, tiny_tokenizer)
    for cls in (ReferenceObjective, FastObjective):
        states = []
        for loss in (LossConfig(), NEW_TERMS["all-target-terms"]):
            masks = _masks(lm)
            masks.attach(lm)
            try:
                obj = cls(lm, masks, loss, ObjectiveOptions(distractors=pools))
                t, c, b = get(0)
                out = obj.step(t, c, b, 0, 10)
                states.append((masks.generator.get_state(), out["suppression"], out["control_kg"], out["control_lm"]))
            finally:
                masks.detach()
        assert torch.equal(states[0][0], states[1][0]), cls  # same number of samples drawn
        assert states[1][1:] == pytest.approx(states[0][1:], rel=1e-6), cls


def test_target_term_definitions():
    import math

    from kcs_lens.objective.reference import TAIL_MARGIN, distractor_excess, rank_excess

    z = torch.tensor([[3.0, 1.0, 2.5, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5, 4.0]])
    tails = torch.tensor([0, 0])
    d = torch.tensor([[1, 2], [1, 3]])
    # margin: the tail's logit above the best drawn distractor's, plus the margin, floored at 0
    assert distractor_excess(z, tails, d).tolist() == pytest.approx([3.0 - 2.5 + TAIL_MARGIN, 0.0])
    # uniform: KL(U || softmax over the 3 candidates); 0 when the candidates tie
    cand = torch.log_softmax(torch.tensor([[3.0, 1.0, 2.5], [0.0, 2.0, 0.5]]), -1)
    want = (-math.log(3) - cand.mean(-1)).tolist()
    assert distractor_excess(z, tails, d, "uniform").tolist() == pytest.approx(want)
    assert float(distractor_excess(torch.zeros(1, 5), tails[:1], d[:1], "uniform")[0]) == pytest.approx(0.0, abs=1e-6)
    # rank: the tail against the k-th best OTHER token; row 0's tail is top-1 (others 2.5, 1.0, 0.0, -1.0)
    assert rank_excess(z, tails, 1).tolist() == pytest.approx([3.0 - 2.5 + TAIL_MARGIN, 0.0])
    # k = 4: row 0 against -1.0; row 1's tail (0.0) is 5th of 5, 0.5 below the 4th other (0.5): within the margin
    assert rank_excess(z, tails, 4).tolist() == pytest.approx([3.0 + 1.0 + TAIL_MARGIN, 0.0 - 0.5 + TAIL_MARGIN])


def test_distractor_pools(data, tiny_tokenizer):
    """Pools: same-relation tails other than the row's own, as first tokens; the draw is a pure
    function of (seed, step), without replacement, from the row's own pool."""
    from kcs_lens.objective.distractors import row_key

    pools = _pools(data, tiny_tokenizer, k=3, seed=5)
    t = data["target"]
    for i, trip in enumerate(data["target_triplets"]):
        own = int(t.targets[i][t.score_mask[i]][0])
        pool = pools.pools[row_key(t, i)]
        assert own not in pool.tolist() and len(pool) >= 3
        others = {x.tail for x in data["triplets"] + data["target_triplets"] if x.tail != trip.tail}
        firsts = {
            tiny_tokenizer.encode(trip.prefix + " " + o, add_special_tokens=False)[
                len(tiny_tokenizer.encode(trip.prefix, add_special_tokens=False))
            ]
            for o in others
        }
        assert set(pool.tolist()) == firsts - {own}
    a, b = pools.draw(t, 3), pools.draw(t, 3)
    assert torch.equal(a, b) and a.shape == (len(t), 3)
    assert not torch.equal(a, pools.draw(t, 4))  # fresh each step
    assert all(len(set(r.tolist())) == 3 for r in a)
    for r in range(len(t)):
        assert set(a[r].tolist()) <= set(pools.pools[row_key(t, r)].tolist())


@pytest.mark.parametrize("kind", ["margin", "uniform"])
def test_tail_term_where_the_tail_is_the_answer(make_tiny_lm, data, kind):
    """The random tiny model rarely predicts its tails, so the hinge would be 0: score the model's
    own argmax instead. The term is then positive, has gradients, and the fast path matches."""
    from kcs_lens.data.triplets import TripletBatch

    lm = make_tiny_lm(None)
    t = data["target"]
    with torch.no_grad():
        top = lm(t.tokens)[t.score_mask].argmax(-1)
    targets = t.targets.clone()
    targets[t.score_mask] = top
    answered = TripletBatch(t.tokens, targets, t.score_mask, t.lengths)
    get = lambda s, g=_batches(data): (answered, *g(s)[1:])
    loss = LossConfig(tail=2.0, tail_kind=kind)
    ref = _run(lm, ReferenceObjective, get, loss=loss)
    assert ref[0][0]["tail"] > 0
    _compare(ref, _run(lm, FastObjective, get, loss=loss))
    without = _run(lm, ReferenceObjective, get, loss=LossConfig())
    assert any(not torch.equal(ref[0][1][n], without[0][1][n]) for n in without[0][1])  # it moves the masks


def test_tail_excess_definitions():
    import math

    from kcs_lens.objective.reference import TAIL_MARGIN, tail_excess

    z = torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0], [1.5, 2.0, 0.0, 0.0]])
    t = torch.tensor([0, 0, 0])
    # margin: the tail's lead over the best other token, plus the margin, floored at 0
    assert tail_excess(z, t).tolist() == pytest.approx([2.0 + TAIL_MARGIN, 0.0, 1.5 - 2.0 + TAIL_MARGIN])
    # uniform: log q(tail) + log V, floored at 0 (q(tail) <= 1/V gives 0)
    logq = torch.log_softmax(z, -1)[:, 0]
    want = [max(0.0, float(x) + math.log(4)) for x in logq]
    assert tail_excess(z, t, "uniform").tolist() == pytest.approx(want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_token_tails_last_token_and_other_layers(make_tiny_lm, data, tiny_tokenizer, backend):
    lm = make_tiny_lm(backend, n_layers=5)
    trips = data["triplets"]
    multi = [Triplet(t.head, t.relation, t.tail + " thing mat", t.text + " thing mat") for t in trips[:6]]
    for scoring in ("all", "last"):
        target = data["tok"](multi, tail_scoring=scoring)
        control = data["tok"](trips[6:20], tail_scoring=scoring)
        get = lambda s, target=target, control=control: (
            target,
            control.select(torch.arange(s * 5, s * 5 + 7) % len(control)),
            data["blocks"][:2],
        )
        for layers in ((1, 3), (0, 1, 2, 3, 4)):
            kw = {"masks_kw": {"layers": layers}, "loss": LossConfig(tail=1.0)}
            _compare(_run(lm, ReferenceObjective, get, **kw), _run(lm, FastObjective, get, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["row", "head"])
def test_row_and_head_granularity(make_tiny_lm, data, backend, granularity):
    lm = make_tiny_lm(backend)
    get = _batches(data)
    kw = {"masks_kw": {"granularity": granularity}}
    _compare(_run(lm, ReferenceObjective, get, **kw), _run(lm, FastObjective, get, **kw))


class _HeldSampleReference(ReferenceObjective):
    """method.md's shared-sample option written out: one sample for the step (the mask's held
    sample), the three passes summed and back-propagated once."""

    def step(self, target, control, blocks, step, total_steps):
        c = self.config
        out, total, losses = {}, 0.0, []
        with self.masks.using("sample", "remaining", hold=True):
            for term, w, fn in (
                ("suppression", c.suppression, lambda: self.suppression(target)),
                ("control_kg", c.control_kg, lambda: self.control_kg(control)),
                ("control_lm", c.control_lm, lambda: self.control_lm(blocks)),
            ):
                loss = fn()
                losses.append(w * loss)
                out[term] = float(loss.detach())
                total += w * float(loss.detach())
            torch.stack(losses).sum().backward()
        lam = c.sparsity_weight(step, total_steps)
        density = self.masks.expected_density()
        (lam * density).backward()
        out.update(sparsity=float(density), **{"lambda": lam}, total=total + lam * float(density))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_sample_option(make_tiny_lm, data, backend):
    """share_sample (opt-in, changes the method): one sample per step for the three passes."""
    lm = make_tiny_lm(backend)
    get = _batches(data)
    ref = _run(lm, _HeldSampleReference, get)
    _compare(ref, _run(lm, FastObjective, get, share_sample=True))
    _compare(ref, _run(lm, ReferenceObjective, get, share_sample=True))  # the reference implements it too
    fresh = _run(lm, FastObjective, get)
    assert fresh[0][0]["control_lm"] != pytest.approx(ref[0][0]["control_lm"], rel=1e-3)


def _ste_truth(l, u, w, tau):
    """d/dl of sum(w * (1 - sigmoid((l + logit(u)) / tau))) in float64."""
    l, u, w = l.detach().double(), u.double(), w.double()
    s = torch.sigmoid((l + torch.log(u) - torch.log1p(-u)) / tau)
    return -w * s * (1 - s) / tau


def test_fused_noise_draws_the_reference_samples():
    """One flat uniform_ = the reference's per-matrix torch.rand; thresholds and STE gradients agree."""
    from kcs_lens.model.canonical import ModelShape

    shape = ModelShape(4, 4, 64, 16, 256, 300, 64)
    for tau in (1.0, 0.7):
        a = WeightMask(shape, MaskConfig((2, 3), tau=tau), seed=3)
        b = WeightMask(shape, MaskConfig((2, 3), tau=tau), seed=3)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for (_, p), (_, q) in zip(a.items(), b.items()):
                p.copy_(torch.randn(p.shape, generator=g) * 4)
                p.view(-1)[:3] = torch.tensor([-40.0, 40.0, 14.0])  # beyond the clamp of u
                q.copy_(p)
        noise = FusedNoise(b)
        for _ in range(2):
            noise.prepare()
            fast = noise.sample()
            state = a.generator.get_state()
            a.generator_u = {n: torch.rand(l.shape, generator=a.generator).clamp_(1e-6, 1 - 1e-6) for n, l in a.items()}
            a.generator.set_state(state)
            ref = {n: gumbel_sigmoid_ste(l, tau, "remaining", a.generator) for n, l in a.items()}
            for n in ref:
                assert torch.equal(fast[n], ref[n].detach()), n
                w = torch.randn(ref[n].shape, generator=g)
                ga = torch.autograd.grad((ref[n] * w).sum(), a.logit(n))[0]
                gb = torch.autograd.grad((fast[n] * w).sum(), b.logit(n))[0]
                # the reference's float32 sigmoid rounds s(1 - s) to 0 for |l + logit(u)| > ~17; the fast
                # gradient is closer to the float64 truth there: compare with both
                torch.testing.assert_close(gb, ga, rtol=1e-5, atol=5e-7)
                assert float((gb.double() - _ste_truth(a.logit(n), a.generator_u[n], w, tau)).abs().max()) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_and_blocks_equal_full_forward(make_tiny_lm, data, backend):
    """The fast path's own block loop from the cached residual = the model's forward."""

    lm = make_tiny_lm(backend)
    toks = data["control"].tokens[:5]
    with torch.no_grad():
        full = lm(toks)
        for L in (0, 2, 3):
            x = lm.resid_pre(toks, L)
            logits = lm.unembed(lm.final_norm(lm.run_blocks(x, L)))
            torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
            W, b = lm.unembed_params()
            torch.testing.assert_close(
                torch.nn.functional.linear(lm.final_norm(lm.run_blocks(x, L)), W, b), full, rtol=1e-5, atol=1e-5
            )
            sm = torch.rand(toks.shape, generator=torch.Generator().manual_seed(L)) < 0.3
            sm[0, 0] = sm[-1, -1] = True
            assert lm.plain_attention
            for select in (True, False):
                torch.testing.assert_close(final_at(lm, x, L, sm, select), lm.run_blocks(x, L)[sm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_stays_close(make_tiny_lm, data, backend):
    """autocast="bf16" (meant for CUDA; CPU autocast runs the same code): losses within bf16
    rounding of fp32, mask gradients pointing the same way."""
    lm = make_tiny_lm(backend)
    get = _batches(data)
    ref, bf = _run(lm, ReferenceObjective, get), _run(lm, FastObjective, get, autocast="bf16")
    for (lr, gr), (lb, gb) in zip(ref, bf):
        for k in ("suppression", "control_kg", "control_lm", "sparsity"):
            assert lb[k] == pytest.approx(lr[k], rel=0.05, abs=1e-3), k
        a, b = torch.cat([g.flatten() for g in gr.values()]), torch.cat([g.flatten() for g in gb.values()])
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.98
        assert not torch.equal(a, b)  # bf16 did run


def test_unknown_switch_is_refused(make_tiny_lm):
    lm = make_tiny_lm()
    m = _masks(lm)
    with pytest.raises(TypeError, match="unknown FastObjective switches"):
        FastObjective(lm, m, LossConfig(), prefix_cahce=False)


@pytest.mark.parametrize("kind", ["uniform", "logp", "hidden"])
def test_chunked_kl_row_cap_and_inplace_arithmetic(monkeypatch, kind):
    """The unembedding + KL with chunks capped by CHUNK_BYTES (3 rows here) gives the full-batch
    KL terms and gradient, and leaves the caller's log p untouched."""
    from kcs_lens.objective import fast_ops
    from kcs_lens.objective.reference import kl_p_to_q, kl_uniform_to_q

    g = torch.Generator().manual_seed(0)
    n, d, V = 10, 8, 50
    h = torch.randn(n, d, generator=g, requires_grad=True)
    W, b = torch.randn(V, d, generator=g), torch.randn(V, generator=g)
    hp = torch.randn(n, d, generator=g)
    logp = torch.log_softmax(hp @ W.T + b, -1)
    target = {"uniform": None, "logp": logp.clone(), "hidden": hp}[kind]
    monkeypatch.setattr(fast_ops, "CHUNK_BYTES", 4 * V * 3)
    kl = fast_ops.chunked_unembed_kl(h, W, b, kind, target, 1024)
    (kl * torch.arange(1.0, n + 1)).sum().backward()
    grad, h.grad = h.grad.clone(), None
    logits = h @ W.T + b
    ref = kl_uniform_to_q(logits) if kind == "uniform" else kl_p_to_q(logp, logits)
    (ref * torch.arange(1.0, n + 1)).sum().backward()
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, h.grad, rtol=1e-4, atol=1e-6)
    if kind == "logp":
        assert torch.equal(target, logp)
