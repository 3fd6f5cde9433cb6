"""Where a study's cells run: ``local`` worker processes (one model loaded per worker, devices
round-robin) or ``ray`` (one Ray task per pack with the requested resources; Ray schedules and
retries). Both hand a worker a *pack* (:func:`packs`: up to ``pack`` cells of one model, in plan
order), which it runs one cell after another with :func:`kcs_lens.sweep.cells.run_cell`, sharing
the loaded model and :class:`~kcs_lens.discovery.shared.SharedInputs` (data, the original
model's evaluation, per-row caches); each cell keeps its own run directory and result."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from kcs_lens.errors import ConfigError
from kcs_lens.sweep.cells import DONE, cell_state, read_status, result_of, run_cell, write_status
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


def model_key(cell: Cell) -> tuple[str, str, str]:
    c = cell.config
    return (str(c["model"]), str(c.get("backend")), str(c.get("device")))


def packs(cells: list[Cell], pack: int) -> list[list[Cell]]:
    """Up to ``pack`` cells of the same model (and backend, device) per pack, cells of one model in
    a row and otherwise in plan order (so the seeds of a TargetKG land in one pack)."""
    if pack < 1:
        raise ConfigError(f"--pack {pack}: must be >= 1")
    out: list[list[Cell]] = []
    for cell in sorted(cells, key=model_key):  # stable: plan order within a model
        if out and len(out[-1]) < pack and model_key(out[-1][0]) == model_key(cell):
            out[-1].append(cell)
        else:
            out.append([cell])
    return out


def run_pack(
    study_dir: str | Path,
    pack: list[Cell],
    *,
    device: str | None,
    cache: ModelCache,
    force: bool,
    track: tuple[str, ...] = (),
    node: str | None = None,
) -> Iterator[Event]:
    """The cells of a pack one after another in this process (start / finish events); the cells of a
    pack of two or more share :class:`~kcs_lens.discovery.shared.SharedInputs` (a pack of one runs
    exactly as a cell did before packs)."""
    from kcs_lens.discovery.shared import SharedInputs

    kw: dict[str, Any] = {"node": node} if node is not None else {}
    held: list[SharedInputs] = []

    def shared(lm: Any) -> SharedInputs | None:
        if len(pack) < 2:
            return None
        if not held or held[0].lm is not lm:
            held[:] = [SharedInputs(lm)]
        return held[0]

    for cell in pack:
        yield {"event": "start", "name": cell.name, "pid": os.getpid(), "device": device}
        res = run_cell(study_dir, cell, device=device, load=cache, force=force, track=track, shared=shared, **kw)
        yield {"event": "finish", **res}


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
    """A local worker process: packs of cells from ``tasks`` until a None, events to ``events``."""
    _threads(workers, device, threads)
    cache = ModelCache()
    while True:
        item = tasks.get()
        if item is None:
            return
        pack = [Cell(**c) for c in item]
        events.put({"event": "take", "names": [c.name for c in pack], "pid": os.getpid()})
        for ev in run_pack(study_dir, pack, device=device, cache=cache, force=force, track=track):
            events.put(ev)


def _run_in_process(
    study_dir: Path, groups: list[list[Cell]], device: str | None, force: bool, track: tuple[str, ...], threads: int | None
) -> Iterator[Event]:
    """The packs one after the other in this process (one worker: no process isolation)."""
    if threads is not None:
        from kcs_lens.threads import set_threads

        set_threads(threads)
    cache = ModelCache()
    for group in groups:
        yield from run_pack(study_dir, group, device=device, cache=cache, force=force, track=track)


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
    pack: int = 1,
) -> Iterator[Event]:
    """Run ``cells`` on ``workers`` processes (devices round-robin) in packs of up to ``pack`` cells
    of one model (:func:`packs`); one worker and no process isolation when ``workers == 1``. A
    worker that dies (killed, out of memory) fails its running cell, which is retried up to
    ``max_retries`` times (resuming); the rest of its pack goes back to the queue, and the worker
    is replaced.
    ``threads``: torch threads per worker (default: the cores shared out, see :func:`_threads`;
    in-process: torch's default unless given)."""
    groups = packs(cells, pack)
    if workers == 1:
        yield from _run_in_process(study_dir, groups, devices[0] if devices else None, force, track, threads)
        return
    ctx = mp.get_context("spawn")  # fork would copy torch's threads and locks
    tasks, events = ctx.Queue(), ctx.Queue()
    for group in groups:
        tasks.put([c.to_json() for c in group])
    by_name = {c.name: c for c in cells}
    procs: dict[int, tuple[Any, str | None]] = {}
    running: dict[int, str] = {}  # worker pid -> cell name
    taken: dict[int, list[str]] = {}  # worker pid -> cells of its pack not finished yet
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
                if ev["event"] == "take":
                    taken[ev["pid"]] = list(ev["names"])
                    continue
                if ev["event"] == "start":
                    running[ev["pid"]] = ev["name"]
                else:
                    running = {k: v for k, v in running.items() if v != ev["name"]}
                    taken = {k: [n for n in v if n != ev["name"]] for k, v in taken.items()}
                    left -= 1
                yield ev
                continue
            for i, (p, device) in list(procs.items()):
                if p.is_alive():
                    continue
                name = running.pop(p.pid, None)  # type: ignore[arg-type]
                rest = [n for n in taken.pop(p.pid, []) if n != name]  # type: ignore[arg-type]
                if rest:  # the pack's cells that did not start: back to the queue
                    tasks.put([by_name[n].to_json() for n in rest])
                if name is not None:
                    ev = _died(study_dir, by_name[name], p.exitcode, retries, max_retries, tasks)
                    if ev["event"] == "finish":
                        left -= 1
                    yield ev
                if left:
                    start(i, device)
    finally:
        _stop(procs, tasks)


def _died(study_dir: Path, cell: Cell, exitcode: int | None, retries: dict[str, int], max_retries: int, tasks: Any) -> Event:
    """The cell a worker was running when it died: queued again (``retry``, it resumes) up to
    ``max_retries`` times, then failed (``finish``)."""
    err = f"worker process died (exit code {exitcode}) while running this cell"
    if retries.get(cell.name, 0) < max_retries:
        retries[cell.name] = retries.get(cell.name, 0) + 1
        tasks.put([cell.to_json()])
        return {"event": "retry", "name": cell.name, "error": err}
    write_status(study_dir, cell, state="failed", error=err)
    return {"event": "finish", "name": cell.name, "state": "failed", "error": err, "elapsed": None}


def _stop(procs: dict[int, tuple[Any, str | None]], tasks: Any) -> None:
    """Ask every worker to stop; kill those still alive after 10 s."""
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


def _ray_pack(
    study_dir: str, cells: list[dict[str, Any]], force: bool, track: tuple[str, ...] = (), threads: int | None = None
) -> list[dict[str, Any]]:
    """The body of a pack's Ray task: its cells run (or resume) one after another on the node Ray
    chose, sharing the loaded model (cells already done are skipped when Ray retries the task), with
    ``threads`` torch threads (default: Ray's, which sets OMP_NUM_THREADS to the task's CPUs)."""
    from kcs_lens.sweep.raycluster import node_label
    from kcs_lens.threads import set_threads

    set_threads(threads)
    pack = [Cell(**c) for c in cells]
    evs = run_pack(study_dir, pack, device=None, cache=ModelCache(), force=force, track=track, node=node_label())
    return [ev for ev in evs if ev["event"] == "finish"]


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
    resources: dict[str, float],
    max_retries: int,
    force: bool,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    track: tuple[str, ...] = (),
    pack: int = 1,
) -> Iterator[Event]:
    """One Ray task per pack (:func:`packs`) with ``resources``; Ray retries a task whose worker
    died up to ``max_retries`` times (the retry skips the pack's finished cells and resumes the
    interrupted one from its last checkpoint). Ray must be connected: run_sweep does it, and shuts it
    down after, through :func:`kcs_lens.sweep.raycluster.connected`."""
    ray = import_ray()
    task = ray.remote(_ray_pack).options(**ray_options(resources, max_retries))
    groups = packs(cells, pack)
    refs = {task.remote(str(study_dir.resolve()), [c.to_json() for c in g], force, track, threads): g for g in groups}
    log(f"submitted {len(refs)} Ray task(s) ({len(cells)} cells) with {resources}; cluster: {ray.cluster_resources()}")
    pending = list(refs)
    started: set[str] = set()
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=2.0)
        for ref in pending:  # a start line once a cell's status file says it runs
            for cell in refs[ref]:
                st = read_status(study_dir, cell)
                if cell.name not in started and st.get("state") == "running":
                    started.add(cell.name)
                    yield {"event": "start", "name": cell.name, "pid": st.get("pid"), "device": st.get("node") or st.get("host")}
        for ref in ready:
            try:
                yield from ({"event": "finish", **r} for r in ray.get(ref))
            except ray.exceptions.RayError as e:  # the worker died more often than max_retries
                err = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                for cell in refs[ref]:
                    if cell_state(study_dir, cell) == DONE:  # finished before the pack's task died
                        yield {
                            "event": "finish",
                            "name": cell.name,
                            "state": "done",
                            "elapsed": None,
                            "result": result_of(study_dir, cell),
                        }
                        continue
                    write_status(study_dir, cell, state="failed", error=err)
                    yield {"event": "finish", "name": cell.name, "state": "failed", "error": err, "elapsed": None}
