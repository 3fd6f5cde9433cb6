"""``kcs-lens evaluate | baseline | overlap | report | export``: thin wrappers over
:mod:`kcs_lens.evaluation.evaluate`, :mod:`kcs_lens.evaluation.overlap`, :mod:`kcs_lens.evaluation.paper_table` and
:mod:`kcs_lens.evaluation.export` (mounted by cli/main.py through ``register``)."""

import inspect
from pathlib import Path
from typing import Any, Callable, List, Optional, TypeVar

import typer

from kcs_lens.cli.config_options import option_parameters, with_parameters
from kcs_lens.cli.model_options import BACKEND_OPT, DEVICE_OPT, MODEL_OPT, overrides
from kcs_lens.cli.result_tables import (
    cell,
    console,
    metrics_tables,
    print_choice_notes,
    print_subnetwork,
    relearn_table,
    set_label,
)

RUN_ARG = typer.Argument(..., help="run directory of kcs-lens discover")
KG_OPT = typer.Option(None, "--kg", help="another KG spec to evaluate against the same subnetwork (repeatable)")
PARA_OPT = typer.Option(
    None,
    "--paraphrases",
    help="KG spec of other verbalizations of the TargetKG (repeatable; default: <target>-paraphrases when bundled)",
)
DISTRACTORS_OPT = typer.Option(
    None,
    "--distractors",
    help="KG spec whose tails join the multiple-choice distractor pool (repeatable; beside the run's own --distractors)",
)
SUB_OPT = typer.Option(None, "--subnetwork", help="a subnetwork file to use instead of RUN/subnetwork.safetensors")
THREADS_OPT = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's, one per core)")
F = TypeVar("F", bound=Callable[..., Any])


def scoring_options(json_file: str, after: str) -> Callable[[F], F]:
    """The options ``evaluate`` and ``baseline`` share (the sets scored, the model, ``--json``,
    ``--threads``), added to a command that takes them as ``**shared`` (read by
    :func:`scoring_inputs`), in ``--help`` right after its parameter ``after``."""
    shared = {
        "kg": (Optional[List[str]], KG_OPT),
        "paraphrases": (Optional[List[str]], PARA_OPT),
        "distractors": (Optional[List[str]], DISTRACTORS_OPT),
        "subnetwork": (Optional[Path], SUB_OPT),
        "model": (Optional[str], MODEL_OPT),
        "backend": (Optional[str], BACKEND_OPT),
        "device": (Optional[str], DEVICE_OPT),
        "json_out": (Optional[Path], typer.Option(None, "--json", help=f"where to write the JSON (default RUN/{json_file})")),
        "threads": (Optional[int], THREADS_OPT),
    }

    def add(fn: F) -> F:
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        at = [p.name for p in own].index(after) + 1
        extra = option_parameters(shared)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if i >= at else p for i, p in enumerate(own)]
        return with_parameters(fn, own[:at] + extra + own[at:])  # type: ignore[return-value]

    return add


def scoring_inputs(run: Path, json_file: str, shared: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """The :class:`~kcs_lens.evaluation.evaluate.EvalInputs` of the shared options and the JSON file
    to write (checked writable first); sets ``--threads``."""
    from kcs_lens.files import check_output_file
    from kcs_lens.threads import set_threads

    set_threads(shared["threads"])
    json_out = shared["json_out"]
    if json_out is not None or Path(run).is_dir():  # a missing RUN is reported as such
        check_output_file(json_out or Path(run) / json_file, "--json")
    inputs = {
        "kgs": shared["kg"] or (),
        "paraphrases": shared["paraphrases"] or None,
        "distractors": shared["distractors"] or (),
        "subnetwork": shared["subnetwork"],
        "overrides": overrides(shared["model"], shared["backend"], shared["device"]),
        "save": json_out or True,
        "log": typer.echo,
    }
    return inputs, json_out or Path(run) / json_file


@scoring_options("evaluation.json", after="run")
def evaluate(
    run: Path = RUN_ARG,
    relearn: int = typer.Option(
        0,
        "--relearn",
        min=0,
        help="also finetune the original and the remaining model (removed weights held at zero) STEPS steps on the "
        "ControlKG training sentences and show how much of the TargetKG comes back (0: no)",
    ),
    relearn_lr: Optional[float] = typer.Option(
        None, "--relearn-lr", help="learning rate of --relearn (default: 3e-5 for the bundled models, else 5e-5)"
    ),
    **shared: Any,
) -> None:
    """Evaluate the original, remaining and subnetwork models.

    Tail PPL, ranks, log-probs, top-k, multiple choice, logit lens and unseen wordings per set;
    sparsity and density; with --relearn, relearning."""
    from kcs_lens.evaluation.evaluate import evaluate_run

    inputs, written = scoring_inputs(run, "evaluation.json", shared)
    res = evaluate_run(run, relearn_steps=relearn, relearn_lr=relearn_lr, **inputs)
    c = console()
    for tab in metrics_tables(res, f"{res['model']} / TargetKG {res['target_kg']} / seed {res['seed']} ({run})"):
        c.print(tab)
    print_choice_notes(c, res["sets"])
    if "relearn" in res:
        c.print(relearn_table(res["relearn"]))
    print_subnetwork(c, res["subnetwork"])
    c.print(f"wrote {written}")


@scoring_options("baseline.json", after="seed")
def baseline(
    run: Path = RUN_ARG,
    draws: int = typer.Option(5, "--draws", min=1, help="number of random subnetworks"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the first draw (draw i uses seed + i)"),
    **shared: Any,
) -> None:
    """Evaluate random subnetworks of the run's size.

    Random subnetworks with the run's per-matrix sizes: mean ± std of every metric over draws."""
    from kcs_lens.evaluation.evaluate import baseline_run
    from kcs_lens.progress import table

    inputs, written = scoring_inputs(run, "baseline.json", shared)
    res = baseline_run(run, draws=draws, seed=seed, **inputs)
    mean, std, own = res["baseline"]["mean"]["metrics"], res["baseline"]["std"]["metrics"], res["run_metrics"]
    t = table(
        f"random baseline ({draws} draws, same per-matrix sizes, sparsity {100 * res['subnetwork']['sparsity']:.3f}%) vs the run",
        ["set", "model", "metric", "run", "random: mean ± std"],
        left=3,
    )
    metrics = [("dppl", "dPPL", "+.4g"), ("ppl_ratio", "PPL ratio", ".4g"), ("dlogprob_mean", "d logprob", "+.3g")]
    metrics += [("top1", "top-1", ".2f"), ("rank_mean", "tail rank", ".1f"), ("mc", "MC", ".2f")]
    for s in own["original"]:
        for v in ("remaining", "subnetwork"):
            o = own[v][s]
            first = True
            for k, name, spec in metrics:
                if k not in o and k not in mean[v][s]:
                    continue
                rand = f"{mean[v][s][k]:{'+' if k[0] == 'd' else ''}.4g} ± {std[v][s][k]:.2g}" if k in mean[v][s] else "-"
                t.add_row(
                    set_label(s) if first and v == "remaining" else "", v if first else "", name, cell(o.get(k), spec), rand
                )
                first = False
    c = console()
    c.print(t)
    c.print(f"wrote {written}")


def overlap(
    runs: List[Path] = typer.Argument(..., help="run directories (seeds) of the same model and layer range"),
    out: Optional[Path] = typer.Option(
        None, "--out", help="new directory for the combinations (one run directory each) and overlap.json"
    ),
    do_eval: bool = typer.Option(False, "--evaluate", help="evaluate every run and combination on the first run's sets"),
    model: Optional[str] = MODEL_OPT,
    backend: Optional[str] = BACKEND_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Combine several seeds' subnetworks.

    Union, intersection and at-least-k-of-n; Jaccard; the share of each layer / matrix shared by all."""
    from kcs_lens.evaluation.overlap import overlap_runs
    from kcs_lens.files import check_output_dir
    from kcs_lens.progress import table

    if out is not None:
        check_output_dir(out, "--out", new=True)
    res = overlap_runs(runs, out=out, evaluate=do_eval, overrides=overrides(model, backend, device), log=typer.echo)
    c = console()
    names = [f"{i}: {Path(r['run']).name} ({Path(str(r['target_kg'])).stem}/s{r['seed']})" for i, r in enumerate(res["runs"])]
    t = table(f"pairwise Jaccard (mean {res['overlap']['jaccard_mean']:.3f})", ["run"] + [n.split(":")[0] for n in names])
    for n, row in zip(names, res["overlap"]["jaccard"]):
        t.add_row(n, *[f"{x:.3f}" for x in row])
    c.print(t)
    cols = ["combination", "k", "sparsity %", "weights"] + (
        ["dPPL TargetKG", "dPPL ControlKG", "dPPL ControlLM"] if do_eval else []
    )
    t = table("combinations", cols)
    rows = [(n, r, r.get("metrics")) for n, r in zip(names, res["runs"])] + [
        (k, v, v.get("metrics")) for k, v in res["combinations"].items()
    ]
    for name, r, m in rows:
        cells = [name, str(r.get("k", "")), f"{100 * r['sparsity']:.3f}", str(r["n_in_subnetwork"])]
        if do_eval:
            cells += [f"{m['remaining'][s]['dppl']:+.3f}" for s in ("target", "control", "lm")]
        t.add_row(*cells)
    c.print(t)
    t = table(
        "shared by all seeds: Jaccard (intersection / union) and mean share of each seed's part",
        ["part", "Jaccard", "shared share", "intersection", "union"],
    )
    ov = res["overlap"]
    for label, d in (
        [("all", ov["all"])] + [(f"layer {k}", v) for k, v in ov["per_layer"].items()] + list(ov["per_matrix"].items())
    ):
        t.add_row(label, f"{d['jaccard_all']:.3f}", f"{d['shared_frac']:.3f}", str(d["n_intersection"]), str(d["n_union"]))
    c.print(t)
    if out:
        c.print(f"wrote {out}/overlap.json and one run directory per combination (kcs-lens evaluate {out}/intersection)")


def report(
    runs: List[Path] = typer.Argument(
        ..., help="run directories, folders of run directories, or one study directory (kcs-lens sweep)"
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="FILE: writes FILE.md, FILE.csv and FILE.png (required for runs; a study: default DIR/study)"
    ),
    draws: int = typer.Option(5, "--draws", min=1, help="random-baseline draws per run"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the first random draw"),
    recompute: bool = typer.Option(False, "--recompute", help="ignore RUN/evaluation.json and RUN/baseline.json"),
    model: Optional[str] = MODEL_OPT,
    backend: Optional[str] = BACKEND_OPT,
    device: Optional[str] = DEVICE_OPT,
    relearn: int = typer.Option(
        0, "--relearn", min=0, help="relearning steps per run, as evaluate --relearn (0: none; cached evaluations are reused)"
    ),
    html: bool = typer.Option(
        False,
        "--html",
        help="also write the run page: one offline HTML file per group of seeds (FILE.html, or FILE-<group>.html "
        "for several groups) with the summary, training curves, per-fact answers, density and config",
    ),
    threads: Optional[int] = THREADS_OPT,
) -> None:
    """Write the paper's table of runs, or a study report.

    The paper's table per model (TargetKG x seed and means, random baseline beside), loss ablations,
    density plot; on a study directory the study report (groups over seeds, seed overlap, unfinished cells);
    --html adds the run pages."""
    from kcs_lens.errors import ConfigError
    from kcs_lens.evaluation.paper_report import report_files, report_runs
    from kcs_lens.evaluation.paper_table import RowSettings
    from kcs_lens.files import check_output_file
    from kcs_lens.sweep import is_study
    from kcs_lens.threads import set_threads

    set_threads(threads)
    settings = RowSettings(draws, seed, recompute, relearn, overrides=overrides(model, backend, device), log=typer.echo)
    if len(runs) == 1 and is_study(runs[0]):
        from kcs_lens.sweep.study import study_report

        res = study_report(runs[0], out, settings, html=html)
    else:
        if out is None:
            raise ConfigError("report: --out FILE is required for run directories (only a study directory has a default)")
        for f in report_files(out)[1]:
            check_output_file(f, "--out")
        res = report_runs(runs, out, settings, html=html)
    typer.echo(Path(res["files"][0]).read_text())
    typer.echo("wrote " + ", ".join(res["files"]))


def export(
    run: Path = RUN_ARG,
    out: Path = typer.Option(..., "--out", help="new HF checkpoint directory"),
    remove: str = typer.Option(
        "subnetwork", "--remove", help="subnetwork (the remaining model) or complement (keep only the subnetwork)"
    ),
    subnetwork: Optional[Path] = SUB_OPT,
    model: Optional[str] = MODEL_OPT,
    backend: Optional[str] = BACKEND_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """Write an HF checkpoint with weights zeroed.

    A checkpoint that AutoModelForCausalLM.from_pretrained loads, with the chosen weights zeroed."""
    from kcs_lens.evaluation.export import export_run
    from kcs_lens.files import check_output_dir

    check_output_dir(out, "--out", new=True)
    path = export_run(run, out, remove=remove, subnetwork=subnetwork, overrides=overrides(model, backend, device))
    typer.echo(f"wrote {path} (removed: {remove}); load it with transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})")


def register(app: typer.Typer) -> None:
    for name, fn in (
        ("evaluate", evaluate),
        ("baseline", baseline),
        ("overlap", overlap),
        ("report", report),
        ("export", export),
    ):
        app.command(name)(fn)
