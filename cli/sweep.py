"""``kcs-lens sweep STUDY --out DIR`` (run a study) and ``kcs-lens sweep status DIR`` (where it
stands): a command group whose default command is ``run``, so both spellings coexist (mounted by
cli/main.py as ``app.add_typer(sweep_app, name="sweep")``)."""

from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperGroup

from kcs_lens.cli.config_options import argument, config_parameters, given, option_parameters, with_parameters
from kcs_lens.cli.errors import App
from kcs_lens.settings import build
from kcs_lens.sweep.config import SweepConfig

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


RUN_OPTIONS: dict[str, tuple[Any, Any]] = {
    "out": (Path, typer.Option(..., "--out", help="study directory: sweep.json (the plan) and one run directory per cell")),
    "progress": (bool, typer.Option(True, "--progress/--no-progress", help="show the progress bar of cells")),
    "log": (
        Optional[List[str]],
        typer.Option(
            None,
            "--log",
            help="stream each cell's metrics.jsonl records and config to tensorboard (CELL/tensorboard: tensorboard --logdir "
            "DIR) or wandb (one W&B run per cell, grouped by the study directory's name); repeatable",
        ),
    ),
}


def run(study: Path, **kw: Any) -> None:
    """Run every cell of a study not done yet.

    Interrupted cells resume; exit code 3 when a cell failed."""
    from kcs_lens.sweep import run_sweep

    other = {k: kw.pop(k) for k in RUN_OPTIONS}
    out = other["out"]
    cfg = build(SweepConfig, given(kw))
    res = run_sweep(study, out, cfg, progress=other["progress"], log=typer.echo, track=other["log"] or ())
    if cfg.dry_run:
        print_plan(res["plan"], changed=res["changed"], out=out)
        return
    n, failed = len(res["plan"].cells), res["failed"]
    typer.echo(
        f"{n - len(failed)} of {n} cells done; " + (f"{len(failed)} failed: {', '.join(failed)}" if failed else "none failed")
    )
    typer.echo(f"next: kcs-lens sweep status {out}   kcs-lens report {out}")
    if failed:
        raise typer.Exit(EXIT_CELLS_FAILED)


_study = argument("study", Path, "study file (.toml, .yaml or .json): [base] settings, [grid] lists, [[cells]]")
_other = option_parameters(RUN_OPTIONS)
sweep_app.command("run")(with_parameters(run, [_study, _other[0], *config_parameters(SweepConfig), *_other[1:]]))


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
