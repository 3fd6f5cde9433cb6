"""Helpers for the evaluation / export / overlap tests: run directories written without training.

``write_run`` writes a run directory (config.json + subnetwork.safetensors [+ summary.json]) with
a random subnetwork of a chosen density, so the tests need no discovery run; ``real_run`` is one
short real discovery run shared by the session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_kwargs


def write_run(
    path: Path, lm, tiny_kg, model_dir, *, seed=0, density=0.05, layers="top-half", granularity="weight", base=None, **cfg_kw
) -> Path:
    """A finished-looking run directory whose subnetwork holds about ``density`` of the masked logits.

    ``base``: a subnetwork dict to start from (for overlapping seeds); each logit is redrawn with
    probability 0.5."""
    from kcs_lens.discovery.config import build_config
    from kcs_lens.masks.granularity import mask_shape, param_shape
    from kcs_lens.masks.mask_config import MaskConfig, param_names_of, resolve_layers
    from kcs_lens.masks.subnetwork import Subnetwork

    cfg = build_config(
        **{**tiny_run_kwargs(tiny_kg, model_dir), "seed": seed, "layers": layers, "granularity": granularity, **cfg_kw}
    )
    mc = MaskConfig(resolve_layers(cfg.layers, lm.shape.n_layers), tuple(cfg.matrices), cfg.granularity)
    g = torch.Generator().manual_seed(seed)
    logits = {}
    for n in mc.model_names(lm.shape):
        shp = mask_shape(lm.shape, n.split(".")[-1], cfg.granularity)
        new = torch.where(torch.rand(shp, generator=g) < density, 3.0, -3.0)
        if base is not None:
            new = torch.where(torch.rand(shp, generator=g) < 0.5, base[n], new)
        logits[n] = new
    meta = {"model_spec": str(model_dir), "model_fingerprint": lm.fingerprint(), "seed": seed, "step": 12}
    if mc.granularity == "head":  # one logit per head / neuron; the matrices follow
        units = {
            n: torch.where(torch.rand(param_shape(lm.shape, n, "head"), generator=g) < density, 3.0, -3.0)
            for n in param_names_of(mc, mc.model_names(lm.shape))
        }
        sub = Subnetwork({}, mc, lm.shape, meta, units=units)
    else:
        sub = Subnetwork(logits, mc, lm.shape, meta)
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({"config": cfg.to_dict(), "model_fingerprint": lm.fingerprint(), "mask": mc.to_dict()})
    )
    sub.save(path / "subnetwork.safetensors")
    (path / "summary.json").write_text(json.dumps({"selected_step": 12, "meets_criteria": False}))
    return path


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from kcs_lens.model.loading import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, tiny_kg, tiny_model_dir, tiny_lm) -> Path:
    """One 12-step discovery run on the tiny model (about 15 s)."""
    from kcs_lens.discovery.runner import discover

    out = tmp_path_factory.mktemp("runs") / "real"
    discover(out=out, lens_model=tiny_lm, log=lambda m: None, **tiny_run_kwargs(tiny_kg, tiny_model_dir))
    return out


def cli(*args):
    """Invoke ``kcs-lens`` in-process (skips where the package is not installed, so kcs_lens.cli is absent)."""
    from typer.testing import CliRunner

    app = pytest.importorskip("kcs_lens.cli.main").app
    return CliRunner().invoke(app, [str(a) for a in args])
