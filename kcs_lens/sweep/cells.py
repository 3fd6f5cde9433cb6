"""One cell of a study: where it stands (from its run directory and its status file) and running
it (:func:`run_cell`, the one function every executor calls, in a worker process or a Ray task).

A cell's run directory is ``DIR/<name>`` (a normal run directory, :mod:`kcs_lens.discovery.rundir`); its
status file ``DIR/.cells/<name>.json`` records the last attempt (running with pid and host, done,
failed with the error) and ``DIR/.cells/<name>.log`` the discovery's messages and tracebacks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from kcs_lens.discovery.rundir import RunDir, read_state_file
from kcs_lens.errors import KcsLensError
from kcs_lens.files import atomic_write_json
from kcs_lens.sweep.plan import Cell, identity
from kcs_lens.tracking import Tracking

STATUS_DIR = ".cells"
# What a cell's run directory says about it (``cell_state``).
DONE, PARTIAL, FRESH, CONFLICT = "done", "partial", "fresh", "conflict"


def run_dir(study_dir: str | Path, cell: Cell) -> RunDir:
    return RunDir(Path(study_dir) / cell.name)


def status_file(study_dir: str | Path, cell: Cell) -> Path:
    return Path(study_dir) / STATUS_DIR / f"{cell.name}.json"


def log_file(study_dir: str | Path, cell: Cell) -> Path:
    return Path(study_dir) / STATUS_DIR / f"{cell.name}.log"


def read_status(study_dir: str | Path, cell: Cell) -> dict[str, Any]:
    try:
        d = json.loads(status_file(study_dir, cell).read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def write_status(study_dir: str | Path, cell: Cell, **fields: Any) -> None:
    atomic_write_json(status_file(study_dir, cell), {"cell": cell.name, **fields})


def cell_state(study_dir: str | Path, cell: Cell) -> str:
    """``done`` (finished with the planned config), ``partial`` (a resumable checkpoint), ``fresh``
    (nothing usable: start it) or ``conflict`` (a run directory with other settings)."""
    rd = run_dir(study_dir, cell)
    if not rd.is_run():
        return FRESH
    if identity(rd.read_config()["config"]) != cell.identity():
        return CONFLICT
    if rd.summary.exists() and rd.subnetwork.exists():
        return DONE
    return PARTIAL if rd.state.exists() else FRESH


def last_record(rd: RunDir) -> dict[str, Any]:
    try:
        recs = rd.read_metrics()
    except KcsLensError:
        return {}
    return recs[-1] if recs else {}


def result_of(study_dir: str | Path, cell: Cell) -> dict[str, Any]:
    """The headline numbers of a finished cell (from its summary.json)."""
    s = json.loads(run_dir(study_dir, cell).summary.read_text())
    return {
        "sparsity": s["sparsity"],
        "target_ratio": s["ratio"]["target_ratio"],
        "control_ratio": s["ratio"]["control_ratio"],
        "lm_ratio": s["ratio"]["lm_ratio"],
        "meets_criteria": s["meets_criteria"],
        "selected_step": s["selected_step"],
    }


def resumed_step(rd: RunDir) -> int | None:
    """The step a partial cell resumes from (its state.pt), None when the state is damaged (discovery
    falls back to a mask checkpoint); a state.pt that would run code is refused (a RunError)."""
    try:
        return int(read_state_file(rd.state)["step"])
    except KcsLensError:
        raise
    except Exception:
        return None


ModelLoader = Callable[[str, "str | None", str], Any]


def _file_log(path: Path) -> Callable[[str], None]:
    """A log function appending time-stamped lines to ``path`` (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        with open(path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    return log


def _cell_config(cell: Cell, rd: Any, state: str, force: bool, device: str | None) -> Any:
    """The cell's DiscoveryConfig (``device`` replacing its own); a run directory with other
    settings is refused unless ``force``."""
    if state == CONFLICT and not force:
        raise KcsLensError(
            f"{rd.path} holds a run with other settings than the plan's; move it away or rerun the sweep with --force"
        )
    cfg = cell.discovery_config()
    return cfg if device is None else dataclasses.replace(cfg, device=device).validate()


def run_cell(
    study_dir: str | Path,
    cell: Cell,
    *,
    device: str | None = None,
    load: ModelLoader | None = None,
    force: bool = False,
    track: Sequence[str] = (),
    node: str | None = None,
    shared: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume, or skip) one cell; never raises for the cell's own errors: returns
    ``{"name", "state": done|failed|skipped, "elapsed", "result" | "error", "resumed_from"}`` and
    records it in the cell's status file. ``device`` replaces the cell's ``device`` setting;
    ``load(model, backend, device)`` returns a (cached) LensModel, else discovery loads it.
    ``force``: a run directory with other settings is started over (else the cell fails).
    ``track``: trackers (``kcs-lens sweep --log``), one tracking run per cell, grouped by the study.
    ``node``: where it runs (a Ray node; default: the host name), recorded with every attempt in the status
    file (``attempts``: node, pid, start, the step it resumed from, how it ended).
    ``shared(lm)``: the :class:`~kcs_lens.discovery.shared.SharedInputs` of that loaded model (the
    cells of a pack share data, the original evaluation and per-row caches; same masks)."""
    t0 = time.time()
    prev = read_status(study_dir, cell)
    attempt = int(prev.get("attempt", 0)) + 1
    base = {"name": cell.name, "attempt": attempt}
    where = {"pid": os.getpid(), "host": socket.gethostname(), "node": node or socket.gethostname()}
    history: list[dict[str, Any]] = [a for a in prev.get("attempts", []) if isinstance(a, dict)]
    rd = run_dir(study_dir, cell)
    log = _file_log(log_file(study_dir, cell))
    try:
        state = cell_state(study_dir, cell)
        if state == DONE:
            return {**base, "state": "skipped", "elapsed": 0.0, "result": result_of(study_dir, cell), "resumed_from": None}
        cfg = _cell_config(cell, rd, state, force, device)
        resumed_from = None
        if state == PARTIAL:
            resumed_from = resumed_step(rd)
        this = {"attempt": attempt, "node": where["node"], "pid": where["pid"], "started": t0, "resumed_from": resumed_from}
        history.append(this)
        write_status(
            study_dir,
            cell,
            state="running",
            attempt=attempt,
            **where,
            device=cfg.device,
            started=t0,
            resumed_from=resumed_from,
            attempts=history,
        )
        log(f"attempt {attempt}: " + (f"resuming from step {resumed_from}" if resumed_from is not None else "starting"))
        _discover_cell(study_dir, cell, cfg, resume=state == PARTIAL, load=load, track=track, shared=shared, log=log)
        result = result_of(study_dir, cell)
        elapsed = time.time() - t0
        this["state"] = "done"
        write_status(
            study_dir,
            cell,
            state="done",
            attempt=attempt,
            elapsed=elapsed,
            result=result,
            resumed_from=resumed_from,
            **where,
            attempts=history,
        )
        log(f"done in {elapsed:.1f} s: {result}")
        return {**base, "state": "done", "elapsed": elapsed, "result": result, "resumed_from": resumed_from}
    except Exception as e:  # the cell's failure is recorded; the study goes on
        err = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        log(f"failed: {err}\n{traceback.format_exc()}")
        elapsed = time.time() - t0
        if history and history[-1].get("attempt") == attempt:
            history[-1]["state"] = "failed"
        write_status(study_dir, cell, state="failed", attempt=attempt, elapsed=elapsed, error=err, **where, attempts=history)
        return {**base, "state": "failed", "elapsed": elapsed, "error": err}


def _discover_cell(
    study_dir: str | Path,
    cell: Cell,
    cfg: Any,
    *,
    resume: bool,
    load: ModelLoader | None,
    track: Sequence[str],
    shared: Callable[[Any], Any] | None,
    log: Callable[[str], None],
) -> None:
    """The cell's discovery (``resume``: of its partial run directory), on the model ``load``
    returns (else discovery loads it), tracked by ``track``."""
    from kcs_lens.discovery.runner import discover

    rd = run_dir(study_dir, cell)
    lm = load(cfg.model, cfg.backend, cfg.device) if load is not None else None
    tracking = Tracking(tuple(track), group=Path(study_dir).resolve().name, name=cell.name, tags=("kcs-lens sweep",))
    sh = shared(lm) if shared is not None and lm is not None else None
    if resume:
        discover(resume=rd.path, lens_model=lm, log=log, track=tracking, shared=sh)
    else:
        discover(cfg, out=rd.path, force=True, lens_model=lm, log=log, track=tracking, shared=sh)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(study_dir: str | Path, cell: Cell) -> dict[str, Any]:
    """One row of ``sweep status``: state (pending / running / interrupted / done / failed), step
    of its steps, sparsity at the last evaluation, and the last error."""
    st = read_status(study_dir, cell)
    rd = run_dir(study_dir, cell)
    state = cell_state(study_dir, cell)
    rec = last_record(rd) if rd.is_run() else {}
    row: dict[str, Any] = {
        "cell": cell.name,
        "step": rec.get("step", 0),
        "steps": cell.config["steps"],
        "sparsity": rec.get("sparsity"),
        "error": st.get("error", ""),
        "attempt": st.get("attempt", 0),
        "nodes": [a.get("node", "?") for a in st.get("attempts", []) if isinstance(a, dict)],
    }
    if state == DONE:
        row.update(state="done", step=row["steps"], sparsity=result_of(study_dir, cell)["sparsity"], error="")
    elif state == CONFLICT:
        row.update(state="failed", error="its run directory has other settings than the plan's")
    elif st.get("state") == "running":
        gone = st.get("host") == socket.gethostname() and not _alive(int(st.get("pid", 0)))
        row["state"] = "interrupted" if gone else "running"
        if gone:
            row["error"] = f"process {st.get('pid')} ended without finishing (killed?); rerun the sweep to resume"
    elif st.get("state") == "failed":
        row["state"] = "failed"
    else:
        row["state"] = "interrupted" if state == PARTIAL else "pending"
    return row
