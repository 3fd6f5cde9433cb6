"""``kcs-lens discover``: one flag per :class:`~kcs_lens.discovery.config.DiscoveryConfig` field, generated
from the fields (cli/config_options.py), plus the flags of the run itself (``--config``,
``--out``, ``--resume``, ``--force``, ``--stop-after``, ``--progress``, ``--log``)."""

from pathlib import Path
from typing import Any, List, Optional

import typer

from kcs_lens.cli.config_options import config_parameters, option_parameters, with_parameters
from kcs_lens.discovery.config import DiscoveryConfig, build_config, field_default
from kcs_lens.discovery.recipes import BUNDLED_RECIPE, BUNDLED_RECIPE_BY_GRANULARITY

THREADS_HELP = (
    "torch CPU threads (default: torch's, one per core); results are byte-identical only between runs with "
    "the same number; on a shared machine or under a scheduler: the cores you were given (docs/performance.md)"
)
THREADS_OPTION = typer.Option(None, "--threads", min=1, help=THREADS_HELP)

RUN_OPTIONS: dict[str, tuple[Any, Any]] = {
    "config": (Optional[Path], typer.Option(None, "--config", help="TOML, YAML or JSON file of options (flags win)")),
    "out": (Optional[Path], typer.Option(None, "--out", help="run directory (default runs/<target>-seed<seed>)")),
    "resume": (Optional[Path], typer.Option(None, "--resume", help="continue an interrupted run directory")),
    "force": (bool, typer.Option(False, "--force", help="replace an existing run directory (only a kcs-lens run directory)")),
    "stop_after": (Optional[int], typer.Option(None, "--stop-after", min=1, help="stop (resumably) after this many steps")),
    "progress": (bool, typer.Option(True, "--progress/--no-progress", help="show the progress bar")),
    "log": (
        Optional[List[str]],
        typer.Option(
            None,
            "--log",
            help="also stream each evaluation record (the lines of metrics.jsonl) and the config to tensorboard "
            "(RUN/tensorboard) or wandb (RUN/wandb; WANDB_MODE=offline works offline); repeatable; not part of the "
            "run's config (a run resumes with or without it)",
        ),
    ),
    "threads": (Optional[int], THREADS_OPTION),
}


def _show_default(d: Any) -> str:
    return ",".join(d) if isinstance(d, list) else "unset" if d is None else str(d)


def _default_note(name: str) -> str:
    """The default as help shows it: with the bundled recipe's value beside it where that recipe
    (what --recipe auto runs on the bundled models) sets the field, so the help shows what will run."""
    d = field_default(name)
    if name in BUNDLED_RECIPE:
        by_gran = "".join(f"; {v[name]:g} at --granularity {g}" for g, v in BUNDLED_RECIPE_BY_GRANULARITY.items() if name in v)
        return f" [default: {_show_default(d)} (paper recipe); bundled recipe: {_show_default(BUNDLED_RECIPE[name])}{by_gran}]"
    return "" if d is None or isinstance(d, bool) else f" [default: {_show_default(d)}]"


def register(app: typer.Typer) -> None:
    def discover(**kw: Any) -> None:
        """Find a knowledge-critical subnetwork.

        With no arguments: the bundled model and its 'building' TargetKG, bundled recipe."""
        from kcs_lens.discovery.runner import discover as run_discover
        from kcs_lens.threads import set_threads

        run = {k: kw.pop(k) for k in RUN_OPTIONS}
        set_threads(run["threads"])
        if run["resume"] is not None:
            summary = run_discover(
                resume=run["resume"], stop_after=run["stop_after"], progress=run["progress"], log=typer.echo, track=run["log"]
            )
        else:
            from kcs_lens.tracking import check_tracking, parse_tracking

            check_tracking(parse_tracking(run["log"]))  # before the settings line and any work
            cfg = build_config(run["config"], **kw)
            typer.echo(
                f"kcs-lens discover: model={cfg.model} target={cfg.target_kg} seed={cfg.seed} steps={cfg.steps} ({cfg.recipe} recipe)"
            )
            summary = run_discover(
                cfg,
                out=run["out"],
                force=run["force"],
                stop_after=run["stop_after"],
                progress=run["progress"],
                log=typer.echo,
                track=run["log"],
            )
        if summary is None:
            typer.echo("stopped before the last step; continue with --resume")
            return
        print_summary(summary)

    params = config_parameters(DiscoveryConfig, default_note=_default_note) + option_parameters(RUN_OPTIONS)
    app.command()(with_parameters(discover, params))


def print_summary(s: dict[str, Any]) -> None:
    """The final table: PPL (the paper's measure) and the answers (top-1 accuracy and mean rank of
    the tail's first token), original -> remaining; '-' where an older summary.json lacks a value."""
    from kcs_lens.evaluation.paper_table import before_after
    from kcs_lens.progress import table, terminal

    t = table(
        f"{s['model']} / TargetKG {s['target_kg']} / seed {s['seed']} (step {s['selected_step']}); "
        "PPL, top-1 and tail rank of the original (orig.) → remaining (rem.) model",
        ["set", "orig. PPL", "rem. PPL", "dPPL", "ratio", "top-1", "tail rank"],
    )
    mc = s.get("multiple_choice") or {}
    mc_t = table("multiple choice among same-relation tails: original → remaining", ["set", "MC", "chance"])
    o, r = s["original"], s["remaining"]
    sets = [("target", "TargetKG"), ("control", "ControlKG\n(val)"), ("lm", "ControlLM\n(held-out)")]
    if "control_test_ppl" in r:
        sets.insert(2, ("control_test", "ControlKG\n(test, held\nout)"))
    if "paraphrases_ppl" in r:
        sets.insert(1, ("paraphrases", "TargetKG,\nunseen\nwordings"))
    for key, label in sets:
        answers = key != "lm"
        chance = (mc.get(key) or {}).get("chance")
        if answers and chance is not None:
            mc_t.add_row(label, before_after(o.get(f"{key}_mc"), r.get(f"{key}_mc")), f"{chance:.2f}")
        t.add_row(
            label,
            f"{o[f'{key}_ppl']:.3f}",
            f"{r[f'{key}_ppl']:.3f}",
            f"{s['delta'][f'{key}_dppl']:+.3f}",
            f"{s['ratio'][f'{key}_ratio']:.3f}",
            before_after(o.get(f"{key}_top1"), r.get(f"{key}_top1")) if answers else "",
            before_after(o.get(f"{key}_rank"), r.get(f"{key}_rank"), ".1f") if answers else "",
        )
    c = terminal()
    c.print(t)
    if mc_t.row_count:
        c.print(mc_t)
    c.print(
        f"sparsity {100 * s['sparsity']:.2f}% of masked weights ({100 * s['sparsity_all_linear']:.2f}% of all linear weights); "
        f"selection criteria {'met' if s['meets_criteria'] else 'NOT met (last checkpoint)'}"
    )
    lens = "target_lens_top10_any"
    if lens in r:
        c.print(f"logit lens: TargetKG facts whose tail is in the top 10 at some layer {before_after(o.get(lens), r.get(lens))}")
    short = {k: v for k, v in mc.items() if isinstance(v, dict) and (v.get("n_short") or v.get("n_skipped"))}
    for k, v in short.items():
        c.print(
            f"multiple choice on {k}: {v['n_short']} triplet(s) had fewer than {v['k']} choices (their relation has too few "
            f"other tails) and {v['n_skipped']} none, left out"
        )
    c.print(f"saved {Path(s['run_dir']) / 'subnetwork.safetensors'} and summary.json")
