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
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import requires_bundled, tiny_run_kwargs
from typer.testing import CliRunner

from kcs_lens import Subnetwork, discover
from kcs_lens.cli.main import app
from kcs_lens.discovery.config import DiscoveryConfig
from kcs_lens.errors import ConfigError
from kcs_lens.sweep import expand, load_plan, run_sweep, status
from kcs_lens.sweep.cells import read_status

# a few steps of the bundled model with small evaluations: seconds per cell
SHORT = dict(steps=4, eval_every=2, checkpoint_every=2, lm_eval_blocks=2, control_batch=16, lm_batch=1, lm_block_len=64)

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical comparisons across processes


def study_file(tmp: Path, targets=("building", "location"), seeds=(84, 1318), extra: str = "", **base) -> Path:
    settings = {**SHORT, **base} if "model" not in base else base
    lines = ["[base]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["", "[grid]", f"target_kg = {json.dumps(list(targets))}", f"seed = {json.dumps(list(seeds))}", extra]
    p = tmp / "study.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


def tiny_study(tmp: Path, tiny_kg, model_dir, targets=("target", "target2"), seeds=(84, 1318), **over) -> Path:
    """A study of the tiny model (conftest) over TargetKG files in ``tmp``: fast enough to run."""
    second = tmp / "target2.jsonl"
    if not second.exists():
        rows = [json.loads(x) for x in tiny_kg["target"].read_text().splitlines()]
        second.write_text(
            "\n".join(json.dumps({**r, "head": r["head"] + "x", "text": r["text"].replace(" is", "x is")}) for r in rows) + "\n"
        )
    files = {"target": str(tiny_kg["target"]), "target2": str(second)}
    kw = {k: v for k, v in tiny_run_kwargs(tiny_kg, model_dir).items() if k != "target_kg"} | over
    return study_file(tmp, targets=tuple(files[t] for t in targets), seeds=seeds, **kw)


def tiny_discover(tmp: Path, study: Path, target: str, seed: int, out: Path) -> None:
    """The cell run alone with plain discover(), settings from the study's [base]."""
    from kcs_lens.files import read_mapping

    base = read_mapping(study, what="study", error=ConfigError)["base"]
    discover(**{**base, "target_kg": target, "seed": seed}, out=out, log=lambda _: None)


def same_subnetwork(a: Path, b: Path) -> None:
    sa, sb = Subnetwork.load(a), Subnetwork.load(b)
    assert sa.logits.keys() == sb.logits.keys()
    for n in sa.logits:
        assert torch.equal(sa.logits[n], sb.logits[n]), (a, b, n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_kg, tiny_model_dir) -> tuple[Path, Path]:
    """A folder with the 2 x 2 tiny study file."""
    d = tmp_path_factory.mktemp("tinystudy")
    return d, tiny_study(d, tiny_kg, tiny_model_dir)


def cell_dir(out: Path, study: Path, target: str, seed: int) -> Path:
    plan = load_plan(out)
    return out / next(c.name for c in plan.cells if Path(c.config["target_kg"]).stem == target and c.config["seed"] == seed)


@pytest.fixture(scope="module")
def reference(tiny_dir) -> dict[tuple[str, int], Path]:
    """The four cells run one by one with plain discover()."""
    d, study = tiny_dir
    out = {}
    for c in expand(study).cells:
        key = (Path(c.config["target_kg"]).stem, c.config["seed"])
        out[key] = d / "ref" / f"{key[0]}-{key[1]}"
        tiny_discover(d, study, c.config["target_kg"], key[1], out[key])
    return out


@pytest.fixture(scope="module")
def local_study(tiny_dir) -> tuple[Path, dict]:
    """The 2 x 2 study run with the local executor and 2 worker processes."""
    d, study = tiny_dir
    res = run_sweep(study, d / "out", workers=2, log=lambda _: None)
    return d / "out", res


# --- the plan ---------------------------------------------------------------------------------
@requires_bundled
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


@requires_bundled
@pytest.mark.parametrize(
    "text, expected",
    [
        ("[base]\nstep = 4\n", "[base] key 'step': not a discover setting"),
        ("[grid]\nseed = 84\n", "[grid] seed = 84: must be a non-empty list"),
        ("[grid]\nsteps = [4, 0]\n", "[grid] steps[1] = 0: must be an integer"),
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


@requires_bundled
def test_cli_dry_run_and_errors(tmp_path):
    p = study_file(tmp_path)
    r = CliRunner().invoke(app, ["sweep", str(p), "--out", str(tmp_path / "out"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "4 cells" in r.output and "bundled/location/seed1318" in r.output and '"steps": 4' in r.output
    assert not (tmp_path / "out").exists()
    # every cell's name, then its full config: every setting, as the plan holds it
    lines = r.output.splitlines()
    for c in expand(p).cells:
        printed = json.loads(lines[lines.index(c.name) + 1])
        assert printed == c.config and set(printed) == {f.name for f in fields(DiscoveryConfig)}
    building = json.loads(lines[lines.index("bundled/building/seed84") + 1])
    assert (building["model"], building["target_kg"], building["lr"]) == ("bundled", "building", 0.1)
    r = CliRunner().invoke(
        app, ["sweep", "run", str(p), "--out", str(tmp_path / "o"), "--resources", "{GPU", "--executor", "ray"]
    )
    assert r.exit_code == 2 and r.output.startswith("error: ")
    r = CliRunner().invoke(app, ["sweep", "status", str(tmp_path)])
    assert r.exit_code == 2 and "not a study directory" in r.output


@requires_bundled
def test_ray_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    r = CliRunner().invoke(app, ["sweep", str(study_file(tmp_path)), "--out", str(tmp_path / "o"), "--executor", "ray"])
    assert r.exit_code == 2
    assert r.output.strip() == "error: --executor ray needs Ray, an optional extra: pip install 'kcs-lens[ray]'"


# --- the local executor -------------------------------------------------------------------------
@pytest.mark.slow
def test_local_workers_match_separate_discover_runs(local_study, reference, tiny_dir):
    out, res = local_study
    assert res["failed"] == [] and len(res["results"]) == 4
    names = [c["name"] for c in json.loads((out / "sweep.json").read_text())["cells"]]
    assert names[0].endswith("/target/seed84") and names[3].endswith("/target2/seed1318")
    for (t, s), ref in reference.items():
        same_subnetwork(cell_dir(out, tiny_dir[1], t, s), ref)
    # two worker processes shared the cells
    assert len({read_status(out, c)["pid"] for c in load_plan(out).cells}) == 2
    assert all(r["state"] == "done" for r in status(out))


@pytest.mark.slow
def test_rerun_skips_done_and_changed_plan_is_refused(local_study, tiny_dir, tiny_kg, tiny_model_dir, tmp_path):
    out, _ = local_study
    d, study = tiny_dir
    again = run_sweep(study, out, log=lambda _: None)
    assert again["results"] == [] and len(again["skipped"]) == 4 and not again["changed"]
    bigger = tiny_study(d, tiny_kg, tiny_model_dir, seeds=(84, 1318, 735))
    try:
        with pytest.raises(ConfigError, match="plan differs .*2 new cell"):
            run_sweep(bigger, out, dry_run=True)
        res = run_sweep(bigger, out, add=True, dry_run=True)
        assert [c.name.rsplit("/", 2)[1:] for c in res["plan"].cells][-2:] == [["target", "seed735"], ["target2", "seed735"]]
        changed = tiny_study(d, tiny_kg, tiny_model_dir, steps=6)
        with pytest.raises(ConfigError, match="--add cannot remove or change"):
            run_sweep(changed, out, add=True, dry_run=True)
        assert len(run_sweep(changed, out, force=True, dry_run=True)["plan"].cells) == 4
    finally:
        tiny_study(d, tiny_kg, tiny_model_dir)  # the module's study file as it was


def test_failed_cell_is_recorded_and_retried(tmp_path, tiny_kg, tiny_model_dir):
    p = tiny_study(tmp_path, tiny_kg, tiny_model_dir, targets=("target",), seeds=(84,))
    p.write_text(p.read_text().replace("target_kg = [", 'target_kg = ["no-such-kg", '))
    r = CliRunner().invoke(app, ["sweep", str(p), "--out", str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 3, r.output
    assert "1 failed" in r.output and "no-such-kg/seed84" in r.output
    rows = {x["cell"].split("/", 1)[1]: x for x in status(tmp_path / "out")}
    assert rows["target/seed84"]["state"] == "done"
    bad = rows["no-such-kg/seed84"]
    assert bad["state"] == "failed" and "no-such-kg" in bad["error"] and bad["attempt"] == 1
    r = CliRunner().invoke(app, ["sweep", "status", str(tmp_path / "out")])
    assert r.exit_code == 0 and "failed" in r.output and "1 failed, 1 done" in r.output, r.output
    res = run_sweep(p, tmp_path / "out", log=lambda _: None)  # a rerun tries the failed cell again, not the done one
    assert [x["name"].split("/", 1)[1] for x in res["results"]] == ["no-such-kg/seed84"]
    assert read_status(tmp_path / "out", load_plan(tmp_path / "out").cells[0])["attempt"] == 2
    # the study report lists the failed cell instead of dropping it
    from kcs_lens.evaluation.paper_table import RowSettings
    from kcs_lens.sweep.study import study_report

    study_report(tmp_path / "out", settings=RowSettings(draws=1, log=lambda _: None))
    md = (tmp_path / "out" / "study.md").read_text()
    assert "## Cells not finished" in md and "no-such-kg/seed84 | failed |" in md
    assert "/no-such-kg | 0/1 |" in md


LONG = dict(steps=36, eval_every=6, checkpoint_every=6)


def wait_for(path: Path, alive=lambda: True, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists() and alive() and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


@pytest.mark.slow
def test_threads_option_gives_byte_identical_subnetworks(tmp_path, tiny_kg, tiny_model_dir):
    """docs/study.md's commands: with --threads 1 and no OMP_NUM_THREADS, a sweep in-process, a
    sweep with 2 worker processes and `discover --threads 1` on a cell's config write the same
    subnetwork.safetensors bytes, and each summary.json says it ran on 1 thread."""
    p = tiny_study(tmp_path, tiny_kg, tiny_model_dir, targets=("target",), seeds=(84, 1318))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # what a user's shell has
    kcs = [sys.executable, "-m", "kcs_lens.cli.main"]
    runs = {"in-process": ["--threads", "1"], "2 workers": ["--workers", "2", "--threads", "1"]}
    for name, extra in runs.items():
        cmd = kcs + ["sweep", str(p), "--out", str(tmp_path / name), "--no-progress", *extra]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    cells = load_plan(tmp_path / "in-process").cells
    cfg = tmp_path / "cell.json"
    cfg.write_text(json.dumps(cells[0].config))
    cmd = kcs + ["discover", "--config", str(cfg), "--threads", "1", "--out", str(tmp_path / "alone"), "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for c in cells:
        dirs = [tmp_path / name / c.name for name in runs] + ([tmp_path / "alone"] if c is cells[0] else [])
        files = [(d / "subnetwork.safetensors").read_bytes() for d in dirs]
        assert all(f == files[0] for f in files), c.name
        assert [json.loads((d / "summary.json").read_text())["torch_threads"] for d in dirs] == [1] * len(dirs)


@pytest.mark.slow
def test_killed_sweep_resumes_bit_identical(tmp_path, tiny_kg, tiny_model_dir):
    """SIGKILL the sweep's worker (here the sweep process itself: one worker) after a cell's first
    checkpoint; `sweep status` says interrupted; a rerun resumes it and ends as an uninterrupted run."""
    p = tiny_study(tmp_path, tiny_kg, tiny_model_dir, targets=("target",), seeds=(84,), **LONG)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kcs_lens.cli.main", "sweep", str(p), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(out / "sweep.json", lambda: proc.poll() is None)
        cell = load_plan(out).cells[0]
        wait_for(out / cell.name / "checkpoints" / "state.pt", lambda: proc.poll() is None)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    row = status(out)[0]
    assert row["state"] == "interrupted" and row["step"] < LONG["steps"], row
    res = run_sweep(p, out, log=lambda _: None)
    assert res["failed"] == [] and res["results"][0]["resumed_from"] >= 6
    ref = tmp_path / "ref"
    tiny_discover(tmp_path, p, cell.config["target_kg"], 84, ref)
    same_subnetwork(out / cell.name, ref)
    m = [json.loads(x)["step"] for x in (out / cell.name / "metrics.jsonl").read_text().splitlines()]
    assert m == list(range(6, LONG["steps"] + 1, 6))


@pytest.mark.slow
def test_local_worker_killed_is_replaced_and_its_cell_resumes(tmp_path, tiny_kg, tiny_model_dir):
    """Two worker processes, packs of 2 cells; the worker running the first cell of its pack is
    SIGKILLed after the cell's first checkpoint: the cell is retried (--max-retries 1) on a new
    worker and resumes from the checkpoint, and the pack's other cell, not started, still runs once."""
    p = tiny_study(tmp_path, tiny_kg, tiny_model_dir, targets=("target",), seeds=(84, 1318, 735), **LONG)
    out = tmp_path / "out"
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(run_sweep(p, out, workers=2, pack=2, max_retries=1, log=lambda _: None)))
    th.start()
    wait_for(out / "sweep.json")
    cell = load_plan(out).cells[0]
    wait_for(out / cell.name / "checkpoints" / "state.pt")
    os.kill(read_status(out, cell)["pid"], signal.SIGKILL)
    th.join(timeout=600)
    results = {x["name"]: x for x in box["results"]}
    r = results[cell.name]
    assert r["state"] == "done" and r["attempt"] == 2 and r["resumed_from"] >= 6, r
    assert box["failed"] == [] and len(results) == 3
    second = load_plan(out).cells[1]  # the killed pack's other cell
    assert results[second.name]["state"] == "done" and results[second.name]["attempt"] == 1, results[second.name]
    ref = tmp_path / "ref"
    tiny_discover(tmp_path, p, cell.config["target_kg"], 84, ref)
    same_subnetwork(out / cell.name, ref)


# --- packs: several cells of one model per worker process ---------------------------------------
@pytest.mark.slow
def test_packed_cells_match_separate_discover_runs(reference, tiny_dir):
    """--pack 2 with 2 workers: each worker runs the two seeds of one TargetKG in one process
    (shared model, data, original evaluation, per-row caches) and gets the masks of discover() alone."""
    d, study = tiny_dir
    out = d / "out-packed"
    res = run_sweep(study, out, workers=2, pack=2, log=lambda _: None)
    assert res["failed"] == [] and len(res["results"]) == 4
    for (t, s), ref in reference.items():
        same_subnetwork(cell_dir(out, study, t, s), ref)
        a, b = (json.loads((p / "summary.json").read_text()) for p in (cell_dir(out, study, t, s), ref))
        assert {k: a[k] for k in ("selected_step", "original", "remaining")} == {
            k: b[k] for k in ("selected_step", "original", "remaining")
        }
    pid = {c.name: read_status(out, c)["pid"] for c in load_plan(out).cells}
    by_target = {t: {pid[str(cell_dir(out, study, t, s).relative_to(out))] for s in (84, 1318)} for t in ("target", "target2")}
    assert all(len(p) == 1 for p in by_target.values()) and by_target["target"] != by_target["target2"], by_target


def test_shared_inputs_are_shared_and_change_nothing(reference, tiny_dir, tmp_path):
    """Two seeds of one TargetKG through one SharedInputs: the second run loads no data, evaluates
    no original model and fills no per-row cache, and both end with discover()'s masks alone."""
    from kcs_lens.discovery.shared import SharedInputs
    from kcs_lens.files import read_mapping
    from kcs_lens.model.loading import load_model

    d, study = tiny_dir
    base = read_mapping(study, what="study", error=ConfigError)["base"]
    target = next(c.config["target_kg"] for c in expand(study).cells if Path(c.config["target_kg"]).stem == "target")
    shared = SharedInputs(load_model(base["model"]))
    for seed in (84, 1318):
        discover(**{**base, "target_kg": target, "seed": seed}, out=tmp_path / str(seed), shared=shared, log=lambda _: None)
        same_subnetwork(tmp_path / str(seed), reference[("target", seed)])
    assert shared.misses == {"original": 3, "objective_caches": 1}, shared.misses
    assert shared.hits == {"original": 3, "objective_caches": 1}, shared.hits
    assert len(shared._loaded) == 4  # TargetKG, ControlKG, ControlLM train and held-out blocks, loaded once


# --- the Ray executor ---------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_matches_discover_and_retries_a_killed_worker(tmp_path, reference, tiny_dir, tiny_kg, tiny_model_dir):
    """Ray on this machine (2 CPUs): the 2 x 2 study in packs of 2 cells gives the discover() subnetworks; a task whose
    worker is SIGKILLed mid-cell is retried by Ray and resumes from the cell's checkpoint. A sweep that started Ray
    shuts it down when it ends; one that found this process connected leaves it connected."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    out = tmp_path / "out"
    res = run_sweep(tiny_dir[1], out, executor="ray", max_retries=1, pack=2, log=lambda _: None)  # 2 tasks of 2 cells
    assert not ray.is_initialized()  # the sweep started Ray on this machine and stopped it
    assert res["failed"] == [] and len(res["results"]) == 4
    for (t, s), ref in reference.items():
        same_subnetwork(cell_dir(out, tiny_dir[1], t, s), ref)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # not another test's cluster
    try:
        res = run_sweep(tiny_dir[1], out, executor="ray", log=lambda _: None)  # all done: nothing to run
        assert ray.is_initialized() and res["skipped"] and not res["results"]
        # a longer cell, its worker killed after the first checkpoint
        p2 = tiny_study(tmp_path, tiny_kg, tiny_model_dir, targets=("target",), seeds=(84,), **LONG)
        out2 = tmp_path / "out2"
        box: dict = {}
        th = threading.Thread(target=lambda: box.update(run_sweep(p2, out2, executor="ray", max_retries=1, log=lambda _: None)))
        th.start()
        wait_for(out2 / "sweep.json")
        cell = load_plan(out2).cells[0]
        wait_for(out2 / cell.name / "checkpoints" / "state.pt")
        os.kill(read_status(out2, cell)["pid"], signal.SIGKILL)
        th.join(timeout=600)
        r = box["results"][0]
        assert r["state"] == "done" and r["attempt"] == 2 and r["resumed_from"] >= 6, r
        ref = tmp_path / "ref"
        tiny_discover(tmp_path, p2, cell.config["target_kg"], 84, ref)
        same_subnetwork(out2 / cell.name, ref)
    finally:
        ray.shutdown()


# --- the study report ---------------------------------------------------------------------------
@pytest.mark.slow
def test_study_report(local_study):
    out, _ = local_study
    r = CliRunner().invoke(app, ["report", str(out), "--draws", "1"])
    assert r.exit_code == 0, r.output
    md = (out / "study.md").read_text()
    assert "/target | 2/2 |" in md and "/target2 | 2/2 |" in md
    assert "Jaccard" in md and "union" in md and "## Per run" in md
    assert "top-1 TargetKG (original → remaining)" in md and "top-1 ControlKG (original → remaining)" in md
    assert "MC TargetKG (original → remaining [random])" in md and "### Removal in other formats" in md
    for f in ("study.csv", "study.json", "study-density.png", "study-tradeoff.png"):
        assert (out / f).stat().st_size > 0, f
    js = json.loads((out / "study.json").read_text())
    g = next(x for x in js["groups"] if x["group"].endswith("/target"))
    assert g["n_seeds"] == 2 and 0 < g["overlap"]["jaccard_mean"] <= 1
    assert 0 <= g["top1_remaining_target"] <= 1 and g["rank_original_control"] is not None  # from kcs_lens.evaluation.paper_table
    assert 0 <= g["mc_remaining_target"] <= 1 and 0 <= g["mc_random_target"] <= 1
    own = [x["sparsity"] for x in js["runs"] if x["group"] == g["group"]]
    assert g["overlap"]["union"]["sparsity"] <= min(own) and g["overlap"]["intersection"]["sparsity"] >= max(own)
    rows = (out / "study.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 + 2 and rows[0].startswith("group,cell,n_seeds")
