"""Where a study's cells run: ``local`` worker processes (one model loaded per worker, devices
round-robin) or ``ray`` (one Ray task per cell with the requested resources; Ray schedules and
retries). Both call :func:`kcs_lens.sweep.cells.run_cell` and hand back its result per cell."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from kcs_lens.errors import ConfigError
from kcs_lens.sweep.cells import read_status, run_cell, write_status
from kcs_lens.sweep.plan import Cell

RAY_INSTALL = "--executor ray needs Ray, an optional extra: pip install 'kcs-lens[ray]'"
Event = dict[str, Any]  # {"event": "start"|"finish", "name", ...}


class ModelCache:
    """The last model a worker loaded, reused while the next cell has the same model."""

    def __init__(self) -> None:
        self.key: tuple[str, str | None, str] | None = None
        self.lm: Any = None

    def __call__(self, model: str, backend: str | None, device: str) -> Any:
        if self.key != (model, backend, device):
            from kcs_lens.model.loading import load_model

            self.lm = None  # release the previous model first
            self.lm = load_model(model, backend=backend, device=device)
            self.key = (model, backend, device)
        return self.lm


def _threads(workers: int, device: str | None, threads: int | None = None) -> None:
    """``threads`` torch threads in this worker (``--threads``); else CPU workers share the cores
    instead of each taking all of them (unless OMP_NUM_THREADS is set)."""
    from kcs_lens.threads import set_threads

    if threads is not None:
        set_threads(threads)
    elif (device is None or device == "cpu") and "OMP_NUM_THREADS" not in os.environ:
        set_threads(max(1, (os.cpu_count() or 1) // workers))


def _worker(
    study_dir: str,
    device: str | None,
    workers: int,
    force: bool,
    tasks: Any,
    events: Any,
    track: tuple[str, ...] = (),
    threads: int | None = None,
) -> None:
    """A local worker process: cells from ``tasks`` until a None, events to ``events``."""
    _threads(workers, device, threads)
    cache = ModelCache()
    while True:
        item = tasks.get()
        if item is None:
            return
        cell = Cell(**item)
        events.put({"event": "start", "name": cell.name, "pid": os.getpid(), "device": device})
        events.put({"event": "finish", **run_cell(study_dir, cell, device=device, load=cache, force=force, track=track)})


def run_local(
    study_dir: Path,
    cells: list[Cell],
    *,
    workers: int,
    devices: list[str],
    force: bool,
    max_retries: int,
    track: tuple[str, ...] = (),
    threads: int | None = None,
) -> Iterator[Event]:
    """Run ``cells`` on ``workers`` processes (devices round-robin), cells of one model in a row; one
    worker and no process isolation when ``workers == 1``. A worker that dies (killed, out of
    memory) fails its cell, which is retried up to ``max_retries`` times (resuming), and is replaced.
    ``threads``: torch threads per worker (default: the cores shared out, see :func:`_threads`;
    in-process: torch's default unless given)."""
    order = sorted(cells, key=lambda c: (c.config["model"], str(c.config.get("backend"))))
    if workers == 1:
        device = devices[0] if devices else None
        if threads is not None:
            from kcs_lens.threads import set_threads

            set_threads(threads)
        cache = ModelCache()
        for cell in order:
            yield {"event": "start", "name": cell.name, "pid": os.getpid(), "device": device}
            yield {"event": "finish", **run_cell(study_dir, cell, device=device, load=cache, force=force, track=track)}
        return
    ctx = mp.get_context("spawn")  # fork would copy torch's threads and locks
    tasks, events = ctx.Queue(), ctx.Queue()
    for cell in order:
        tasks.put(cell.to_json())
    by_name = {c.name: c for c in cells}
    procs: dict[int, tuple[Any, str | None]] = {}
    running: dict[int, str] = {}  # worker pid -> cell name
    retries: dict[str, int] = {}
    left = len(cells)

    def start(i: int, device: str | None) -> None:
        p = ctx.Process(target=_worker, args=(str(study_dir), device, workers, force, tasks, events, track, threads), daemon=True)
        p.start()
        procs[i] = (p, device)

    for i in range(workers):
        start(i, devices[i % len(devices)] if devices else None)
    try:
        while left:
            try:
                ev = events.get(timeout=1.0)
            except queue.Empty:
                ev = None
            if ev is not None:
                if ev["event"] == "start":
                    running[ev["pid"]] = ev["name"]
                else:
                    running = {k: v for k, v in running.items() if v != ev["name"]}
                    left -= 1
                yield ev
                continue
            for i, (p, device) in list(procs.items()):
                if p.is_alive():
                    continue
                name = running.pop(p.pid, None)  # type: ignore[arg-type]
                if name is not None:
                    err = f"worker process died (exit code {p.exitcode}) while running this cell"
                    cell = by_name[name]
                    if retries.get(name, 0) < max_retries:
                        retries[name] = retries.get(name, 0) + 1
                        tasks.put(cell.to_json())
                        yield {"event": "retry", "name": name, "error": err}
                    else:
                        write_status(study_dir, cell, state="failed", error=err)
                        left -= 1
                        yield {"event": "finish", "name": name, "state": "failed", "error": err, "elapsed": None}
                if left:
                    start(i, device)
    finally:
        for _ in procs:
            tasks.put(None)
        deadline = time.time() + 10
        for p, _ in procs.values():
            p.join(timeout=max(0.1, deadline - time.time()))
            if p.is_alive():
                p.kill()


def ray_options(resources: dict[str, float], max_retries: int) -> dict[str, Any]:
    """``{"CPU": 1, "GPU": 1, "custom": 2}`` as Ray task options (num_cpus, num_gpus, resources)."""
    res = dict(resources)
    opts: dict[str, Any] = {"num_cpus": res.pop("CPU", 1), "max_retries": max_retries}
    if "GPU" in res:
        opts["num_gpus"] = res.pop("GPU")
    if res:
        opts["resources"] = res
    return opts


def _ray_cell(
    study_dir: str, cell: dict[str, Any], force: bool, track: tuple[str, ...] = (), threads: int | None = None
) -> dict[str, Any]:
    """The body of a cell's Ray task: the cell runs (or resumes) on the node Ray chose, with
    ``threads`` torch threads (default: Ray's, which sets OMP_NUM_THREADS to the task's CPUs)."""
    from kcs_lens.sweep.raycluster import node_label
    from kcs_lens.threads import set_threads

    set_threads(threads)
    return run_cell(study_dir, Cell(**cell), force=force, track=track, node=node_label())


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_INSTALL) from None
    return ray


def run_ray(
    study_dir: Path,
    cells: list[Cell],
    *,
    address: str | None,
    resources: dict[str, float],
    max_retries: int,
    force: bool,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    track: tuple[str, ...] = (),
) -> Iterator[Event]:
    """One Ray task per cell with ``resources``; Ray retries a task whose worker died up to
    ``max_retries`` times (the retry resumes from the cell's last checkpoint). ``address``: a
    running cluster (``auto`` or ``HOST:PORT``); None starts Ray on this machine, unless this
    process already called ``ray.init``."""
    ray = import_ray()
    from kcs_lens.sweep.raycluster import connect

    if not ray.is_initialized():  # run_sweep connected already (and checked the storage)
        connect(ray, address)
    task = ray.remote(_ray_cell).options(**ray_options(resources, max_retries))
    refs = {task.remote(str(study_dir.resolve()), c.to_json(), force, track, threads): c for c in cells}
    log(f"submitted {len(refs)} Ray task(s) with {resources}; cluster: {ray.cluster_resources()}")
    pending = list(refs)
    started: set[str] = set()
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=2.0)
        for ref in pending:  # a start line once a task's status file says it runs
            cell = refs[ref]
            st = read_status(study_dir, cell)
            if cell.name not in started and st.get("state") == "running":
                started.add(cell.name)
                yield {"event": "start", "name": cell.name, "pid": st.get("pid"), "device": st.get("node") or st.get("host")}
        for ref in ready:
            cell = refs[ref]
            try:
                yield {"event": "finish", **ray.get(ref)}
            except ray.exceptions.RayError as e:  # the worker died more often than max_retries
                err = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                write_status(study_dir, cell, state="failed", error=err)
                yield {"event": "finish", "name": cell.name, "state": "failed", "error": err, "elapsed": None}
