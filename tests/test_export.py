"""kcs-lens export: an HF checkpoint whose weights are the original's with the chosen weights
zeroed; plain transformers reproduces the masked LensModel's logits and ``evaluate``'s PPLs."""

from __future__ import annotations

import math
import os
import shutil
import stat

import pytest
import torch
from _eval_fixtures import cli
from conftest import requires_bundled, tiny_hf_model
from safetensors.torch import load_file

from kcs_lens.discovery.rundir import load_run
from kcs_lens.errors import ExportError, SubnetworkError
from kcs_lens.evaluation.evaluate import Evaluator, evaluate_run
from kcs_lens.evaluation.export import export_model, export_run, hf_keep_multipliers
from kcs_lens.masks.granularity import mask_shape, param_shape
from kcs_lens.masks.mask_config import MaskConfig, param_names_of
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.loading import available_backends

pytest_plugins = ["_eval_fixtures"]  # fixtures tiny_lm, real_run (shared by the session)


def random_sub(shape, layers, granularity="weight", density=0.3, seed=0) -> Subnetwork:
    mc = MaskConfig(tuple(layers), granularity=granularity)
    g = torch.Generator().manual_seed(seed)
    if granularity == "head":  # one logit per head / neuron
        units = {
            n: torch.rand(param_shape(shape, n, granularity), generator=g) - (1 - density)
            for n in param_names_of(mc, mc.model_names(shape))
        }
        return Subnetwork({}, mc, shape, units=units)
    logits = {
        n: torch.rand(mask_shape(shape, n.split(".")[-1], granularity), generator=g) - (1 - density)
        for n in mc.model_names(shape)
    }
    return Subnetwork(logits, mc, shape)


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("granularity", ["weight", "row", "head"])
def test_exported_logits_equal_masked_lens_model(tmp_path, make_tiny_lm, backend, granularity):
    lm = make_tiny_lm(backend=backend)
    sub = random_sub(lm.shape, (1, 2, 3), granularity)
    tokens = lm.to_tokens(["A car is a vehicle", "The cat sat on the mat. A bird is"])
    for remove, keep in (("subnetwork", "remaining"), ("complement", "subnetwork")):
        out = export_model(lm, sub, tmp_path / remove, remove=remove)
        with torch.no_grad(), sub.applied(lm, keep=keep):
            want = lm(tokens)
            got = hf_model(out)(tokens).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, lm(tokens), atol=1e-3)  # the mask matters


def test_export_weights_and_tail_ppl_match_evaluate(tmp_path, real_run, tiny_lm, tiny_model_dir):
    info = load_run(real_run)
    ev = Evaluator(info, lens_model=tiny_lm, log=lambda m: None)
    res = evaluate_run(info, evaluator=ev, save=False)
    orig = load_file(str(tiny_model_dir / "model.safetensors"))
    for remove, variant in (("subnetwork", "remaining"), ("complement", "subnetwork")):
        out = export_run(real_run, tmp_path / remove, remove=remove, lens_model=tiny_lm)
        assert {"config.json", "model.safetensors", "tokenizer.json", "kcs_lens_export.json"} <= {p.name for p in out.iterdir()}
        got = load_file(str(out / "model.safetensors"))
        mult = hf_keep_multipliers(info.subnetwork, remove)
        assert set(mult) <= set(got)
        for k, v in orig.items():
            if k in got:
                torch.testing.assert_close(got[k], v * mult[k] if k in mult else v, rtol=0, atol=0)
        assert set(mult) == {
            f"transformer.h.{l}.{m}"
            for l in (2, 3)
            for m in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        }
        model = hf_model(out)
        with torch.no_grad():
            for name, batch in ev.batches.items():  # tail PPL with plain torch on the HF model
                logp = torch.log_softmax(model(batch.tokens).logits.float(), -1)
                lp = logp.gather(-1, batch.targets[..., None])[..., 0] * batch.score_mask
                ppl = math.exp(float((-lp.sum(1) / batch.score_mask.sum(1)).mean()))
                assert ppl == pytest.approx(res["metrics"][variant][name]["ppl"], rel=1e-4)
            toks = ev.lm_blocks
            nll = torch.nn.functional.cross_entropy(model(toks).logits[:, :-1].flatten(0, 1).float(), toks[:, 1:].flatten())
            assert math.exp(float(nll)) == pytest.approx(res["metrics"][variant]["lm"]["ppl"], rel=1e-4)


def test_export_refuses_existing_target_and_leaves_nothing(tmp_path, real_run, tiny_lm, monkeypatch):
    (tmp_path / "exists").mkdir()
    with pytest.raises(ExportError, match="exists"):
        export_run(real_run, tmp_path / "exists", lens_model=tiny_lm)
    assert list((tmp_path / "exists").iterdir()) == []
    with pytest.raises(ExportError, match="--remove"):
        export_run(real_run, tmp_path / "x", remove="both", lens_model=tiny_lm)
    # a failure half-way through writing removes the temporary directory
    monkeypatch.setattr(type(tiny_lm.tokenizer), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        export_run(real_run, tmp_path / "z", lens_model=tiny_lm)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_export_and_overlap_folders_follow_the_umask(tmp_path, real_run, tiny_lm, umask):
    """Folders 0777 & ~umask and files 0666 & ~umask, as mkdir and open give them (0755 / 0644
    under umask 022): not mkdtemp's 0700 nor the 0600 of a library's private temporary file."""
    from kcs_lens.evaluation.overlap import overlap_runs

    old = os.umask(umask)
    try:
        outs = [export_run(real_run, tmp_path / "export", lens_model=tiny_lm)]
        other = shutil.copytree(real_run, tmp_path / "other-seed")  # created under the umask too, not checked
        overlap_runs([real_run, other], out=tmp_path / "combos", lens_model=tiny_lm, log=lambda m: None)
        outs.append(tmp_path / "combos")
    finally:
        os.umask(old)
    for out in outs:
        modes = {p.relative_to(out): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
        want = {p: (0o777 if (out / p).is_dir() else 0o666) & ~umask for p in modes}
        assert modes == want, {str(p): oct(m) for p, m in modes.items() if m != want[p]}
    assert "model.safetensors" in {p.name for p in outs[0].iterdir()}


def test_cli_export(tmp_path, real_run, tiny_tokenizer):
    r = cli("export", real_run, "--out", tmp_path / "ok", "--remove", "complement")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ok" / "model.safetensors").exists()
    r = cli("export", real_run, "--out", tmp_path / "ok")
    assert r.exit_code == 2 and r.output.startswith("error: ") and "exists" in r.output
    other = tmp_path / "other"
    tiny_hf_model(tiny_tokenizer, seed=3).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    r = cli("export", real_run, "--out", tmp_path / "y", "--model", other)
    assert r.exit_code == 2 and "different weights" in r.output and not (tmp_path / "y").exists()


def test_subnetwork_of_another_model_is_refused(tmp_path, make_tiny_lm):
    lm, other = make_tiny_lm(), make_tiny_lm(n_layers=2)
    sub = random_sub(lm.shape, (2, 3))
    with pytest.raises(SubnetworkError, match="shape"):
        export_model(other, sub, tmp_path / "out")
    sub.meta["model_fingerprint"] = "0" * 32
    with pytest.raises(SubnetworkError, match="fingerprint"):
        export_model(lm, sub, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@requires_bundled
def test_export_bundled_model(tmp_path):
    from kcs_lens.model.loading import load_model

    lm = load_model("bundled")
    sub = random_sub(lm.shape, range(lm.shape.n_layers // 2, lm.shape.n_layers), density=0.05)
    out = export_model(lm, sub, tmp_path / "bundled-remaining")
    tokens = lm.to_tokens(["A church is a building", "A city is a"])
    with torch.no_grad(), sub.applied(lm):
        torch.testing.assert_close(hf_model(out)(tokens).logits, lm(tokens), rtol=1e-4, atol=1e-4)
