"""Running a study: executors chosen, cells run and retried, ``sweep status``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from kcs_lens.errors import ConfigError, KcsLensError
from kcs_lens.files import atomic_write_json
from kcs_lens.settings import build
from kcs_lens.sweep.cells import DONE, cell_state, describe
from kcs_lens.sweep.config import SweepConfig
from kcs_lens.sweep.executors import import_ray, packs, run_local, run_ray
from kcs_lens.sweep.plan import Plan, expand, load_plan, reconcile, write_plan
from kcs_lens.tracking import Tracking, check_tracking, parse_tracking

RUN_SETTINGS = "sweep-run.json"  # the SweepConfig of the last run in a study directory


def check_study_dir(out: str | Path) -> Path:
    """``sweep --out``: a new folder, an empty one or a study directory, writable; never a file or a
    run directory of ``discover`` (or a folder inside one)."""
    from kcs_lens.discovery.rundir import RunDir
    from kcs_lens.files import check_output_dir

    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {p}: is a file; expected a study directory (a new folder, or one written by kcs-lens sweep)")
    for d in (p, *p.absolute().parents):
        if RunDir(d).is_run():
            what = "is" if d == p or d == p.absolute() else f"is inside {d}, which is"
            raise ConfigError(f"--out {p}: {what} a run directory of kcs-lens discover; a study needs a folder of its own")
    check_output_dir(p, "--out")
    return p


def status(study_dir: str | Path) -> list[dict[str, Any]]:
    """One row per planned cell (``sweep status``)."""
    return [describe(study_dir, c) for c in load_plan(study_dir).cells]


def run_sweep(
    study: str | Path,
    out: str | Path,
    config: SweepConfig | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] = print,
    track: Sequence[str] = (),
    **options: Any,
) -> dict[str, Any]:
    """Expand ``study`` into its plan, write ``out/sweep.json``, and run every cell not done yet
    (interrupted ones resume). ``options``: :class:`~kcs_lens.sweep.config.SweepConfig` fields (or
    pass ``config``). Returns ``{"plan", "results", "failed", "skipped"}``; a failed cell is
    recorded and the others go on. ``track``: ``--log`` trackers, one tracking run per cell
    (:mod:`kcs_lens.tracking`; a W&B group per study). ``pack``: cells of one model a worker (or
    Ray task) runs in one process, sharing the model, data, the original evaluation and per-row
    caches (same masks as one cell per worker; :mod:`kcs_lens.discovery.shared`)."""
    if config is not None and options:
        raise ConfigError("pass either a SweepConfig or keyword options, not both")
    c = (config or build(SweepConfig, options)).validate()
    kinds = parse_tracking(track).kinds
    check_tracking(Tracking(kinds))  # a missing package or login: one error line before any cell runs
    out = check_study_dir(out)
    if c.executor == "ray":
        import_ray()  # the missing extra is one error line before anything else
        if c.ray_address is not None and not c.dry_run:
            from kcs_lens.sweep.raycluster import probe

            probe(c.ray_address)  # nothing listening there: seconds, before the study is read
    plan, changed = reconcile(expand(study), out, force=c.force, add=c.add)
    if c.executor == "local" and not c.devices:  # where the cells run is known: their devices must be here
        from kcs_lens.model.loading import check_device

        for d in dict.fromkeys(cell.config["device"] for cell in plan.cells):
            try:
                check_device(d, option="device =")
            except KcsLensError as e:
                raise ConfigError(f"{study}: {e}") from None
    if c.dry_run:
        return {"plan": plan, "results": [], "failed": [], "skipped": [], "changed": changed}
    if c.executor == "ray":  # the cluster answers and every node sees --out, before anything is written
        from kcs_lens.sweep.raycluster import connected

        with connected(c.ray_address, out):
            return _run(c, plan, changed, out, progress, log, kinds)
    return _run(c, plan, changed, out, progress, log, kinds)


def _run(
    c: SweepConfig,
    plan: Plan,
    changed: bool,
    out: Path,
    progress: bool,
    log: Callable[[str], None],
    kinds: tuple[str, ...],
) -> dict[str, Any]:
    """The study's cells run (the plan written, then each cell not done yet) and followed."""
    if changed:
        write_plan(plan, out)
    atomic_write_json(out / RUN_SETTINGS, c.to_dict())
    states = {cell.name: cell_state(out, cell) for cell in plan.cells}
    todo = [cell for cell in plan.cells if states[cell.name] != DONE]
    skipped = [cell.name for cell in plan.cells if states[cell.name] == DONE]
    log(f"study {out}: {len(plan.cells)} cells, {len(skipped)} done, {len(todo)} to run ({c.executor} executor)")
    if c.executor == "local":
        n = c.workers or max(1, len(c.devices))
        events = run_local(
            out,
            todo,
            workers=min(n, max(1, len(packs(todo, c.pack)))),
            devices=c.devices,
            force=c.force,
            max_retries=c.max_retries,
            track=kinds,
            threads=c.threads,
            pack=c.pack,
        )
    else:
        events = run_ray(
            out,
            todo,
            resources=c.resource_amounts,
            max_retries=c.max_retries,
            force=c.force,
            threads=c.threads,
            log=log,
            track=kinds,
            pack=c.pack,
        )
    results = _follow(events, len(plan.cells), len(skipped), progress, log)
    failed = [r["name"] for r in results if r["state"] == "failed"]
    return {"plan": plan, "results": results, "failed": failed, "skipped": skipped, "changed": changed}


def _result_text(r: dict[str, Any]) -> str:
    if r["state"] == "failed":
        return f"FAILED: {r['error']}"
    x = r["result"]
    resumed = f", resumed from step {r['resumed_from']}" if r.get("resumed_from") is not None else ""
    return (
        f"sparsity {100 * x['sparsity']:.2f}%, TargetKG PPL x{x['target_ratio']:.3g}, ControlKG x{x['control_ratio']:.3g}, "
        f"ControlLM x{x['lm_ratio']:.3g}{resumed}"
    )


def _follow(events: Any, total: int, done: int, progress: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """A line per cell start / finish (elapsed, result) and a bar of cells done with an ETA."""
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        bar = RichProgress(
            TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()
        )
        bar.start()
        task = bar.add_task("cells", total=total, completed=done)
        say: Callable[[str], None] = bar.console.print
    else:
        say = log
    results = []
    t0 = time.time()
    try:
        for ev in events:
            stamp = f"[{time.time() - t0:7.1f} s]"
            if ev["event"] == "start":
                say(f"{stamp} start  {ev['name']}" + (f" on {ev['device']}" if ev.get("device") else ""))
            elif ev["event"] == "retry":
                say(f"{stamp} retry  {ev['name']}: {ev['error']}")
            else:
                results.append(ev)
                took = f" in {ev['elapsed']:.1f} s" if ev.get("elapsed") is not None else ""
                say(f"{stamp} {ev['state']:<6} {ev['name']}{took}: {_result_text(ev)}")
                if bar is not None:
                    bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    return results
