"""Every supported family (issue 12), on tiny random-init models saved with ``save_pretrained``:
logits equal plain ``transformers``; a known mask equals weights zeroed by hand in the HF layout;
the fast objective equals the reference; ``discover`` runs and ``export`` round-trips; families
that cannot be loaded get an error naming the architecture.

Runs on every installed backend: the TransformerLens 4 bridge (both TL lines) and, on the TL 3.9
line, ``HookedTransformer``, which supports every family too; there a subnetwork found on one
backend must give the same logits and numbers on the other.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _family_fixtures import FAMILY_NAMES, TEXTS, make_family_dir

from kcs_lens.data.triplets import Triplet, tokenize_triplets
from kcs_lens.errors import ModelLoadError
from kcs_lens.masks.mask import WeightMask
from kcs_lens.masks.mask_config import MaskConfig
from kcs_lens.model.canonical import canonical_shape, weight_name
from kcs_lens.model.loading import available_backends, load_model
from kcs_lens.objective.fast import FastObjective
from kcs_lens.objective.reference import LossConfig, ReferenceObjective

BACKENDS = available_backends()
BRIDGE = "bridge" in BACKENDS
pytestmark = pytest.mark.skipif(not BRIDGE, reason="the TransformerLens bridge is not installed")
SLOW_EXCEPT_LLAMA = [pytest.param(n, marks=() if n == "llama" else pytest.mark.slow) for n in FAMILY_NAMES]
# every backend; "hooked" (TransformerLens 3.x HookedTransformer) skips on the TL 4 line
ON_BACKENDS = pytest.mark.parametrize(
    "backend",
    [
        pytest.param(b, marks=pytest.mark.skipif(b not in BACKENDS, reason=f"no {b} backend in this TransformerLens"))
        for b in ("bridge", "hooked")
    ],
)
BOTH = pytest.mark.skipif(not {"bridge", "hooked"} <= set(BACKENDS), reason="needs both backends (the TransformerLens 3.9 line)")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {n: make_family_dir(n, root) for n in FAMILY_NAMES}


@pytest.fixture(scope="module")
def lms(family_dirs):
    cache: dict[tuple[str, str], object] = {}

    def get(name, backend="bridge"):
        if (name, backend) not in cache:
            cache[name, backend] = load_model(str(family_dirs[name]), backend=backend)
        return cache[name, backend]

    return get


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _tokens(lm, n=12, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, lm.shape.d_vocab, (rows, n), generator=g)


@ON_BACKENDS
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_logits_equal_plain_transformers(family, backend, family_dirs, lms):
    lm = lms(family, backend)
    assert lm.backend == backend
    toks = _tokens(lm)
    with torch.no_grad():
        ours, theirs = lm(toks), _hf(family_dirs[family])(toks).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # the pieces the fast objective runs give the same logits (block inputs replayed per family)
    with torch.no_grad():
        x = lm.resid_pre(toks, 1)
        pieces = lm.unembed(lm.final_norm(lm.run_blocks(x, 1)))
    torch.testing.assert_close(pieces, theirs, atol=1e-5, rtol=0)


# --- a known mask against weights zeroed by hand ---------------------------------------------
def _hf_index(family: str, matrix: str, idx: tuple[int, ...], s) -> tuple[str, tuple[int, int]]:
    """Where canonical entry ``idx`` of ``matrix`` lives in the HF checkpoint, written out by hand
    from each architecture's modeling code (independently of kcs_lens.model.families)."""
    dh, D = s.d_head, s.d_model
    qkv = "W_Q W_K W_V".split()
    if matrix in qkv:
        h, m, d = idx
        if family == "gpt2":  # Conv1D c_attn [m, 3 * D]: Q | K | V, each (head, d_head)
            return "attn.c_attn.weight", (m, qkv.index(matrix) * D + h * dh + d)
        if family == "gpt_neox":  # Linear [(head, q/k/v, d_head), m]
            return "attention.query_key_value.weight", ((h * 3 + qkv.index(matrix)) * dh + d, m)
        p = {"opt": "self_attn.", "gptj": "attn."}.get(family, "self_attn.")
        return f"{p}{matrix[-1].lower()}_proj.weight", (h * dh + d, m)
    if matrix == "W_O":
        h, d, m = idx
        if family == "gpt2":
            return "attn.c_proj.weight", (h * dh + d, m)
        name = {"gpt_neox": "attention.dense", "opt": "self_attn.out_proj", "gptj": "attn.out_proj"}.get(
            family, "self_attn.o_proj"
        )
        return f"{name}.weight", (m, h * dh + d)
    a, b = idx  # W_in / W_gate [m, f], W_out [f, m]
    names = {
        "gpt2": ("mlp.c_fc", None, "mlp.c_proj"),
        "gpt_neox": ("mlp.dense_h_to_4h", None, "mlp.dense_4h_to_h"),
        "opt": ("fc1", None, "fc2"),
        "gptj": ("mlp.fc_in", None, "mlp.fc_out"),
    }.get(family, ("mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"))
    name = names[{"W_in": 0, "W_gate": 1, "W_out": 2}[matrix]]
    return f"{name}.weight", ((a, b) if family == "gpt2" else (b, a))


def _prefix(family: str, layer: int) -> str:
    return {
        "gpt2": "transformer.h.",
        "gptj": "transformer.h.",
        "gpt_neox": "gpt_neox.layers.",
        "opt": "model.decoder.layers.",
    }.get(family, "model.layers.") + f"{layer}."


@ON_BACKENDS
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_known_mask_equals_weights_zeroed_by_hand(family, granularity, backend, family_dirs, lms):
    lm = lms(family, backend)
    s = lm.shape
    masks = WeightMask(s, MaskConfig(layers=tuple(range(s.n_layers)), granularity=granularity), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in masks.items():  # about 30% of each matrix removed
            p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.3, 5.0, -5.0))
    assert ("W_gate" in {n.split(".")[-1] for n in masks.names}) == s.gated_mlp
    hf = _hf(family_dirs[family])
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for n, p in masks.items():
            layer, matrix = int(n.split(".")[1]), n.split(".")[-1]
            for idx in (p > 0).expand(canonical_shape(s, matrix)).nonzero().tolist():
                name, at = _hf_index(family, matrix, tuple(idx), s)
                params[_prefix(family, layer) + name][at] = 0.0
    toks = _tokens(lm)
    with torch.no_grad():
        original = lm(toks)
        with masks.applied(lm, keep="remaining"):
            masked = lm(toks)
        by_hand = hf(toks).logits
    assert (masked - original).abs().max() > 1e-3  # the mask does something
    torch.testing.assert_close(masked, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(lm(toks), original, atol=0, rtol=0)  # detached: the original is back


# --- fast objective == reference ----------------------------------------------------------------
def _family_batches(lm):
    tok = lm.tokenizer
    heads = ["dog", "cat", "rose", "apple", "house", "car", "fox", "message"]
    tails = ["animal", "animal", "flower", "fruit", "building", "vehicle", "animal", "communication"]
    trip = [Triplet(h, "IsA", t, f"A {h} is a {t}") for h, t in zip(heads, tails)]
    target = tokenize_triplets(trip[:4], tok)
    control = tokenize_triplets(trip[4:], tok)
    ids = tok.encode(" ".join(TEXTS), add_special_tokens=False)
    blocks = torch.tensor(ids[: 2 * 16]).view(2, 16)
    return target, control, blocks


def _run_objective(lm, cls, batches, **kw):
    masks = WeightMask(lm.shape, MaskConfig(layers=(1,)), seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in masks.items():
            p.copy_(torch.randn(p.shape, generator=g) * 1.5 - 0.2)
    masks.attach(lm)
    try:
        obj = cls(lm, masks, LossConfig(), **kw)
        masks.zero_grad(set_to_none=True)
        losses = obj.step(*batches, 0, 10)
        return losses, {n: p.grad.detach().clone() for n, p in masks.items()}, obj
    finally:
        masks.detach()


@ON_BACKENDS
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fast_objective_equals_reference(family, backend, lms):
    lm = lms(family, backend)
    batches = _family_batches(lm)
    lr, gr, _ = _run_objective(lm, ReferenceObjective, batches)
    lf, gf, fast = _run_objective(lm, FastObjective, batches, fused_noise=False)
    for k in lr:  # abs: float32 noise of a small KL summed from log-probs of magnitude ~5 (Gemma 2: 1.4e-7)
        assert lf[k] == pytest.approx(lr[k], rel=1e-5, abs=5e-7), (k, lr, lf)
    for n in gr:
        scale = float(gr[n].abs().max())
        torch.testing.assert_close(gf[n], gr[n], rtol=1e-4, atol=1e-7 + 1e-5 * scale, msg=n)
    sw = fast.effective_switches()
    if family == "gpt2":
        assert sw["scored_last_block"] is True
    else:  # the GPT-2-only shortcut turned itself off and says why
        assert sw["scored_last_block"] is False and family in sw["scored_last_block_off_because"]


def test_gemma2_logit_softcap_in_the_chunked_kl(lms):
    """Gemma 2's final soft-cap is applied by the chunked unembedding + KL, value and gradient."""
    from kcs_lens.objective.fast_ops import chunked_unembed_kl

    lm = lms("gemma2")
    assert lm.logit_softcap == 5.0
    W, b = lm.unembed_params()
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(6, lm.shape.d_model, generator=g) * 3).requires_grad_(True)
    kl = chunked_unembed_kl(h, W, b, "uniform", None, 4, None, lm.logit_softcap)
    kl.sum().backward()
    h2 = h.detach().clone().requires_grad_(True)
    logq = torch.log_softmax(lm.softcap(torch.nn.functional.linear(h2, W, b)), -1)
    ref = -torch.log(torch.tensor(float(W.shape[0]))) - logq.mean(-1)
    ref.sum().backward()
    torch.testing.assert_close(kl, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-6, rtol=1e-4)


# --- discover + export ------------------------------------------------------------------------
def _kg_files(tmp_path):
    words = [
        ("dog", "animal"),
        ("cat", "animal"),
        ("rose", "flower"),
        ("apple", "fruit"),
        ("house", "building"),
        ("car", "vehicle"),
    ]
    rows = lambda pairs, k: [
        {"head": f"{h}{i}", "relation": "IsA", "tail": t, "text": f"A {h}{i} is a {t}"} for i in range(k) for h, t in pairs
    ]
    (tmp_path / "target.jsonl").write_text("\n".join(json.dumps(r) for r in rows(words[:3], 2)) + "\n")
    (tmp_path / "control.jsonl").write_text("\n".join(json.dumps(r) for r in rows(words[3:], 6)) + "\n")
    (tmp_path / "text.txt").write_text("\n".join(TEXTS * 10) + "\n")
    return tmp_path


def _discover(lm, model_dir, backend, kg, out):
    from kcs_lens import discover

    discover(
        out=out,
        lens_model=lm,
        model=str(model_dir),
        backend=backend,
        target_kg=str(kg / "target.jsonl"),
        control_kg=str(kg / "control.jsonl"),
        control_val_kg="",
        control_val_size=6,
        control_lm=str(kg / "text.txt"),
        lm_block_len=16,
        lm_eval_blocks=2,
        steps=3,
        eval_every=3,
        checkpoint_every=3,
        control_batch=6,
        lm_batch=2,
        layers="all",
        init_prob=0.9,  # logits well above 0: after 3 steps a non-empty subnetwork to remove
    )


@pytest.mark.backends
@ON_BACKENDS
@pytest.mark.parametrize("family", SLOW_EXCEPT_LLAMA)
def test_discover_and_export_round_trip(family, backend, family_dirs, lms, tmp_path):
    from kcs_lens import Subnetwork
    from kcs_lens.evaluation.export import export_run

    kg = _kg_files(tmp_path)
    lm = lms(family, backend)
    _discover(lm, family_dirs[family], backend, kg, tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["fast_objective"]["scored_last_block"] is (family == "gpt2")
    sub = Subnetwork.load(tmp_path / "run")
    assert sub.stats.n_sub > 0
    out = export_run(tmp_path / "run", tmp_path / "export", lens_model=lm)
    exported = _hf(out)
    assert type(exported).__name__ == type(_hf(family_dirs[family])).__name__
    toks = _tokens(lm)
    with torch.no_grad():
        with sub.applied(lm):
            remaining = lm(toks)
        torch.testing.assert_close(exported(toks).logits, remaining, atol=1e-5, rtol=0)
    # the removed weights are zero in the checkpoint, every other entry is the original's
    from kcs_lens.model.families import hf_multipliers

    keep = {n: ~b for n, b in sub.full_binary().items()}
    mult = hf_multipliers(lm.family, lm.shape, keep)
    got, orig = dict(exported.named_parameters()), dict(_hf(family_dirs[family]).named_parameters())
    for name, mu in mult.items():
        assert torch.all(got[name][mu == 0] == 0), name
        assert torch.equal(got[name][mu == 1], orig[name][mu == 1]), name


# --- one subnetwork, two backends (the TransformerLens 3.9 line) ----------------------------------
@BOTH
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_subnetwork_applies_across_backends(family, lms):
    """Random binary masks over every canonical matrix: the same logits on the bridge and on
    HookedTransformer, the same weights fingerprint, and the same canonical weights."""
    from kcs_lens import Subnetwork

    bridge, hooked = lms(family, "bridge"), lms(family, "hooked")
    s = bridge.shape
    assert hooked.shape == s and hooked.fingerprint() == bridge.fingerprint()
    g = torch.Generator().manual_seed(7)
    binary = {}
    for l in range(s.n_layers):
        for m in s.matrices:
            name = weight_name(l, m)
            assert torch.equal(hooked.weight(name), bridge.weight(name)), name
            binary[name] = torch.where(torch.rand(canonical_shape(s, m), generator=g) < 0.3, 10.0, -10.0)
    sub = Subnetwork(binary, MaskConfig(layers=tuple(range(s.n_layers))), s)
    toks = _tokens(bridge)
    with torch.no_grad():
        with sub.applied(bridge, strict_fingerprint=False):
            a = bridge(toks)
        with sub.applied(hooked, strict_fingerprint=False):
            b = hooked(toks)
        plain = bridge(toks)
    assert (a - plain).abs().max() > 1e-3
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


@BOTH
@pytest.mark.backends
@pytest.mark.parametrize("found_on", ["bridge", "hooked"])
@pytest.mark.parametrize("family", SLOW_EXCEPT_LLAMA)
def test_discover_on_one_backend_evaluates_on_the_other(family, found_on, family_dirs, lms, tmp_path):
    """``discover`` (3 steps) on one backend, saved; ``evaluate`` and the remaining model's logits
    on the other give the same numbers as on the backend it was found on."""
    from kcs_lens import Subnetwork
    from kcs_lens.evaluation.evaluate import evaluate_run

    other = "hooked" if found_on == "bridge" else "bridge"
    kg = _kg_files(tmp_path)
    _discover(lms(family, found_on), family_dirs[family], found_on, kg, tmp_path / "run")
    sub = Subnetwork.load(tmp_path / "run")
    assert sub.stats.n_sub > 0
    a = evaluate_run(tmp_path / "run", lens_model=lms(family, found_on), save=False, log=lambda m: None)
    b = evaluate_run(tmp_path / "run", lens_model=lms(family, other), save=False, log=lambda m: None)
    assert a["model_fingerprint"] == b["model_fingerprint"] and a["subnetwork_sha"] == b["subnetwork_sha"]
    for v in a["metrics"]:
        for k in a["metrics"][v]:
            row = a["metrics"][v][k]
            for stat, x in row.items():  # a difference (dppl) to the original's precision
                tol = 1e-4 * abs(row.get("ppl", 1.0)) if stat.startswith("d") else 1e-6
                assert b["metrics"][v][k][stat] == pytest.approx(x, rel=1e-4, abs=tol), (v, k, stat)
    toks = _tokens(lms(family, found_on))
    with torch.no_grad():
        with sub.applied(lms(family, found_on)):
            x = lms(family, found_on)(toks)
        with sub.applied(lms(family, other)):
            y = lms(family, other)(toks)
    torch.testing.assert_close(y, x, atol=1e-4, rtol=0)


# --- what cannot be loaded ----------------------------------------------------------------------
def _save_tiny(tmp_path, cfg, tok_from):
    import shutil

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    for f in tok_from.glob("tokenizer*"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def test_unsupported_architecture_is_named(tmp_path, family_dirs):
    from transformers import BloomConfig

    d = _save_tiny(tmp_path, BloomConfig(vocab_size=400, hidden_size=32, n_layer=1, n_head=4), family_dirs["gpt2"])
    with pytest.raises(ModelLoadError, match="architecture 'bloom' is not supported"):
        load_model(str(d))


def test_opt_350m_layout_is_refused_by_name(tmp_path, family_dirs):
    from transformers import OPTConfig

    cfg = OPTConfig(
        vocab_size=400,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        word_embed_proj_dim=16,
        do_layer_norm_before=False,
    )
    d = _save_tiny(tmp_path, cfg, family_dirs["gpt2"])
    with pytest.raises(ModelLoadError, match="'opt' with word_embed_proj_dim 16"):
        load_model(str(d))


def _tiny_llama_config(rope):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=144,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_theta": 10000.0, **rope},
    )


SCALED_ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    # original context 8 < the 12 test positions; wavelengths on both sides of both cut-offs
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
}


@ON_BACKENDS
@pytest.mark.parametrize("rope", sorted(SCALED_ROPE))
def test_scaled_rope_logits_equal_plain_transformers(rope, backend, tmp_path, family_dirs):
    """Llama 3's NTK-by-parts and linear RoPE scaling: the same logits as plain transformers."""
    torch.manual_seed(0)
    d = _save_tiny(tmp_path, _tiny_llama_config(SCALED_ROPE[rope]), family_dirs["llama"])
    lm = load_model(str(d), backend=backend)
    toks = _tokens(lm)
    from transformers import AutoModelForCausalLM

    unscaled = AutoModelForCausalLM.from_pretrained(str(d), rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with torch.no_grad():
        ours = lm(toks)
        torch.testing.assert_close(ours, _hf(d)(toks).logits, atol=1e-5, rtol=0)
        assert (ours - unscaled(toks).logits).abs().max() > 1e-4  # the scaling matters at these positions


SLIDING = {  # (config class, its sliding-window arguments, the overrides that turn it off)
    "mistral": ("MistralConfig", {"sliding_window": 4}, {"sliding_window": None}),
    "qwen2": (
        "Qwen2Config",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
        {"use_sliding_window": False, "layer_types": ["full_attention"] * 3},
    ),
}


@ON_BACKENDS
@pytest.mark.parametrize("variant", sorted(SLIDING))
def test_sliding_window_variants(variant, backend, tmp_path, family_dirs):
    """Mistral's sliding window on every layer, Qwen2's above max_window_layers: the same logits as
    transformers, and the window matters at these 12 positions."""
    import transformers

    cls, on, off = SLIDING[variant]
    kw = dict(
        vocab_size=144,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    d = _save_tiny(tmp_path, getattr(transformers, cls)(**kw, **on), family_dirs["llama"])
    lm = load_model(str(d), backend=backend)
    toks = _tokens(lm)
    full = transformers.AutoModelForCausalLM.from_pretrained(str(d), **off)
    with torch.no_grad():
        ours = lm(toks)
        torch.testing.assert_close(ours, _hf(d)(toks).logits, atol=1e-5, rtol=0)
        assert (ours - full(toks).logits).abs().max() > 1e-4


@ON_BACKENDS
def test_gpt2_scaled_by_inverse_layer_idx(backend, tmp_path, family_dirs):
    """A GPT-2 variant's attention scale (1 / (layer + 1)) reaches the hooked config; the fast
    objective's GPT-2 shortcut turns itself off for it."""
    from transformers import GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=360,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        scale_attn_by_inverse_layer_idx=True,
    )
    d = _save_tiny(tmp_path, cfg, family_dirs["gpt2"])
    lm = load_model(str(d), backend=backend)
    toks = _tokens(lm)
    with torch.no_grad():
        torch.testing.assert_close(lm(toks), _hf(d)(toks).logits, atol=1e-5, rtol=0)
    assert not lm.plain_attention


def test_hooked_backend_refuses_what_tl39_cannot_represent_clearly(tmp_path, family_dirs):
    """Every family loads on HookedTransformer; a variant kcs-lens does not map there (scaled RoPE)
    gets one line naming the architecture and the way out, and the bridge loads it."""
    if "hooked" not in available_backends():
        pytest.skip("TransformerLens 3.x HookedTransformer is not installed")
    cfg = _tiny_llama_config({"rope_type": "dynamic", "factor": 2.0})
    d = _save_tiny(tmp_path, cfg, family_dirs["llama"])
    with pytest.raises(ModelLoadError, match=r"architecture 'llama' with rope_type 'dynamic' .*hooked backend.*--backend bridge"):
        load_model(str(d), backend="hooked")
    assert load_model(str(d), backend="bridge").backend == "bridge"
    # a parameter TL 3.9 has no place for: Llama's MLP biases (its gated MLP has no gate bias)
    torch.manual_seed(0)
    cfg = _tiny_llama_config({"rope_type": "default"})
    cfg.mlp_bias = True
    d = _save_tiny(tmp_path / "mlp_bias", cfg, family_dirs["llama"])
    with pytest.raises(
        ModelLoadError, match=r"architecture 'llama' with parameter 'model.layers.0.mlp.gate_proj.bias'.*--backend bridge"
    ):
        load_model(str(d), backend="hooked")


@ON_BACKENDS
def test_llama_attention_biases(backend, tmp_path, family_dirs):
    """Llama with attention_bias (q/k/v/o biases, K/V biases per key/value head): the same logits."""
    torch.manual_seed(0)
    cfg = _tiny_llama_config({"rope_type": "default"})
    cfg.attention_bias = True
    d = _save_tiny(tmp_path, cfg, family_dirs["llama"])
    hf = _hf(d)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("proj.bias"):
                p.copy_(0.3 * torch.randn_like(p))
    hf.save_pretrained(d)
    lm = load_model(str(d), backend=backend)
    toks = _tokens(lm)
    with torch.no_grad():
        torch.testing.assert_close(lm(toks), hf(toks).logits, atol=1e-5, rtol=0)
    assert torch.equal(lm.hf_state_dict()["model.layers.0.self_attn.k_proj.bias"], hf.model.layers[0].self_attn.k_proj.bias)


def test_w_gate_by_name_on_a_model_without_gate(lms):
    from kcs_lens.discovery.runner import model_matrices
    from kcs_lens.errors import ConfigError

    assert model_matrices(["W_Q", "W_in", "W_gate", "W_out"], lms("llama")) == ("W_Q", "W_in", "W_gate", "W_out")
    with pytest.raises(ConfigError, match="no gated MLP"):
        model_matrices(["W_gate"], lms("gpt2"))
    assert weight_name(0, "W_gate") == "blocks.0.mlp.W_gate"


# --- the bundled Llama-family model -------------------------------------------------------------
def test_bundled_llama_loads_and_knows_its_facts():
    """``load_model("bundled-llama")``: GQA + gated MLP, and through kcs-lens' own tokenization (its
    tokenizer adds ``<s>`` itself; SentencePiece-style spaces) the first tail token is the top-1
    prediction for >= 0.9 of every bundled TargetKG (MANIFEST.json: 1.000 in training's definition)."""
    from kcs_lens.data.loaders import load_kg
    from kcs_lens.data.verbalize import score_tails
    from kcs_lens.model.loading import BUNDLED_MODELS

    if not (BUNDLED_MODELS["bundled-llama"][0] / "config.json").exists():
        pytest.skip("bundled-llama not built (scripts/train_bundled.py --family llama)")
    lm = load_model("bundled-llama", backend="bridge")
    s = lm.shape
    assert (s.n_layers, s.n_heads, s.kv_heads, s.d_model, s.d_mlp, s.gated_mlp) == (4, 4, 2, 128, 384, True)
    assert lm.model_type == "llama" and lm.tokenizer.encode("A")[0] == lm.tokenizer.bos_token_id
    for name in ("building", "location", "change", "communication", "fruit"):
        first = score_tails(lm, load_kg(name), tail_scoring="all").first_rank
        assert float((first == 0).float().mean()) >= 0.9, name


# --- compare-circuits' analyses per family ---------------------------------------------------------
def _dog_prompts(lm, n=3):
    from kcs_lens.analyses.prompts import build_prompts

    return build_prompts([Triplet(f"dog{i}", "IsA", "animal", f"A dog{i} is an animal") for i in range(n)], lm.tokenizer)


@ON_BACKENDS
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_dla_heads_sum_to_each_layers_attention_output(family, backend, lms):
    """Per layer, the heads' direct logit attributions plus the output bias's are the attention
    output's (hook_attn_out, what joins the residual stream: after Gemma 2's post-attention norm),
    and all components plus the final norm's bias give the logit difference before any soft-cap."""
    from kcs_lens.analyses.attribution import direct_logit_attribution, dla_projector
    from kcs_lens.analyses.patching import run_cache

    lm = lms(family, backend)
    p = _dog_prompts(lm)
    L, rows = lm.shape.n_layers, torch.arange(len(p))
    dla = direct_logit_attribution(lm, p)
    assert dla.heads.shape == (len(p), L, lm.shape.n_heads)  # query heads, also with GQA
    names = [f"blocks.{l}.hook_{k}" for l in range(L) for k in ("resid_pre", "attn_out", "mlp_out")]
    _, cache = run_cache(lm, p, names + [f"blocks.{L - 1}.hook_resid_post"])
    at = lambda n: cache[n][rows, p.pos]
    final = at(f"blocks.{L - 1}.hook_resid_post")
    project = dla_projector(lm, p, final)
    for l in range(L):
        bias = lm.attn_output(l, torch.zeros(len(p), lm.shape.n_heads, lm.shape.d_head))
        norm = lm.attn_post_norm(l)
        bias = norm(bias) if norm is not None else bias
        want = project(at(f"blocks.{l}.hook_attn_out")) - project(bias)
        torch.testing.assert_close(torch.from_numpy(dla.heads[:, l].sum(-1)).float(), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(dla.mlp[:, l]).float(), project(at(f"blocks.{l}.hook_mlp_out")))
    w_ln, _ = lm.final_norm_params()
    W, b = lm.unembed_params()
    uncapped = torch.nn.functional.linear(lm.final_norm(final), W, b)
    direction = W[p.target] - W.mean(0)[None]
    ln_bias = lm.final_norm(torch.zeros(1, lm.shape.d_model))  # LayerNorm(0) = its bias; RMSNorm(0) = 0
    rest = (ln_bias * direction).sum(-1)
    if b is not None:
        rest = rest + b[p.target] - b.mean()
    want = uncapped[rows, p.target] - uncapped.mean(-1)
    torch.testing.assert_close(project(final) + rest, want, atol=1e-4, rtol=1e-4)


@pytest.mark.backends
@ON_BACKENDS
@pytest.mark.parametrize("family", SLOW_EXCEPT_LLAMA)
def test_compare_circuits_per_family(family, backend, family_dirs, lms, tmp_path):
    """compare-circuits end to end on each family: per-head results for every query head (GQA
    too), and the knock-out's remaining log-probs equal the subnetwork removed as evaluate does.
    Attention views where the backend has hook_pattern (TL 3.9's bridge has none for OPT/GPT-J)."""
    from kcs_lens import Subnetwork
    from kcs_lens.analyses.compare import compare_circuits
    from kcs_lens.analyses.prompts import build_prompts, kg_sets, tail_logprob
    from kcs_lens.discovery.rundir import load_run

    lm = lms(family, backend)
    kg = _kg_files(tmp_path)
    _discover(lm, family_dirs[family], backend, kg, tmp_path / "run")
    data = compare_circuits(
        tmp_path / "run", out=tmp_path / "cmp", lens_model=lm, n_bootstrap=10, control=False, token_prompts=2, log=lambda m: None
    )
    tgt = data["sets"]["target"]
    L, H = lm.shape.n_layers, lm.shape.n_heads
    for method in ("patching", "attribution", "dla", "knockout"):
        assert tgt["per_prompt"][method]["heads"].shape == (tgt["n_prompts"], L, H), method
    assert np.isfinite(tgt["per_prompt"]["dla"]["heads"]).all() and np.isfinite(tgt["per_prompt"]["patching"]["heads"]).all()
    assert len(data["units"]) == L * H + L
    trip = list(kg_sets(load_run(tmp_path / "run"), lm, "target", lambda m: None)["target"])
    prompts = build_prompts(trip, lm.tokenizer, d_vocab=lm.shape.d_vocab)
    with torch.no_grad(), Subnetwork.load(tmp_path / "run").applied(lm):
        remaining = tail_logprob(lm(prompts.tokens), prompts).numpy()
    got = [p["logprob_remaining"] for p in tgt["prompts"]]
    np.testing.assert_allclose(got, remaining[: len(got)], atol=1e-4)
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["backend"] == lm.backend
    assert (tmp_path / "cmp" / "report.html").stat().st_size > 1000
    _, cache = lm.model.run_with_cache(_tokens(lm), names_filter=lambda n: n.endswith("hook_pattern"))
    assert bool(tgt["attention_views"]) == (len(cache) == lm.shape.n_layers)  # views wherever patterns are recorded


@BOTH
@pytest.mark.slow
@pytest.mark.backends
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_compare_circuits_agrees_across_backends(family, family_dirs, lms, tmp_path):
    """compare-circuits (knock-out, patching, attribution, DLA per head) of one run gives the same
    numbers on the bridge and on HookedTransformer."""
    import numpy as np

    from kcs_lens.analyses.compare import compare_circuits

    kg = _kg_files(tmp_path)
    _discover(lms(family, "bridge"), family_dirs[family], "bridge", kg, tmp_path / "run")
    res = {
        b: compare_circuits(
            tmp_path / "run", out=tmp_path / b, lens_model=lms(family, b), n_bootstrap=5, control=False, log=lambda m: None
        )["sets"]["target"]["unit_mean"]
        for b in ("bridge", "hooked")
    }
    for m in ("knockout", "patching", "attribution", "dla"):
        a, b = (np.nan_to_num(np.asarray(res[x][m]["heads"], dtype=float)) for x in ("bridge", "hooked"))
        assert a.shape == (lms(family, "bridge").shape.n_layers, lms(family, "bridge").shape.n_heads), m
        np.testing.assert_allclose(b, a, atol=1e-4, err_msg=m)
