"""``kcs-lens sweep --executor ray --ray-address`` on a real multi-node Ray cluster on one machine
(issue 28): Ray's own ``ray.cluster_utils.Cluster``, a head without CPUs and two worker nodes of
one CPU each, token authentication on as ``ray start --head`` sets it up (``RAY_AUTH_MODE=token``
and a token, here through ``RAY_AUTH_TOKEN`` in the environment every node process inherits).

- the cells spread over the nodes, and each cell's status file and ``sweep status`` name the node
  of each attempt;
- a driver without the token gets one ``error:`` line naming the fix;
- a node that cannot see ``--out`` (simulated: its processes import a ``sitecustomize`` that makes
  every file under ``--out`` missing for them) is named before any cell runs;
- a worker node removed mid-study: its cell is retried on the other node, resumes from its
  checkpoint, and the study ends with the masks of the uninterrupted run.

One cluster for the module (starting one takes ~40 s on the project's loaded 2-core machine).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_sweep import same_subnetwork, tiny_study, wait_for
from typer.testing import CliRunner

from kcs_lens.cli.main import app
from kcs_lens.sweep import load_plan
from kcs_lens.sweep.cells import read_status

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

STEPS = dict(steps=18, eval_every=6, checkpoint_every=6)
HIDE = """
import builtins, io, os
_hidden = os.environ["KCS_TEST_HIDDEN_PATH"]
_open = io.open


def _node_local(file, *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and os.fspath(file).startswith(_hidden):
        raise FileNotFoundError(2, "No such file or directory", os.fspath(file))
    return _open(file, *args, **kwargs)


io.open = builtins.open = _node_local
"""


@pytest.fixture(scope="module")
def cluster(one_thread, tmp_path_factory):
    """A head (0 CPUs) and two worker nodes (1 CPU each, resources node_a / node_b), token auth on."""
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    reset_auth_token_state()
    c = None
    try:
        for attempt in (1, 2):  # Ray gives a node 30 s to register: a loaded machine can miss that once
            c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
            try:
                workers = [c.add_node(num_cpus=1, resources={name: 1}) for name in ("node_a", "node_b")]
                c.wait_for_nodes()
                break
            except Exception:
                c.shutdown()  # a half-started node's raylet ends with the head's GCS
                c = None
                if attempt == 2:
                    raise
        yield c, workers
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if c is not None:
            c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_kg, tiny_model_dir) -> Path:
    d = tmp_path_factory.mktemp("raystudy")
    return tiny_study(d, tiny_kg, tiny_model_dir, targets=("target", "target2"), seeds=(84,), **STEPS)


def sweep(study: Path, out: Path, address: str, *extra: str):
    try:
        return CliRunner().invoke(
            app, ["sweep", str(study), "--out", str(out), "--executor", "ray", "--ray-address", address, "--no-progress", *extra]
        )
    finally:
        if ray.is_initialized():  # each command joins the cluster through --ray-address
            ray.shutdown()


@pytest.fixture(scope="module")
def uninterrupted(cluster, study, tmp_path_factory) -> Path:
    """The study on the cluster, nothing removed: the reference of the node-loss test."""
    c, _ = cluster
    out = tmp_path_factory.mktemp("ray") / "out"
    r = sweep(study, out, c.address)
    assert r.exit_code == 0, r.output
    return out


def test_cells_spread_over_the_nodes_and_status_names_them(cluster, uninterrupted):
    c, workers = cluster
    cells = load_plan(uninterrupted).cells
    nodes = [read_status(uninterrupted, cell)["attempts"][0]["node"] for cell in cells]
    assert all(read_status(uninterrupted, cell)["state"] == "done" for cell in cells)
    ids = {w.node_id[:8] for w in workers}
    assert {n.split("/")[1] for n in nodes} == ids, nodes  # one cell per 1-CPU worker node, none on the head
    # wide enough that no node name wraps (at 80 columns 'ip/node-id' is split across lines)
    r = CliRunner().invoke(app, ["sweep", "status", str(uninterrupted)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and all(n in r.output for n in nodes), r.output


def test_a_driver_without_the_token_gets_one_line_naming_the_fix(cluster, study, tmp_path):
    c, _ = cluster
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    out = tmp_path / "out"
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "kcs_lens.cli.main", "sweep", str(study), "--out", str(out), "--executor", "ray"]
        + ["--ray-address", c.address, "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "RAY_AUTH_MODE=token" in lines[0], lines
    assert time.monotonic() - t0 < 60
    assert not out.exists()


def test_out_that_a_node_cannot_see_is_refused_before_any_cell(cluster, study, tmp_path):
    c, _ = cluster
    out = tmp_path / "node-local" / "out"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE)
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    blind = c.add_node(num_cpus=1, env_vars={"PYTHONPATH": path, "KCS_TEST_HIDDEN_PATH": str(tmp_path / "node-local")})
    try:
        c.wait_for_nodes()
        r = sweep(study, out, c.address)
        assert r.exit_code == 2, r.output
        errors = [x for x in r.output.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and f"Ray node {blind.node_ip_address}/{blind.node_id[:8]} cannot see" in errors[0], r.output
        assert "No such file or directory" in errors[0]
        assert not (tmp_path / "node-local").exists()  # nothing left behind, no cell ran
    finally:
        c.remove_node(blind)


def test_a_node_removed_mid_study_its_cell_resumes_elsewhere_with_the_same_masks(cluster, study, uninterrupted, tmp_path):
    c, workers = cluster
    out = tmp_path / "out"
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(r=sweep(study, out, c.address, "--max-retries", "2")))
    th.start()
    wait_for(out / "sweep.json", alive=th.is_alive)
    cell = load_plan(out).cells[0]
    wait_for(out / cell.name / "checkpoints" / "state.pt", alive=th.is_alive)
    first = read_status(out, cell)["node"].split("/")[1]
    victim = next(w for w in workers if w.node_id.startswith(first))
    c.remove_node(victim, allow_graceful=False)
    th.join(timeout=900)
    assert not th.is_alive()
    r = box["r"]
    assert r.exit_code == 0, r.output
    st = read_status(out, cell)
    nodes = [a["node"].split("/")[1] for a in st["attempts"]]
    assert st["state"] == "done" and nodes[0] == first and nodes[-1] != first, st
    assert st["attempts"][-1]["resumed_from"] >= STEPS["checkpoint_every"], st
    for c2 in load_plan(out).cells:  # the same masks as the uninterrupted study
        same_subnetwork(out / c2.name, uninterrupted / c2.name)
