"""Long runs on real disks (issue 16): one writer per run directory, a clean stop on a full disk,
resume after a kill during any write, byte-identical results."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_kwargs
from typer.testing import CliRunner

from kcs_lens import Subnetwork, discover
from kcs_lens.cli.main import app
from kcs_lens.discovery.rundir import RunDir
from kcs_lens.discovery.runlock import RunLock, lock_holder
from kcs_lens.errors import RunError
from kcs_lens.files import is_temporary

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical comparisons across processes


def _kwargs(tiny_kg, model_dir, **over) -> dict:
    return tiny_run_kwargs(tiny_kg, model_dir) | {"keep_all_checkpoints": True} | over


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def _discover_cmd(kw: dict, out: Path) -> list[str]:
    """``kcs-lens discover`` in a fresh process with the non-flag settings of ``kw``."""
    args = [a for k, v in kw.items() for a in (["--" + k.replace("_", "-"), str(v)] if not isinstance(v, bool) else [])]
    return _script("from kcs_lens.cli.main import app; app()") + [
        "discover",
        *args,
        "--keep-all-checkpoints",
        "--out",
        str(out),
        "--no-progress",
    ]


def _temporary_files(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if is_temporary(p)]


def _same_masks(a: Path, b: Path) -> None:
    sa, sb = Subnetwork.load(a), Subnetwork.load(b)
    assert sa.logits.keys() == sb.logits.keys()
    for n in sa.logits:
        assert torch.equal(sa.logits[n], sb.logits[n]), n


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_kg, tiny_model_dir) -> Path:
    """An uninterrupted run: every later run must end with its masks."""
    out = tmp_path_factory.mktemp("ref") / "run"
    discover(out=out, **_kwargs(tiny_kg, tiny_model_dir))
    return out


def test_identical_runs_write_identical_bytes(tmp_path, reference, tiny_kg, tiny_model_dir):
    discover(out=tmp_path / "again", **_kwargs(tiny_kg, tiny_model_dir))
    for name in ("subnetwork.safetensors", "checkpoints/step_000012.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (reference / name).read_bytes(), name
    # summary.json: the same bytes but for its wall time, the one field that differs between runs
    a, b = ((d / "summary.json").read_text() for d in (tmp_path / "again", reference))
    assert json.loads(a)["wall_s"] > 0 and json.loads(b)["wall_s"] > 0
    no_wall = lambda s: re.sub(r'"wall_s": [0-9.e+-]+', '"wall_s": W', s)  # noqa: E731
    assert no_wall(a) == no_wall(b) and a.count('"wall_s"') == 1


def test_lock_one_writer(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    rd = RunDir(d)
    assert rd.running_pid() is None
    lock = rd.lock()
    assert rd.running_pid() == os.getpid()
    with pytest.raises(RunError, match=f"another kcs-lens process \\(pid {os.getpid()}\\)"):
        RunLock(rd.lock_file).acquire(d)
    lock.release()
    assert lock_holder(rd.lock_file) is None
    RunLock(rd.lock_file).acquire(d).release()


@pytest.mark.slow
def test_two_processes_on_one_run_directory(tmp_path, tiny_kg, tiny_model_dir):
    """A second writer is refused (exit 2, naming the first's pid) and changes nothing; readers say
    the run is still running; after kill -9 of the first the lock is free and --resume works."""
    kw = _kwargs(tiny_kg, tiny_model_dir, steps=400, eval_every=3, checkpoint_every=6)
    out = tmp_path / "run"
    first = subprocess.Popen(
        _script(f"from kcs_lens import discover; discover(out={str(out)!r}, **{kw!r})"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "state.pt").exists():
            assert first.poll() is None, first.communicate()[1]
            assert time.time() < deadline, "the first run did not reach a checkpoint"
            time.sleep(0.05)
        config = (out / "config.json").read_bytes()
        new = ["discover", "--no-progress", "--out", str(out)]
        for args in (["discover", "--resume", str(out), "--no-progress"], new + ["--force", "--seed", "5"], new):
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 2, r.output
            assert f"pid {first.pid}" in r.output and "Traceback" not in r.output, r.output
        r = CliRunner().invoke(app, ["evaluate", str(out)])
        assert r.exit_code == 2 and f"still running (pid {first.pid})" in r.output, r.output
        assert (out / "config.json").read_bytes() == config  # the first run's files are its own
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert RunDir(out).running_pid() is None  # kill -9 released the lock
    assert discover(resume=out, stop_after=1) is None


@pytest.mark.slow
def test_full_disk_stops_with_one_line_and_resumes(tmp_path, reference, tiny_kg, tiny_model_dir):
    """A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes writing state.pt fail with a real
    OSError: exit 2, one line naming the file, no temporary files; --resume then ends exactly where
    the uninterrupted run ends."""
    resource = pytest.importorskip("resource")
    kw = _kwargs(tiny_kg, tiny_model_dir)
    out = tmp_path / "run"
    state_size = (reference / "checkpoints" / "state.pt").stat().st_size
    ckpt_size = (reference / "checkpoints" / "step_000006.safetensors").stat().st_size
    assert ckpt_size < state_size
    limit = (ckpt_size + state_size) // 2  # the mask checkpoint fits, the state does not

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = _discover_cmd(kw, out)
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, preexec_fn=limit_files, timeout=600)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "state.pt" in errors[0] and "--resume" in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert _temporary_files(out) == []
    assert not (out / "checkpoints" / "state.pt").exists()
    log: list[str] = []
    discover(resume=out, log=log.append)
    assert any("never reached a checkpoint" in m for m in log), log
    _same_masks(out / "subnetwork.safetensors", reference / "subnetwork.safetensors")
    _same_masks(out / "checkpoints" / "step_000012.safetensors", reference / "checkpoints" / "step_000012.safetensors")


KILL_AT = {  # the atomic write during which the process dies (os._exit before the rename)
    "state-at-step-6": "state.pt",
    "mask-checkpoint-at-step-6": "step_000006.safetensors",
    "subnetwork-at-the-end": "subnetwork.safetensors",
}


@pytest.mark.slow
@pytest.mark.parametrize("target", list(KILL_AT.values()), ids=list(KILL_AT))
def test_kill_during_a_write_resumes_to_the_same_masks(target, tmp_path, reference, tiny_kg, tiny_model_dir):
    out = tmp_path / "run"
    body = f"""
        import os
        import kcs_lens.files as files
        real = os.replace
        def replace(src, dst):
            if os.path.basename(dst) == {target!r}:
                os._exit(9)  # killed with the temporary file written and not yet renamed
            real(src, dst)
        files.os.replace = replace
        from kcs_lens import discover
        discover(out={str(out)!r}, **{_kwargs(tiny_kg, tiny_model_dir)!r})
    """
    p = subprocess.run(_script(body), env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 9, p.stderr
    assert _temporary_files(out), "the kill should leave a temporary file"
    discover(resume=out)
    assert _temporary_files(out) == []
    for name in ("subnetwork.safetensors", "checkpoints/step_000006.safetensors", "checkpoints/step_000012.safetensors"):
        _same_masks(out / name, reference / name)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12]


def test_damaged_state_and_partial_metrics_line(tmp_path, tiny_kg, tiny_model_dir):
    """A truncated state.pt falls back to the newest intact mask checkpoint (a warning); a partial
    last line of metrics.jsonl is dropped."""
    kw = _kwargs(tiny_kg, tiny_model_dir)
    out = tmp_path / "run"
    assert discover(out=out, stop_after=8, **kw) is None  # state at step 8, mask checkpoint at 6
    state = out / "checkpoints" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "target_p')
    from kcs_lens.discovery.checkpoints import ResumeWarning

    with pytest.warns(ResumeWarning) as caught:
        s = discover(resume=out, log=lambda m: None)
    assert s is not None and s["selected_step"] in (6, 12)
    warn = [str(w.message) for w in caught if w.category is ResumeWarning]
    assert len(warn) == 1 and "state.pt is damaged" in warn[0] and "step 6" in warn[0], warn
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12]


def test_readers_of_a_live_run(tmp_path, reference, tiny_kg):
    """While a writer holds the lock: a reader with a subnetwork works and notes that the run is
    still running; report over a folder skips a live run that has no subnetwork yet."""
    import shutil
    import warnings

    from kcs_lens.discovery.rundir import StillRunning, expand_runs, load_run

    runs = tmp_path / "runs"
    shutil.copytree(reference, runs / "done")
    shutil.copytree(reference, runs / "live")
    (runs / "live" / "subnetwork.safetensors").unlink()
    lock = RunDir(runs / "live").lock()
    try:
        with pytest.warns(StillRunning, match=f"skipping .*live: still running \\(pid {os.getpid()}\\)"):
            assert expand_runs([runs]) == [runs / "done"]
        with pytest.raises(RunError, match=f"still running \\(pid {os.getpid()}\\)"):
            load_run(runs / "live")
        ckpt = runs / "live" / "checkpoints" / "step_000012.safetensors"
        with pytest.warns(StillRunning, match="still running"):
            assert load_run(runs / "live", subnetwork=ckpt).subnetwork.sparsity >= 0
        r = CliRunner().invoke(app, ["export", str(runs / "live"), "--subnetwork", str(ckpt), "--out", str(tmp_path / "hf")])
        assert r.exit_code == 0, r.output
        assert f"note: {runs / 'live'} is still running (pid {os.getpid()})" in r.output
    finally:
        lock.release()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StillRunning)
        load_run(runs / "done")  # a finished run: no note


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real filesystem of a given size (tmpfs; needs root or CAP_SYS_ADMIN, else the test skips;
    the file-size-limit test above covers the same path everywhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted: list[Path] = []

    def mount(kb: int) -> Path:
        opt = f"size={kb}k" if not mounted else f"remount,size={kb}k"
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", opt, "tmpfs", str(mnt)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_no_space_left_stops_with_one_line_and_resumes(small_tmpfs, reference, tiny_kg, tiny_model_dir):
    """A real full disk (ENOSPC on a small tmpfs) while the first state.pt is written: exit 2, one
    error line, no traceback, no temporary files; after the disk grows, --resume ends exactly where
    the uninterrupted run ends."""
    state_size = (reference / "checkpoints" / "state.pt").stat().st_size
    disk = small_tmpfs(max(64, (state_size // 2) // 1024 + 48))  # config, metrics, lock fit; state.pt does not
    out = disk / "run"
    kw = _kwargs(tiny_kg, tiny_model_dir)
    cmd = _discover_cmd(kw, out)
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], p.stderr
    assert "Traceback" not in p.stderr
    assert _temporary_files(out) == []
    small_tmpfs(64 * 1024)  # the disk grows; the run goes on from what it kept
    discover(resume=out, log=lambda m: None)
    _same_masks(out / "subnetwork.safetensors", reference / "subnetwork.safetensors")
