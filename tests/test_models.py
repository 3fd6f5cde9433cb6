"""Model loading on both TransformerLens lines: logits, canonical weights, bad specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_bundled, tiny_hf_model

from kcs_lens.errors import ModelLoadError
from kcs_lens.model.canonical import weight_name
from kcs_lens.model.loading import available_backends, from_hf, load_model

BACKENDS = available_backends()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_plain_hf(backend, tiny_tokenizer):
    ref = tiny_hf_model(tiny_tokenizer, seed=3)
    lm = from_hf(tiny_hf_model(tiny_tokenizer, seed=3), tiny_tokenizer, backend=backend)
    x = torch.randint(0, len(tiny_tokenizer), (3, 17))
    with torch.no_grad():
        assert torch.allclose(lm(x), ref(x).logits, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_state_dict_round_trips_exactly(backend, tiny_tokenizer):
    ref = tiny_hf_model(tiny_tokenizer, seed=4)
    lm = from_hf(tiny_hf_model(tiny_tokenizer, seed=4), tiny_tokenizer, backend=backend)
    sd = lm.hf_state_dict()
    for k, v in ref.state_dict().items():
        if k.endswith("attn.bias") or k.endswith("masked_bias"):
            continue
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_canonical_layout(backend, tiny_tokenizer):
    ref = tiny_hf_model(tiny_tokenizer, seed=5)
    lm = from_hf(tiny_hf_model(tiny_tokenizer, seed=5), tiny_tokenizer, backend=backend)
    s = lm.shape
    l, m, h, d = 2, s.d_model, s.n_heads, s.d_head
    c_attn = ref.transformer.h[l].attn.c_attn.weight  # [m, 3m], Conv1D
    wq = lm.weight(weight_name(l, "W_Q"))
    assert wq.shape == (h, m, d)
    # head i of W_Q is columns [i*d, (i+1)*d) of the Q block of c_attn
    assert torch.equal(wq[1], c_attn[:, d : 2 * d])
    wv = lm.weight(weight_name(l, "W_V"))
    assert torch.equal(wv[0], c_attn[:, 2 * m : 2 * m + d])
    wo = lm.weight(weight_name(l, "W_O"))
    assert wo.shape == (h, d, m) and torch.equal(wo[1], ref.transformer.h[l].attn.c_proj.weight[d : 2 * d])
    assert torch.equal(lm.weight(weight_name(l, "W_in")), ref.transformer.h[l].mlp.c_fc.weight)
    assert torch.equal(lm.weight(weight_name(l, "W_out")), ref.transformer.h[l].mlp.c_proj.weight)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends (TransformerLens 3.9 has both)")
def test_backends_agree_on_canonical_weights_and_fingerprint(tiny_tokenizer):
    a = from_hf(tiny_hf_model(tiny_tokenizer, seed=6), tiny_tokenizer, backend="bridge")
    b = from_hf(tiny_hf_model(tiny_tokenizer, seed=6), tiny_tokenizer, backend="hooked")
    for l in range(a.shape.n_layers):
        for mat in a.shape.matrices:
            assert torch.equal(a.weight(weight_name(l, mat)), b.weight(weight_name(l, mat)))
    assert a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_dir_and_wrap_user_object(backend, tiny_model_dir):
    lm = load_model(str(tiny_model_dir), backend=backend)
    assert lm.source["kind"] == "path" and lm.backend == backend
    again = load_model(lm.model)  # a HookedTransformer / TransformerBridge the user holds
    assert again.backend == backend and again.fingerprint() == lm.fingerprint()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_keeps_stdout_clean(backend, tiny_model_dir, capfd):
    """stdout carries results (`--json`); TL 3.x prints "Moving model to device" unless told not to."""
    load_model(str(tiny_model_dir), backend=backend)
    assert capfd.readouterr().out == ""


def test_bad_specs(tmp_path, tiny_model_dir):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(str(tmp_path / "missing" / "model"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_model(str(empty))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_model(str(noweights))
    bloom = tmp_path / "bloom"  # an architecture kcs-lens does not support (tests/test_families.py: those it does)
    bloom.mkdir()
    (bloom / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    with pytest.raises(ModelLoadError, match="'bloom' is not supported"):
        load_model(str(bloom))
    with pytest.raises(ModelLoadError, match="backend 'nope'"):
        load_model(str(tiny_model_dir), backend="nope")
    with pytest.raises(ModelLoadError, match="--device 'gpu0': not a torch device"):
        load_model(str(tiny_model_dir), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="--device cuda: CUDA is not available"):
            load_model(str(tiny_model_dir), device="cuda")
    else:
        with pytest.raises(ModelLoadError, match="--device cuda:99: only"):
            load_model(str(tiny_model_dir), device="cuda:99")


@pytest.mark.slow
def test_hub_name_offline_fails_fast_and_clearly():
    """gpt2-medium with HF_HUB_OFFLINE=1: a clear message in under 2 s (fresh process, imports excluded)."""
    code = (
        "import time, torch, transformers, transformer_lens\n"
        "from kcs_lens.model.loading import load_model, ModelLoadError\n"
        "t = time.perf_counter()\n"
        "try:\n    load_model('gpt2-medium')\nexcept ModelLoadError as e:\n    print('ERR', e)\n"
        "print('SECONDS', time.perf_counter() - t)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300).stdout
    assert "ERR" in out and "gpt2-medium" in out and "hf download" in out
    assert float(out.split("SECONDS")[1]) < 2.0


@requires_bundled
@pytest.mark.parametrize("backend", BACKENDS)
def test_bundled_loads_by_name_and_path(backend):
    from kcs_lens.model.loading import BUNDLED_DIR

    a = load_model("bundled", backend=backend)
    b = load_model(str(BUNDLED_DIR), backend=backend)
    assert a.source["kind"] == "bundled" and a.fingerprint() == b.fingerprint()
