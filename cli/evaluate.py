"""``kcs-lens evaluate | baseline | overlap | report | export``: thin wrappers over
:mod:`kcs_lens.evaluation.evaluate`, :mod:`kcs_lens.evaluation.overlap`, :mod:`kcs_lens.evaluation.paper_table` and
:mod:`kcs_lens.evaluation.export` (mounted by cli/main.py through ``register``)."""

from pathlib import Path
from typing import Any, List, Optional

import typer

# two lines where long, so that the tables fit 80 columns
SET_LABELS = {
    "target": "TargetKG",
    "control": "ControlKG\n(val)",
    "control_test": "ControlKG\n(test, held\nout)",
    "lm": "ControlLM\n(held-out)",
    "paraphrases": "unseen\nwordings",
}

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
MODEL_OPT = typer.Option(None, "--model", help="model spec to use instead of the run's (must have the same weights)")
SUB_OPT = typer.Option(None, "--subnetwork", help="a subnetwork file to use instead of RUN/subnetwork.safetensors")
BACKEND_OPT = typer.Option(None, "--backend", help="bridge (TransformerLens 4.x) or hooked (3.x)")
DEVICE_OPT = typer.Option(None, "--device", help="torch device, e.g. cpu or cuda (default: the run's --device)")
THREADS_OPT = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's, one per core)")


def _console():
    from kcs_lens.progress import terminal

    return terminal()


def _label(name: str) -> str:
    return SET_LABELS.get(name, name)


def _f(x: Any, spec: str = ".3f") -> str:
    """A table cell; '-' for a value the run's files lack (older runs, or no original to compare)."""
    return "-" if x is None else format(x, spec)


def metrics_tables(res: dict[str, Any], title: str) -> list[Any]:
    """Two tables per evaluation, each fitting 80 columns: PPL, top-k and rank; then the multiple
    choice and the per-triplet rank and log-prob changes (mean [min, max])."""
    from kcs_lens.progress import table

    main = table(title, ["set", "model", "PPL", "dPPL", "ratio", "top-1", "top-5", "top-10", "rank"], left=2)
    more = table(
        "multiple choice (MC; chance) and per-triplet change vs the original: mean [min,max]",
        ["set", "model", "MC (chance)", "MC norm", "d rank", "d logprob"],
        left=2,
    )
    m = res["metrics"]
    for s in m["original"]:
        for v in m:
            x = m[v][s]
            rng = lambda k, f, g, x=x: (
                "" if f"{k}_mean" not in x else f"{x[k + '_mean']:+.{f}f} [{x[k + '_min']:+.{g}f},{x[k + '_max']:+.{g}f}]"
            )
            label = _label(s) if v == "original" else ""
            kg = s != "lm"
            main.add_row(
                label,
                v,
                _f(x["ppl"]),
                _f(x.get("dppl"), "+.3f") if v != "original" else "",
                _f(x.get("ppl_ratio")) if v != "original" else "",
                *((_f(x.get(f"top{k}"), ".2f") if kg else "") for k in (1, 5, 10)),
                _f(x.get("rank_mean"), ".1f") if kg else "",
            )
            if kg:
                more.add_row(
                    label,
                    v,
                    f"{x['mc']:.2f} ({x['mc_chance']:.2f})" if "mc" in x else "",
                    _f(x.get("mc_norm"), ".2f") if "mc" in x else "",
                    rng("drank", 1, 0),
                    rng("dlogprob", 2, 2),
                )
    return [main, more]


def relearn_table(r: dict[str, Any]):
    """Before -> after relearning, original and remaining model, per set."""
    from kcs_lens.progress import table

    rec = r["recovered"]
    share = lambda x: "-" if x is None else f"{100 * x:.0f}%"
    t = table(
        f"relearning ({r['steps']} steps): TargetKG drop recovered: top-1 {share(rec['top1'])}, MC {share(rec['mc'])}",
        ["set", "model", "top-1", "MC", "PPL"],
        left=2,
    )
    t.caption = (
        f"before → after finetuning on the {r['data']} (lr {r['lr']:g}, batch {r['batch_size']}, seed {r['seed']}); "
        "removed weights held at zero"
    )
    for s in r["remaining"]["before"]:
        for v in ("original", "remaining"):
            b, a = r[v]["before"].get(s, {}), r[v]["after"].get(s, {})
            ba = lambda k, spec=".2f", b=b, a=a: f"{_f(b.get(k), spec)} → {_f(a.get(k), spec)}" if k in b else ""
            t.add_row(_label(s) if v == "original" else "", v, ba("top1"), ba("mc"), ba("ppl", ".3f"))
    return t


def print_choice_notes(c, sets: dict[str, Any]) -> None:
    """How the multiple choice was drawn, and the sets whose relations had too few tails for k choices."""
    mcs = {k: v["multiple_choice"] for k, v in sets.items() if "multiple_choice" in v}
    if not mcs:
        return
    k = next(iter(mcs.values()))["k"]
    c.print(
        f"multiple choice (MC): the true tail against up to {k - 1} other tails of its relation (fixed seed); MC = share "
        "where it has the highest summed log-prob, MC norm = the same per token; chance in brackets"
    )
    for name, d in mcs.items():
        if d["n_short"] or d["n_skipped"]:
            c.print(
                f"  {_label(name)}: {d['n_short']} triplet(s) had fewer than {d['k']} choices (too few other tails of their "
                f"relation), {d['n_skipped']} none (left out)"
            )


def print_subnetwork(c, st: dict[str, Any]) -> None:
    from kcs_lens.progress import table

    d = st["density"]
    mats = list(d["per_matrix"])
    t = table("density (% of weights in the subnetwork)", ["layer", *mats, "all"])
    for l, row in d["per_layer_matrix"].items():
        t.add_row(l, *[f"{100 * row[m]:.2f}" for m in mats], f"{100 * d['per_layer'][l]:.2f}")
    t.add_row("all", *[f"{100 * d['per_matrix'][m]:.2f}" for m in mats], f"{100 * (1 - st['sparsity']):.2f}")
    c.print(t)
    for l, heads in d["per_head"].items():
        c.print(
            f"layer {l} density per head (heads 0-{len(heads['all']) - 1}, Q,K,V,O together) %: "
            + " ".join(f"{100 * x:.2f}" for x in heads["all"])
        )
    lg = st["logits"]
    c.print(
        f"sparsity {100 * st['sparsity']:.3f}% of masked weights, {100 * st['sparsity_all_linear']:.3f}% of all linear weights "
        f"({st['n_in_subnetwork']} of {st['n_masked']} masked weights in the subnetwork); mask probabilities near 0: "
        f"{100 * lg['near_0']:.1f}%, near 1: {100 * lg['near_1']:.1f}% (within {lg['near_threshold']})"
    )


def evaluate(
    run: Path = RUN_ARG,
    kg: Optional[List[str]] = KG_OPT,
    paraphrases: Optional[List[str]] = PARA_OPT,
    distractors: Optional[List[str]] = DISTRACTORS_OPT,
    subnetwork: Optional[Path] = SUB_OPT,
    model: Optional[str] = MODEL_OPT,
    backend: Optional[str] = BACKEND_OPT,
    device: Optional[str] = DEVICE_OPT,
    json_out: Optional[Path] = typer.Option(None, "--json", help="where to write the JSON (default RUN/evaluation.json)"),
    threads: Optional[int] = THREADS_OPT,
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
) -> None:
    """Evaluate the original, remaining and subnetwork models.

    Tail PPL, ranks, log-probs, top-k, multiple choice, logit lens and unseen wordings per set;
    sparsity and density; with --relearn, relearning."""
    from kcs_lens.evaluation.evaluate import evaluate_run
    from kcs_lens.files import check_output_file
    from kcs_lens.threads import set_threads

    set_threads(threads)

    if json_out is not None or Path(run).is_dir():  # a missing RUN is reported as such
        check_output_file(json_out or Path(run) / "evaluation.json", "--json")
    res = evaluate_run(
        run,
        kgs=kg or (),
        paraphrases=paraphrases or None,
        distractors=distractors or (),
        subnetwork=subnetwork,
        model=model,
        backend=backend,
        device=device,
        save=json_out or True,
        log=typer.echo,
        relearn_steps=relearn,
        relearn_lr=relearn_lr,
    )
    c = _console()
    for tab in metrics_tables(res, f"{res['model']} / TargetKG {res['target_kg']} / seed {res['seed']} ({run})"):
        c.print(tab)
    print_choice_notes(c, res["sets"])
    if "relearn" in res:
        c.print(relearn_table(res["relearn"]))
    print_subnetwork(c, res["subnetwork"])
    c.print(f"wrote {json_out or Path(run) / 'evaluation.json'}")


def baseline(
    run: Path = RUN_ARG,
    draws: int = typer.Option(5, "--draws", min=1, help="number of random subnetworks"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the first draw (draw i uses seed + i)"),
    kg: Optional[List[str]] = KG_OPT,
    paraphrases: Optional[List[str]] = PARA_OPT,
    distractors: Optional[List[str]] = DISTRACTORS_OPT,
    subnetwork: Optional[Path] = SUB_OPT,
    model: Optional[str] = MODEL_OPT,
    backend: Optional[str] = BACKEND_OPT,
    device: Optional[str] = DEVICE_OPT,
    json_out: Optional[Path] = typer.Option(None, "--json", help="where to write the JSON (default RUN/baseline.json)"),
    threads: Optional[int] = THREADS_OPT,
) -> None:
    """Evaluate random subnetworks of the run's size.

    Random subnetworks with the run's per-matrix sizes: mean ± std of every metric over draws."""
    from kcs_lens.evaluation.evaluate import baseline_run
    from kcs_lens.files import check_output_file
    from kcs_lens.progress import table
    from kcs_lens.threads import set_threads

    set_threads(threads)

    if json_out is not None or Path(run).is_dir():  # a missing RUN is reported as such
        check_output_file(json_out or Path(run) / "baseline.json", "--json")
    res = baseline_run(
        run,
        draws=draws,
        seed=seed,
        kgs=kg or (),
        paraphrases=paraphrases or None,
        distractors=distractors or (),
        subnetwork=subnetwork,
        model=model,
        backend=backend,
        device=device,
        save=json_out or True,
        log=typer.echo,
    )
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
                t.add_row(_label(s) if first and v == "remaining" else "", v if first else "", name, _f(o.get(k), spec), rand)
                first = False
    c = _console()
    c.print(t)
    c.print(f"wrote {json_out or Path(run) / 'baseline.json'}")


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
    res = overlap_runs(runs, out=out, evaluate=do_eval, model=model, backend=backend, device=device, log=typer.echo)
    c = _console()
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
    from kcs_lens.evaluation.paper_table import report_files, report_runs
    from kcs_lens.files import check_output_file
    from kcs_lens.sweep import is_study
    from kcs_lens.threads import set_threads

    set_threads(threads)
    if len(runs) == 1 and is_study(runs[0]):
        from kcs_lens.sweep.study import study_report

        res = study_report(
            runs[0], out, draws=draws, seed=seed, recompute=recompute, device=device, log=typer.echo, html=html, relearn=relearn
        )
    else:
        if out is None:
            raise ConfigError("report: --out FILE is required for run directories (only a study directory has a default)")
        for f in report_files(out)[1]:
            check_output_file(f, "--out")
        res = report_runs(
            runs, out, draws=draws, seed=seed, recompute=recompute, device=device, log=typer.echo, html=html, relearn=relearn
        )
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
    path = export_run(run, out, remove=remove, subnetwork=subnetwork, model=model, backend=backend, device=device)  # type: ignore[arg-type]
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
