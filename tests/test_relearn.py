"""Relearning (kcs_lens.evaluation.relearn): finetuning on ControlKG sentences keeps the removed
weights at zero, moves the model, and is reported for the original and the remaining model."""

from __future__ import annotations

import json

import pytest
import torch
from _eval_fixtures import cli, write_run

from kcs_lens.discovery.rundir import load_run
from kcs_lens.errors import RunError
from kcs_lens.evaluation.evaluate import Evaluator, evaluate_run
from kcs_lens.evaluation.relearn import relearn, relearn_model

pytest_plugins = ["_eval_fixtures"]


def test_removed_weights_stay_zero_and_the_model_moves(tmp_path, tiny_lm, tiny_kg, tiny_model_dir):
    run = write_run(tmp_path / "r", tiny_lm, tiny_kg, tiny_model_dir, density=0.2)
    info = load_run(run)
    ev = Evaluator(info, lens_model=tiny_lm, log=lambda m: None)
    sub = info.subnetwork
    names = list(sub.binary())
    before_w = {n: tiny_lm.weight(n) for n in names}
    seen = {}

    def inspect(lm):  # the finetuned remaining model: effective weights (parametrized) of every masked matrix
        for n in names:
            site = lm.site(n)
            seen[n] = site.from_native(getattr(site.module, site.attr).detach()).clone()

    r = relearn_model(ev, sub, steps=5, lr=1e-2, batch_size=4, seed=0, inspect=inspect)
    moved = False
    for n, m in sub.binary().items():
        assert torch.all(seen[n][m.expand_as(seen[n])] == 0), n  # removed: exactly zero after every step
        moved |= not torch.allclose(seen[n][~m.expand_as(seen[n])], before_w[n][~m.expand_as(seen[n])])
    assert moved and r["loss_last"] < r["loss_first"]
    for n in names:  # the model is restored afterwards
        assert torch.equal(tiny_lm.weight(n), before_w[n])
    assert ev.metrics_now()["target"]["ppl"] == pytest.approx(ev.original["target"].ppl)


def test_relearn_reports_both_models(tmp_path, tiny_lm, tiny_kg, tiny_model_dir):
    run = write_run(tmp_path / "r", tiny_lm, tiny_kg, tiny_model_dir, density=0.2)
    res = evaluate_run(run, lens_model=tiny_lm, log=lambda m: None, relearn_steps=4, relearn_lr=1e-2)
    r = res["relearn"]
    assert r["steps"] == 4 and "no TargetKG fact" in r["data"]
    for v in ("original", "remaining"):
        assert r[v]["before"]["target"]["ppl"] == pytest.approx(res["metrics"][v]["target"]["ppl"])
        assert r[v]["after"]["target"]["ppl"] != pytest.approx(r[v]["before"]["target"]["ppl"])  # the metric moves
        assert {"top1", "mc"} <= set(r[v]["after"]["target"])
    rec, o, rem = r["recovered"], r["original"]["before"]["target"], r["remaining"]
    if rec["mc"] is not None:
        assert rec["mc"] == pytest.approx(
            (rem["after"]["target"]["mc"] - rem["before"]["target"]["mc"]) / (o["mc"] - rem["before"]["target"]["mc"])
        )
    assert json.loads((run / "evaluation.json").read_text())["relearn"]["steps"] == 4
    with pytest.raises(RunError, match="--relearn must be at least 1"):
        relearn(Evaluator(load_run(run), lens_model=tiny_lm, log=lambda m: None), load_run(run).subnetwork, 0)


def test_cli_relearn(tmp_path, tiny_lm, tiny_kg, tiny_model_dir):
    run = write_run(tmp_path / "r", tiny_lm, tiny_kg, tiny_model_dir, density=0.2)
    r = cli("evaluate", run, "--relearn", 2, "--relearn-lr", 0.01)
    assert r.exit_code == 0, r.output
    assert "relearning (2 steps)" in r.output and "recovered" in r.output and " → " in r.output


def test_report_shows_relearning(tmp_path, tiny_lm, tiny_kg, tiny_model_dir):
    from kcs_lens.evaluation.paper_report import report_runs
    from kcs_lens.evaluation.paper_table import RowSettings

    run = write_run(tmp_path / "runs" / "r", tiny_lm, tiny_kg, tiny_model_dir, density=0.2)
    res = report_runs([run], tmp_path / "rep", RowSettings(draws=1, relearn=2, lens_model=tiny_lm, log=lambda m: None))
    row = res["rows"][0]
    ev = json.loads((run / "evaluation.json").read_text())
    assert row["relearn_steps"] == 2
    assert row["relearn_mc_remaining_target"] == ev["relearn"]["remaining"]["after"]["target"]["mc"]
    assert "MC TargetKG after relearning" in (tmp_path / "rep.md").read_text()
