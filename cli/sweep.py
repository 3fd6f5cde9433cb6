"""``kcs-lens sweep STUDY --out DIR`` (run a study) and ``kcs-lens sweep status DIR`` (where it
stands): a command group whose default command is ``run``, so both spellings coexist (mounted by
cli/main.py as ``app.add_typer(sweep_app, name="sweep")``)."""

from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperGroup

from kcs_lens.cli.errors import App

EXIT_CELLS_FAILED = 3


class DefaultRun(TyperGroup):
    """``sweep ARGS`` means ``sweep run ARGS`` unless ARGS start with a subcommand or --help."""

    def parse_args(self, ctx: Any, args: List[str]) -> List[str]:  # ctx: typer's vendored click Context
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


sweep_app = App(
    cls=DefaultRun,
    help="Run a study (models x TargetKGs x seeds).\n\nFrom a study file: kcs-lens sweep STUDY --out DIR "
    "(the same as `sweep run`); `sweep status DIR` shows where it stands; `kcs-lens report DIR` writes the study report.",
    no_args_is_help=True,
)


@sweep_app.command("run")
def run(
    study: Path = typer.Argument(..., help="study file (.toml, .yaml or .json): [base] settings, [grid] lists, [[cells]]"),
    out: Path = typer.Option(..., "--out", help="study directory: sweep.json (the plan) and one run directory per cell"),
    executor: str = typer.Option("local", "--executor", help="local (worker processes on this machine) or ray (a Ray cluster)"),
    workers: Optional[int] = typer.Option(
        None, "--workers", help="local: worker processes (default: one per --devices entry, else 1)"
    ),
    devices: Optional[str] = typer.Option(
        None, "--devices", help="local: comma list of torch devices given to the workers round-robin, e.g. cuda:0,cuda:1"
    ),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="ray: the cluster to join (auto or HOST:PORT; default: start Ray on this machine)"
    ),
    resources: Optional[str] = typer.Option(
        None,
        "--resources",
        help='ray: resources of one cell (one pack with --pack) as JSON, e.g. \'{"GPU": 1}\' (default: {"CPU": 1})',
    ),
    max_retries: int = typer.Option(
        1, "--max-retries", help="times a cell whose worker died is retried (it resumes from its last checkpoint)"
    ),
    pack: int = typer.Option(
        1,
        "--pack",
        help="cells of one model a worker (or Ray task) runs in one process, sharing the loaded model, data, the original "
        "model's evaluation and per-row caches; each cell keeps its run directory and gets the same masks as alone",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (cells, names, settings) and run nothing"),
    force: bool = typer.Option(False, "--force", help="replace a different plan in --out (changed cells start over)"),
    add: bool = typer.Option(False, "--add", help="the study adds cells to the plan in --out: run only the new ones"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show the progress bar of cells"),
    log: Optional[List[str]] = typer.Option(
        None,
        "--log",
        help="stream each cell's metrics.jsonl records and config to tensorboard (CELL/tensorboard: tensorboard --logdir "
        "DIR) or wandb (one W&B run per cell, grouped by the study directory's name); repeatable",
    ),
    threads: Optional[int] = typer.Option(
        None,
        "--threads",
        min=1,
        help="torch CPU threads per cell (local: per worker, default: the cores shared out among the workers; "
        "ray: per task, default: Ray's); subnetworks are byte-identical across executors at the same number",
    ),
) -> None:
    """Run every cell of a study not done yet.

    Interrupted cells resume; exit code 3 when a cell failed."""
    from kcs_lens.sweep import run_sweep

    res = run_sweep(
        study,
        out,
        executor=executor,
        workers=workers,
        devices=devices.split(",") if devices else None,
        ray_address=ray_address,
        resources=resources,
        max_retries=max_retries,
        pack=pack,
        dry_run=dry_run,
        force=force,
        add=add,
        progress=progress,
        threads=threads,
        log=typer.echo,
        track=log or (),
    )
    if dry_run:
        print_plan(res["plan"], changed=res["changed"], out=out)
        return
    n, failed = len(res["plan"].cells), res["failed"]
    typer.echo(
        f"{n - len(failed)} of {n} cells done; " + (f"{len(failed)} failed: {', '.join(failed)}" if failed else "none failed")
    )
    typer.echo(f"next: kcs-lens sweep status {out}   kcs-lens report {out}")
    if failed:
        raise typer.Exit(EXIT_CELLS_FAILED)


def print_plan(plan: Any, *, changed: bool, out: Path) -> None:
    """Every cell's name, then its full config (every setting, as sweep.json and the cell's
    config.json hold it) as one JSON line."""
    import json

    n = len(plan.cells)
    typer.echo(f"plan of {plan.study}: {n} cell{'s' if n != 1 else ''} -> {out}" + ("" if changed else " (unchanged)"))
    for c in plan.cells:
        typer.echo(f"{c.name}")
        typer.echo(f"  {json.dumps(c.config)}")


@sweep_app.command("status")
def status(study_dir: Path = typer.Argument(..., help="study directory (written by kcs-lens sweep --out)")) -> None:
    """Show where a study stands.

    A table of the study's cells: state (pending/running/interrupted/done/failed), step, sparsity, the node of
    each attempt, last error."""
    from kcs_lens.progress import table, terminal
    from kcs_lens.sweep import status as sweep_status

    rows = sweep_status(study_dir)
    t = table(f"study {study_dir}", ["cell", "state", "step", "sparsity %", "attempts", "node(s)", "last error"], left=2)
    t.columns[-1].justify = t.columns[-2].justify = "left"
    for r in rows:
        sp = "" if r["sparsity"] is None else f"{100 * r['sparsity']:.2f}"
        nodes = " -> ".join(r.get("nodes", []))
        t.add_row(r["cell"], r["state"], f"{r['step']}/{r['steps']}", sp, str(r["attempt"]), nodes, r["error"])
    c = terminal()
    c.print(t)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    c.print(", ".join(f"{v} {k}" for k, v in counts.items()))
