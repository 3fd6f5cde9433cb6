"""The discover command on a random-init GPT-2-small-shaped model (12 x 768, vocab 50257), 2 steps, a few facts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import requires_bundled
from typer.testing import CliRunner

from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.canonical import MATRICES, weight_name


@pytest.mark.slow
@requires_bundled
def test_discover_runs_on_gpt2_small_shape(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from kcs_lens.cli.main import app
    from kcs_lens.model.loading import BUNDLED_DIR

    torch.manual_seed(0)
    model_dir = tmp_path / "gpt2-small-random"
    GPT2LMHeadModel(GPT2Config()).save_pretrained(model_dir)  # GPT-2 small's default shape
    AutoTokenizer.from_pretrained(str(BUNDLED_DIR)).save_pretrained(model_dir)
    # a few bundled facts: every evaluation (tail scores, multiple choice, logit lens) and the fast
    # objective's per-row caches run on all rows of the KGs, minutes at this shape on one CPU thread
    kg = BUNDLED_DIR.parent / "kg"
    for name, src, n in (("target", "target_building", 8), ("control", "control_train", 24), ("control_val", "control_val", 8)):
        (tmp_path / f"{name}.jsonl").write_text("".join((kg / f"{src}.jsonl").read_text().splitlines(keepends=True)[:n]))
    out = tmp_path / "run"
    args = [
        "discover",
        "--model",
        str(model_dir),
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--target-batch",
        "8",
        "--control-batch",
        "8",
        "--lm-batch",
        "1",
        "--lm-block-len",
        "32",
        "--lm-eval-blocks",
        "2",
        "--control-lm",
        "bundled",
        "--target-kg",
        str(tmp_path / "target.jsonl"),
        "--control-kg",
        str(tmp_path / "control.jsonl"),
        "--control-val-kg",
        str(tmp_path / "control_val.jsonl"),
        "--out",
        str(out),
        "--no-progress",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mask"]["layers"] == list(range(6, 12)) and cfg["config"]["recipe"] == "paper"
    s = json.loads((out / "summary.json").read_text())
    assert s["selected_step"] == 2
    sub = Subnetwork.load(out)
    assert sorted(sub.logits) == sorted(
        weight_name(l, m) for l in range(6, 12) for m in MATRICES if m != "W_gate"
    )  # GPT-2: no gated MLP
    assert sub.logits["blocks.6.attn.W_Q"].shape == (12, 768, 64) and sub.logits["blocks.11.mlp.W_out"].shape == (3072, 768)
    assert s["sparsity"] == pytest.approx(sub.sparsity) and s["sparsity_all_linear"] == pytest.approx(
        1 - sub.stats.n_sub / (12 * 12 * 768 * 768)
    )
