"""kcs-lens overlap (seed combinations) and report (the paper's table, ablations, density plot)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from _eval_fixtures import cli, write_run

from kcs_lens.discovery.rundir import load_run
from kcs_lens.errors import RunError, SubnetworkError
from kcs_lens.evaluation.evaluate import evaluate_run
from kcs_lens.evaluation.overlap import overlap_runs
from kcs_lens.evaluation.paper_report import report_runs
from kcs_lens.evaluation.paper_table import RowSettings

pytest_plugins = ["_eval_fixtures"]  # fixtures tiny_lm, real_run (shared by the session)


@pytest.fixture
def seeds(tmp_path, tiny_lm, tiny_kg, tiny_model_dir):
    """Three overlapping 'seeds' of one TargetKG."""
    first = write_run(tmp_path / "s0", tiny_lm, tiny_kg, tiny_model_dir, seed=0, density=0.1)
    base = load_run(first).subnetwork.logits
    return [first] + [
        write_run(tmp_path / f"s{i}", tiny_lm, tiny_kg, tiny_model_dir, seed=i, density=0.1, base=base) for i in (1, 2)
    ]


def test_overlap_combinations_and_statistics(tmp_path, seeds, tiny_lm):
    res = overlap_runs(seeds, out=tmp_path / "combos", evaluate=True, lens_model=tiny_lm, log=lambda m: None)
    subs = [load_run(r).subnetwork.full_binary() for r in seeds]
    names = list(subs[0])
    votes = {n: torch.stack([s[n] for s in subs]).sum(0) for n in names}
    count = lambda k: sum(int((v >= k).sum()) for v in votes.values())
    assert [res["combinations"][c]["n_in_subnetwork"] for c in ("union", "at-least-2-of-3", "intersection")] == [
        count(1),
        count(2),
        count(3),
    ]
    assert count(1) > count(2) > count(3) > 0
    inter = sum(int((subs[0][n] & subs[1][n]).sum()) for n in names)
    union = sum(int((subs[0][n] | subs[1][n]).sum()) for n in names)
    jac = res["overlap"]["jaccard"]
    assert jac[0][1] == pytest.approx(inter / union) and jac[1][0] == jac[0][1] and jac[2][2] == 1.0
    assert res["overlap"]["all"]["jaccard_all"] == pytest.approx(count(3) / count(1))
    assert set(res["overlap"]["per_layer"]) == {"2", "3"} and set(res["overlap"]["per_matrix"]) == {
        "W_Q",
        "W_K",
        "W_V",
        "W_O",
        "W_in",
        "W_out",
    }
    assert sum(d["n_intersection"] for d in res["overlap"]["per_layer"].values()) == count(3)
    m = res["combinations"]
    assert m["union"]["metrics"]["remaining"]["target"]["dppl"] != m["intersection"]["metrics"]["remaining"]["target"]["dppl"]
    # each combination is a run directory that evaluates like a run
    for c in ("union", "at-least-2-of-3", "intersection"):
        info = load_run(tmp_path / "combos" / c)
        assert info.subnetwork.stats.n_sub == m[c]["n_in_subnetwork"]
    ev = evaluate_run(tmp_path / "combos" / "intersection", lens_model=tiny_lm, save=False)
    assert ev["metrics"]["remaining"]["target"]["ppl"] == pytest.approx(
        m["intersection"]["metrics"]["remaining"]["target"]["ppl"]
    )
    assert json.loads((tmp_path / "combos" / "overlap.json").read_text())["combinations"]["union"]["k"] == 1


def test_overlap_refuses_incompatible_runs(tmp_path, seeds, tiny_lm, tiny_kg, tiny_model_dir, tiny_tokenizer):
    from conftest import tiny_hf_model

    from kcs_lens.model.loading import load_model

    layers = write_run(tmp_path / "layers", tiny_lm, tiny_kg, tiny_model_dir, layers="1-3")
    with pytest.raises(SubnetworkError, match="layers"):
        overlap_runs([seeds[0], layers])
    gran = write_run(tmp_path / "gran", tiny_lm, tiny_kg, tiny_model_dir, granularity="row")
    with pytest.raises(SubnetworkError, match="granularity"):
        overlap_runs([seeds[0], gran])
    other_dir = tmp_path / "other_model"
    tiny_hf_model(tiny_tokenizer, seed=5).save_pretrained(other_dir)
    tiny_tokenizer.save_pretrained(other_dir)
    other = write_run(tmp_path / "other", load_model(str(other_dir)), tiny_kg, other_dir)
    with pytest.raises(SubnetworkError, match="same model"):
        overlap_runs([seeds[0], other])
    with pytest.raises(RunError, match="at least two"):
        overlap_runs(seeds[:1])
    (tmp_path / "taken").mkdir()
    with pytest.raises(RunError, match="exists"):
        overlap_runs(seeds, out=tmp_path / "taken")
    assert list((tmp_path / "taken").iterdir()) == [] and not list(tmp_path.glob(".taken*"))
    r = cli("overlap", seeds[0], layers)
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1


def test_report_table_means_ablations_and_files(tmp_path, tiny_lm, tiny_kg, tiny_model_dir):
    t2 = tmp_path / "target2.jsonl"
    rows = [json.loads(l) for l in tiny_kg["control"].read_text().splitlines()[-5:]]
    t2.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = tmp_path / "runs"
    for target, name, seed in ((tiny_kg["target"], "A", 0), (tiny_kg["target"], "A", 1), (t2, "B", 0)):
        write_run(runs / f"{name}-{seed}", tiny_lm, tiny_kg, tiny_model_dir, seed=seed, density=0.02, target_kg=str(target))
    write_run(
        runs / "A-0-nokg",
        tiny_lm,
        tiny_kg,
        tiny_model_dir,
        seed=0,
        density=0.04,
        target_kg=str(tiny_kg["target"]),
        ablation="no-control-kg",
    )
    res = report_runs([runs], tmp_path / "out" / "report.md", RowSettings(draws=1, lens_model=tiny_lm, log=lambda m: None))
    table = res["rows"]
    assert [(r["target_kg"] == str(t2), r["seed"]) for r in table] == [
        (False, "0"),
        (False, "1"),
        (False, "mean"),
        (True, "0"),
        (False, "0"),
    ]
    assert table[-1]["ablation"] == "no-control-kg"
    mean, a0, a1 = table[2], table[0], table[1]
    for k in ("sparsity", "dppl_target", "dppl_control", "dppl_lm", "random_dppl_target"):
        assert mean[k] == pytest.approx((a0[k] + a1[k]) / 2)
    ev = json.loads((runs / "A-0" / "evaluation.json").read_text())
    assert a0["dppl_target"] == pytest.approx(ev["metrics"]["remaining"]["target"]["dppl"])
    base = json.loads((runs / "A-0" / "baseline.json").read_text())
    assert a0["random_dppl_lm"] == pytest.approx(base["baseline"]["mean"]["metrics"]["remaining"]["lm"]["dppl"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert (
        "| full | " in md
        and "**mean**" in md
        and "Loss ablations" in md
        and "random dPPL TargetKG" in md
        and "Checkpoint selection" not in md
    )
    with open(tmp_path / "out" / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # runs of another model (same spec name, other weights) get their own table
    import shutil

    shutil.copytree(runs / "B-0", tmp_path / "other" / "B-0")
    cfg = json.loads((tmp_path / "other" / "B-0" / "config.json").read_text())
    (tmp_path / "other" / "B-0" / "config.json").write_text(json.dumps({**cfg, "model_fingerprint": "f" * 32}))
    for f in ("evaluation.json", "baseline.json"):  # pretend they were computed on that model
        d = json.loads((runs / "B-0" / f).read_text())
        (tmp_path / "other" / "B-0" / f).write_text(json.dumps({**d, "model_fingerprint": "f" * 32}))
    from kcs_lens.masks.subnetwork import Subnetwork

    sub = Subnetwork.load(runs / "B-0")
    sub.meta["model_fingerprint"] = "f" * 32
    sub.save(tmp_path / "other" / "B-0" / "subnetwork.safetensors")
    two = report_runs(
        [runs, tmp_path / "other"], tmp_path / "two", RowSettings(draws=1, log=lambda m: pytest.fail(f"recomputed: {m}"))
    )
    assert (tmp_path / "two.md").read_text().count("## Model") == 2 and len(two["rows"]) == 6
    # a second report reuses the saved evaluations (no model needed, files untouched)
    stamp = (runs / "A-0" / "baseline.json").stat().st_mtime_ns
    again = report_runs([runs], tmp_path / "out" / "report2", RowSettings(draws=1, log=lambda m: pytest.fail(f"recomputed: {m}")))
    assert again["rows"][0]["dppl_target"] == a0["dppl_target"] and (runs / "A-0" / "baseline.json").stat().st_mtime_ns == stamp
    # the answers beside the PPLs: top-1 and mean rank of the tail, original -> remaining, from evaluation.json
    assert a0["top1_remaining_target"] == ev["metrics"]["remaining"]["target"]["top1"]
    assert a0["rank_original_control"] == ev["metrics"]["original"]["control"]["rank_mean"]
    assert mean["top1_remaining_target"] == pytest.approx((a0["top1_remaining_target"] + a1["top1_remaining_target"]) / 2)
    assert "top-1 TargetKG (original → remaining)" in md and "rank TargetKG (original → remaining)" in md
    assert f"{a0['top1_original_target']:.2f} → {a0['top1_remaining_target']:.2f}" in md
    with open(tmp_path / "out" / "report.csv") as f:
        assert {"top1_remaining_target", "mc_remaining_target", "mc_random_target"} <= set(next(csv.reader(f)))
    # multiple choice beside them, with the random baseline's mean (baseline.json)
    assert a0["mc_remaining_target"] == ev["metrics"]["remaining"]["target"]["mc"]
    assert a0["mc_random_target"] == base["baseline"]["mean"]["metrics"]["remaining"]["target"]["mc"]
    assert a0["mc_chance_target"] == pytest.approx(0.2)
    assert "### Removal in other formats" in md and "MC TargetKG (original → remaining)" in md
    assert f"{a0['mc_original_target']:.2f} → {a0['mc_remaining_target']:.2f} [{a0['mc_random_target']:.2f}]" in md
    # an evaluation.json written before the ranks existed: its cells read "-", the mean uses the others
    for v in ev["metrics"].values():
        for m in v.values():
            m.pop("rank_mean", None)
    (runs / "A-0" / "evaluation.json").write_text(json.dumps(ev))
    old = report_runs([runs], tmp_path / "old", RowSettings(draws=1, log=lambda m: pytest.fail(f"recomputed: {m}")))
    assert old["rows"][0]["rank_remaining_target"] is None and "- → -" in (tmp_path / "old.md").read_text()
    assert old["rows"][2]["rank_remaining_target"] == a1["rank_remaining_target"]


def test_cli_overlap_and_report(tmp_path, seeds):
    r = cli("overlap", *seeds, "--out", tmp_path / "c")
    assert r.exit_code == 0, r.output
    assert "Jaccard" in r.output and "intersection" in r.output and (tmp_path / "c" / "union" / "subnetwork.safetensors").exists()
    r = cli("report", seeds[0], "--out", tmp_path / "rep", "--draws", 1)
    assert r.exit_code == 0, r.output
    assert "| full |" in r.output and (tmp_path / "rep.csv").exists()
    r = cli("report", tmp_path / "missing", "--out", tmp_path / "rep")
    assert r.exit_code == 2 and "no such run directory" in r.output


def test_report_warns_about_mixed_configurations():
    from kcs_lens.evaluation.paper_report import config_note

    rows = [{"config": {"seed": s, "target_kg": "a", "lr": lr, "steps": 250}} for s, lr in ((1, 0.1), (2, 0.2))] + [
        {"seed": "mean"}
    ]
    assert "lr (0.1, 0.2)" in config_note(rows)[-1] and "steps" not in config_note(rows)[-1]
    assert config_note(rows[:1]) == []
