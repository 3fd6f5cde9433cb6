"""kcs-lens sweep: the study file and its plan, the local and Ray executors, resuming after a kill,
failed cells, ``sweep status`` and the study report, on the bundled model with a few steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import requires_bundled
from typer.testing import CliRunner

from kcs_lens import Subnetwork, discover
from kcs_lens.cli.main import app
from kcs_lens.errors import ConfigError
from kcs_lens.sweep import expand, load_plan, run_sweep, status
from kcs_lens.sweep.cells import read_status

pytestmark = requires_bundled

# a few steps of the bundled model with small evaluations: seconds per cell
SHORT = dict(steps=4, eval_every=2, checkpoint_every=2, lm_eval_blocks=2, control_batch=16, lm_batch=1, lm_block_len=64)


def study_file(tmp: Path, targets=("building", "location"), seeds=(84, 1318), extra: str = "", **base) -> Path:
    settings = {**SHORT, **base}
    lines = ["[base]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["", "[grid]", f"target_kg = {json.dumps(list(targets))}", f"seed = {json.dumps(list(seeds))}", extra]
    p = tmp / "study.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def same_subnetwork(a: Path, b: Path) -> None:
    sa, sb = Subnetwork.load(a), Subnetwork.load(b)
    assert sa.logits.keys() == sb.logits.keys()
    for n in sa.logits:
        assert torch.equal(sa.logits[n], sb.logits[n]), (a, b, n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """The four cells run one by one with plain discover()."""
    d = tmp_path_factory.mktemp("ref")
    out = {}
    for t in ("building", "location"):
        for s in (84, 1318):
            out[(t, s)] = d / f"{t}-{s}"
            discover(target_kg=t, seed=s, out=out[(t, s)], log=lambda _: None, **SHORT)
    return out


@pytest.fixture(scope="module")
def local_study(tmp_path_factory) -> tuple[Path, dict]:
    """The 2 x 2 study run with the local executor and 2 worker processes."""
    d = tmp_path_factory.mktemp("study")
    res = run_sweep(study_file(d), d / "out", workers=2, log=lambda _: None)
    return d / "out", res


# --- the plan ---------------------------------------------------------------------------------
def test_plan_expansion_and_names(tmp_path):
    extra = '\n[[cells]]\ntarget_kg = "fruit"\nseed = 84\nablation = "no-sparsity"\n'
    p = study_file(tmp_path, extra=extra)
    plan = expand(p)
    names = [c.name for c in plan.cells]
    assert names == [
        "bundled/building/ablation-full/seed84",
        "bundled/building/ablation-full/seed1318",
        "bundled/location/ablation-full/seed84",
        "bundled/location/ablation-full/seed1318",
        "bundled/fruit/ablation-no-sparsity/seed84",
    ]
    assert [c.name for c in expand(p).cells] == names  # deterministic
    c = plan.cells[1].config
    # base < grid; the bundled recipe fills what the study leaves unset
    assert (c["steps"], c["seed"], c["target_kg"], c["lr"], c["recipe"]) == (4, 1318, "building", 0.1, "bundled")
    # without the extra cell nothing varies but target and seed: short names
    assert [c.name for c in expand(study_file(tmp_path)).cells][0] == "bundled/building/seed84"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[base]\nstep = 4\n", "[base] key 'step': not a discover setting"),
        ("[grid]\nseed = 84\n", "[grid] seed = 84: must be a non-empty list"),
        ("[grid]\nsteps = [4, 0]\n", "[grid] steps[1] = 0: must be an integer >= 1"),
        ('[base]\nmodel = "no/such/model"\n', "model = 'no/such/model'"),
        ("[grid]\neval_every = [3]\n[base]\ncheckpoint_every = 4\n", "must be a multiple of --eval-every"),
        ("[bsae]\nsteps = 4\n", "unknown tables ['bsae']"),
        ('[base]\ngranularity = "atom"\n', "[base] granularity = 'atom': expected one of"),
    ],
)
def test_study_errors_name_the_file_and_key(tmp_path, text, expected):
    p = tmp_path / "study.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        run_sweep(p, tmp_path / "out")
    assert str(p) in str(e.value) and expected in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()  # refused before anything ran or was written


def test_cli_dry_run_and_errors(tmp_path):
    p = study_file(tmp_path)
    r = CliRunner().invoke(app, ["sweep", str(p), "--out", str(tmp_path / "out"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "4 cells" in r.output and "bundled/location/seed1318" in r.output and '"steps": 4' in r.output
    assert not (tmp_path / "out").exists()
    r = CliRunner().invoke(app, ["sweep", "run", str(p), "--out", str(tmp_path / "o"), "--resources", "{GPU", "--executor", "ray"])
    assert r.exit_code == 2 and r.output.startswith("error: ")
    r = CliRunner().invoke(app, ["sweep", "status", str(tmp_path)])
    assert r.exit_code == 2 and "not a study directory" in r.output


def test_ray_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    r = CliRunner().invoke(app, ["sweep", str(study_file(tmp_path)), "--out", str(tmp_path / "o"), "--executor", "ray"])
    assert r.exit_code == 2
    assert r.output.strip() == "error: --executor ray needs Ray, an optional extra: pip install 'kcs-lens[ray]'"


# --- the local executor -------------------------------------------------------------------------
@pytest.mark.slow
def test_local_workers_match_separate_discover_runs(local_study, reference):
    out, res = local_study
    assert res["failed"] == [] and len(res["results"]) == 4
    assert json.loads((out / "sweep.json").read_text())["cells"][0]["name"] == "bundled/building/seed84"
    for (t, s), ref in reference.items():
        same_subnetwork(out / "bundled" / t / f"seed{s}", ref)
    # two worker processes shared the cells
    assert len({read_status(out, c)["pid"] for c in load_plan(out).cells}) == 2
    assert all(r["state"] == "done" for r in status(out))


@pytest.mark.slow
def test_rerun_skips_done_and_changed_plan_is_refused(local_study, tmp_path):
    out, _ = local_study
    again = run_sweep(study_file(tmp_path), out, log=lambda _: None)
    assert again["results"] == [] and len(again["skipped"]) == 4 and not again["changed"]
    bigger = study_file(tmp_path, seeds=(84, 1318, 735))
    with pytest.raises(ConfigError, match="plan differs .*2 new cell"):
        run_sweep(bigger, out, dry_run=True)
    res = run_sweep(bigger, out, add=True, dry_run=True)
    assert [c.name for c in res["plan"].cells][-2:] == ["bundled/building/seed735", "bundled/location/seed735"]
    with pytest.raises(ConfigError, match="--add cannot remove or change"):
        run_sweep(study_file(tmp_path, steps=6), out, add=True, dry_run=True)
    assert len(run_sweep(study_file(tmp_path, steps=6), out, force=True, dry_run=True)["plan"].cells) == 4


@pytest.mark.slow
def test_failed_cell_is_recorded_and_retried(tmp_path):
    p = study_file(tmp_path, targets=("building", "no-such-kg"), seeds=(84,))
    r = CliRunner().invoke(app, ["sweep", str(p), "--out", str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 3, r.output
    assert "failed" in r.output and "bundled/no-such-kg/seed84" in r.output
    rows = {x["cell"]: x for x in status(tmp_path / "out")}
    assert rows["bundled/building/seed84"]["state"] == "done"
    bad = rows["bundled/no-such-kg/seed84"]
    assert bad["state"] == "failed" and "no-such-kg" in bad["error"] and bad["attempt"] == 1
    r = CliRunner().invoke(app, ["sweep", "status", str(tmp_path / "out")])
    assert r.exit_code == 0 and "failed" in r.output and "1 done, 1 failed" in r.output
    res = run_sweep(p, tmp_path / "out", log=lambda _: None)  # a rerun tries the failed cell again, not the done one
    assert [x["name"] for x in res["results"]] == ["bundled/no-such-kg/seed84"]
    assert read_status(tmp_path / "out", load_plan(tmp_path / "out").cells[1])["attempt"] == 2
    # the study report lists the failed cell instead of dropping it
    from kcs_lens.sweep.study import study_report

    study_report(tmp_path / "out", draws=1, log=lambda _: None)
    md = (tmp_path / "out" / "study.md").read_text()
    assert "## Cells not finished" in md and "| bundled/no-such-kg/seed84 | failed |" in md
    assert "| bundled/no-such-kg | 0/1 |" in md


@pytest.mark.slow
def test_killed_sweep_resumes_bit_identical(tmp_path):
    """SIGKILL the sweep's worker (here the sweep process itself: one worker) after a cell's first
    checkpoint; `sweep status` says interrupted; a rerun resumes it and ends as an uninterrupted run."""
    long = dict(steps=24, eval_every=3, checkpoint_every=3)
    p = study_file(tmp_path, targets=("building",), seeds=(84,), **long)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kcs_lens.cli.main", "sweep", str(p), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "bundled" / "building" / "seed84" / "checkpoints" / "state.pt"
    try:
        deadline = time.time() + 240
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert state.exists(), "the cell never reached a checkpoint"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    row = status(out)[0]
    assert row["state"] == "interrupted" and row["step"] < 24, row
    res = run_sweep(p, out, log=lambda _: None)
    assert res["failed"] == [] and res["results"][0]["resumed_from"] >= 3
    ref = tmp_path / "ref"
    discover(target_kg="building", seed=84, out=ref, log=lambda _: None, **{**SHORT, **long})
    same_subnetwork(out / "bundled" / "building" / "seed84", ref)
    m = [json.loads(x)["step"] for x in (out / "bundled/building/seed84/metrics.jsonl").read_text().splitlines()]
    assert m == list(range(3, 25, 3))


# --- the Ray executor ---------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_matches_discover_and_retries_a_killed_worker(tmp_path, reference):
    """Ray on this machine (2 CPUs): the 2 x 2 study gives the discover() subnetworks; a task whose
    worker is SIGKILLed mid-cell is retried by Ray and resumes from the cell's checkpoint."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "out"
        p = study_file(tmp_path)
        res = run_sweep(p, out, executor="ray", max_retries=1, log=lambda _: None)
        assert res["failed"] == []
        for (t, s), ref in reference.items():
            same_subnetwork(out / "bundled" / t / f"seed{s}", ref)
        # a longer cell, its worker killed after the first checkpoint
        long = dict(steps=30, eval_every=3, checkpoint_every=3)
        p2 = study_file(tmp_path, targets=("building",), seeds=(84,), **long)
        out2 = tmp_path / "out2"
        box: dict = {}
        th = threading.Thread(target=lambda: box.update(run_sweep(p2, out2, executor="ray", max_retries=1, log=lambda _: None)))
        th.start()
        state = out2 / "bundled" / "building" / "seed84" / "checkpoints" / "state.pt"
        deadline = time.time() + 240
        while not state.exists() and time.time() < deadline:
            time.sleep(0.2)
        cell = load_plan(out2).cells[0]
        pid = read_status(out2, cell)["pid"]
        os.kill(pid, signal.SIGKILL)
        th.join(timeout=600)
        r = box["results"][0]
        assert r["state"] == "done" and r["attempt"] == 2 and r["resumed_from"] >= 3, r
        ref = tmp_path / "ref"
        discover(target_kg="building", seed=84, out=ref, log=lambda _: None, **{**SHORT, **long})
        same_subnetwork(out2 / "bundled" / "building" / "seed84", ref)
    finally:
        ray.shutdown()


# --- the study report ---------------------------------------------------------------------------
@pytest.mark.slow
def test_study_report(local_study, tmp_path):
    out, _ = local_study
    plan = json.loads((out / "sweep.json").read_text())
    r = CliRunner().invoke(app, ["report", str(out), "--draws", "1"])
    assert r.exit_code == 0, r.output
    md = (out / "study.md").read_text()
    assert "| bundled/building | 2/2 |" in md and "| bundled/location | 2/2 |" in md
    assert "Jaccard" in md and "union" in md and "## Per run" in md
    for f in ("study.csv", "study.json", "study-density.png", "study-tradeoff.png"):
        assert (out / f).stat().st_size > 0, f
    js = json.loads((out / "study.json").read_text())
    g = next(x for x in js["groups"] if x["group"] == "bundled/building")
    assert g["n_seeds"] == 2 and 0 < g["overlap"]["jaccard_mean"] <= 1
    assert g["overlap"]["union"]["sparsity"] <= min(x["sparsity"] for x in js["runs"] if x["group"] == "bundled/building")
    rows = (out / "study.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 + 2 and rows[0].startswith("group,cell,n_seeds")
    assert len(plan["cells"]) == 4
