"""Weight, row and head masks on both backends: exactness, gradients, hooks, detaching."""

from __future__ import annotations

import pytest
import torch

from kcs_lens.errors import MaskError
from kcs_lens.masks.granularity import mask_shape
from kcs_lens.masks.mask import WeightMask, gumbel_sigmoid_ste
from kcs_lens.masks.mask_config import MaskConfig, resolve_layers
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.canonical import canonical_shape, parse_weight_name
from kcs_lens.model.loading import available_backends

BACKENDS = available_backends()


def _random_logits(wm: WeightMask, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in wm.items():
            p.copy_(torch.randn(p.shape, generator=g))


def _zero_by_hand(lm, wm: WeightMask, keep: str = "remaining") -> None:
    """Zero the weights of a plain model the way the eval mask should."""
    with torch.no_grad():
        for n, b in wm.binary().items():  # per matrix, at every granularity
            site = lm.site(n)
            full = canonical_shape(lm.shape, parse_weight_name(n)[1])
            sub = b.float().expand(full)
            site.native_weight().mul_(site.to_native(1 - sub if keep == "remaining" else sub))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["weight", "row", "head"])
def test_eval_masks_are_exact(backend, granularity, make_tiny_lm):
    lm = make_tiny_lm(backend)
    x = torch.randint(0, lm.shape.d_vocab, (2, 12))
    with torch.no_grad():
        orig = lm(x)
    wm = WeightMask(lm.shape, MaskConfig(resolve_layers(None, lm.shape.n_layers), granularity=granularity)).attach(lm)
    with torch.no_grad():
        assert torch.equal(lm(x), orig), "empty subnetwork (init) must leave the model unchanged"
    _random_logits(wm)
    for keep in ("remaining", "subnetwork"):
        with wm.using("eval", keep), torch.no_grad():
            masked = lm(x)
        ref = make_tiny_lm(backend)
        _zero_by_hand(ref, wm, keep)
        with torch.no_grad():
            assert torch.allclose(masked, ref(x), atol=1e-6)
        assert not torch.allclose(masked, orig, atol=1e-3)
    wm.detach()
    with torch.no_grad():
        assert torch.equal(lm(x), orig), "detach must restore the weights exactly"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_exactly_the_mask_logits(backend, make_tiny_lm):
    lm = make_tiny_lm(backend)
    cfg = MaskConfig((2, 3), matrices=("W_Q", "W_O", "W_out"))
    wm = WeightMask(lm.shape, cfg, seed=0).attach(lm)
    wm.mode = "sample"
    lm(torch.randint(0, lm.shape.d_vocab, (2, 10))).logsumexp(-1).mean().backward()
    assert sorted(n for n, p in wm.items() if p.grad is not None and p.grad.abs().sum() > 0) == sorted(cfg.names)
    assert all(p.grad is None for p in lm.model.parameters()), "the model is frozen"
    wm.detach()


def test_neuron_mask_broadcasts_over_rows(make_tiny_lm):
    lm = make_tiny_lm()
    s = lm.shape
    assert mask_shape(s, "W_in", "row") == (s.d_model, 1)
    assert mask_shape(s, "W_out", "row") == (s.d_mlp, 1)  # one logit per MLP hidden unit
    assert mask_shape(s, "W_Q", "row") == (1, s.d_model, 1)
    assert mask_shape(s, "W_O", "row") == (s.n_heads, s.d_head, 1)
    wm = WeightMask(s, MaskConfig((3,), matrices=("W_out",), granularity="row")).attach(lm)
    with torch.no_grad():
        wm.logit("blocks.3.mlp.W_out")[7, 0] = 5.0  # hidden unit 7 in the subnetwork
    site = lm.site("blocks.3.mlp.W_out")
    seen = site.from_native(getattr(site.module, site.attr))  # the weight the forward uses
    orig = site.canonical_weight()
    assert torch.all(seen[7] == 0) and torch.equal(seen[:7], orig[:7]) and torch.equal(seen[8:], orig[8:])
    wm.detach()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_work_on_a_masked_model(backend, make_tiny_lm):
    lm = make_tiny_lm(backend)
    x = torch.randint(0, lm.shape.d_vocab, (1, 8))
    wm = WeightMask(lm.shape, MaskConfig((2, 3))).attach(lm)
    _random_logits(wm)
    seen = {}
    with torch.no_grad():
        lm.model.run_with_hooks(x, fwd_hooks=[("blocks.3.attn.hook_z", lambda t, hook: seen.setdefault("z", t.clone()))])
        _, cache = lm.model.run_with_cache(x)
    assert torch.allclose(seen["z"], cache["blocks.3.attn.hook_z"])
    wm.detach()
    with torch.no_grad():
        _, clean = lm.model.run_with_cache(x)
    assert not torch.allclose(clean["blocks.3.attn.hook_z"], seen["z"]), "the mask changed the activations"


def test_sampling_and_straight_through():
    torch.manual_seed(0)
    l = torch.full((20000,), -0.2007, requires_grad=True)  # logit(0.45)
    g = torch.Generator().manual_seed(0)
    sub = gumbel_sigmoid_ste(l, 1.0, "subnetwork", g)
    assert set(sub.unique().tolist()) <= {0.0, 1.0}
    assert abs(sub.mean().item() - 0.45) < 0.02, "each weight starts in the sampled subnetwork w.p. 0.45"
    g.manual_seed(0)
    rem = gumbel_sigmoid_ste(l, 1.0, "remaining", g)
    assert torch.equal(rem, 1 - sub), "remaining = complement of the same sample"
    rem.sum().backward()
    assert torch.all(l.grad < 0), "STE: d(1 - s)/dl = -s(1 - s)"


def test_cross_backend_subnetwork(tmp_path, make_tiny_lm):
    if len(BACKENDS) < 2:
        pytest.skip("needs both backends (TransformerLens 3.9 has both)")
    a, b = make_tiny_lm("bridge"), make_tiny_lm("hooked")
    wm = WeightMask(a.shape, MaskConfig((2, 3)))
    _random_logits(wm)
    Subnetwork.from_mask(wm, a).save(tmp_path / "s.safetensors")
    sub = Subnetwork.load(tmp_path / "s.safetensors")
    x = torch.randint(0, a.shape.d_vocab, (2, 9))
    with torch.no_grad(), sub.applied(a):
        la = a(x)
    with torch.no_grad(), sub.applied(b):
        lb = b(x)
    assert torch.allclose(la, lb, atol=1e-5)


def test_bad_mask_configs(make_tiny_lm):
    with pytest.raises(MaskError, match="out of range"):
        resolve_layers("2-9", 4)
    with pytest.raises(MaskError, match="unknown granularity"):
        MaskConfig((1,), granularity="block")
    assert MaskConfig((1,), granularity="neuron").granularity == "row"  # old runs: the deprecated name
    with pytest.raises(MaskError, match="unknown matrices"):
        MaskConfig((1,), matrices=("W_X",))
    assert resolve_layers(None, 12) == tuple(range(6, 12))
    assert resolve_layers("top-half", 24) == tuple(range(12, 24))
