"""``kcs-lens compare-circuits RUN``: one flag per :class:`~kcs_lens.analyses.config.CompareConfig` field
(generated, cli/config_options.py), the model overrides and ``--out``; a thin wrapper over
:func:`kcs_lens.analyses.compare.compare_circuits`."""

from pathlib import Path
from typing import Any, Optional

import typer

from kcs_lens.analyses.config import CompareConfig
from kcs_lens.cli.config_options import argument, config_parameters, given, option_parameters, with_parameters
from kcs_lens.cli.model_options import BACKEND_OPT, DEVICE_OPT, MODEL_OPT, overrides
from kcs_lens.settings import build


def _fmt(s: dict[str, Any] | None) -> str:
    if not s or s["value"] is None:
        return "n/a"
    ci = s["ci95"]
    return f"{s['value']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")


def _effect(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def print_agreement(data: dict[str, Any]) -> None:
    """Per prompt set: the rank agreement of the methods; on a head-granularity run also every head
    of the masked layers (decision, mask probability, each method's mean effect) and how well each
    method's |effect| singles out the heads in the subnetwork."""
    from kcs_lens.progress import table, terminal

    c = terminal()
    for name, res in data["sets"].items():
        rows = res["agreement"]["masked_layers"]
        n = next(iter(rows.values()))["n_units"]
        t = table(
            f"{name} prompts (n={res['n_prompts']}): agreement over {n} units in masked layers, 95% CI",
            ["methods", "Spearman", "Kendall", "Jaccard@5", "Jaccard@10"],
        )
        for pair, s in rows.items():
            t.add_row(pair, _fmt(s["spearman"]), _fmt(s["kendall"]), _fmt(s.get("jaccard@5")), _fmt(s.get("jaccard@10")))
        c.print(t)
        hd = res.get("head_decisions")
        if hd:  # head-granularity run: its heads against each method, one to one
            t = table(
                f"{name}: every head of the masked layers, its decision, mask probability and each method's mean effect",
                ["head", "in", "σ(l)", "knock-out", "patching", "attribution", "DLA"],
            )
            t.columns[1].justify = "left"
            for h in hd["heads"]:
                t.add_row(
                    h["head"],
                    "yes" if h["in_subnetwork"] else "no",
                    f"{h['mask_prob']:.3f}",
                    *(_effect(h[m]) for m in ("knockout", "patching", "attribution", "dla")),
                )
            c.print(t)
            t = table(
                f"{name}: heads in the subnetwork ({', '.join(hd['in_subnetwork']) or 'none'}) vs |effect|",
                ["method", "AUROC", "precision@k"],
            )
            for m, a in hd["agreement"].items():
                t.add_row(m, _fmt(a["auroc"]), _fmt(a["precision@k"]))
            c.print(t)


OTHER_OPTIONS: dict[str, tuple[Any, Any]] = {
    "out": (Optional[Path], typer.Option(None, "--out", help="output directory (default RUN/compare-<kg>)")),
    "model": (Optional[str], MODEL_OPT),
    "backend": (Optional[str], BACKEND_OPT),
    "device": (Optional[str], DEVICE_OPT),
}


def compare_circuits_cmd(run: Path, **kw: Any) -> None:
    """Compare a subnetwork with other circuit methods.

    Activation patching, attribution patching, direct logit attribution and knock-out; writes an
    offline HTML report."""
    from kcs_lens.analyses.compare import compare_circuits
    from kcs_lens.analyses.prompts import kg_key
    from kcs_lens.errors import OutputError
    from kcs_lens.files import check_output_dir

    other = {k: kw.pop(k) for k in OTHER_OPTIONS}
    cfg = build(CompareConfig, given(kw)).validate()
    target = check_output_dir(other["out"] or run / f"compare-{kg_key(cfg.kg)}", "--out")  # before the analysis, not after
    if target.is_dir() and any(target.iterdir()) and not (target / "comparison.json").is_file():
        raise OutputError(
            f"--out {target}: the folder holds other files and is not the output of an earlier compare-circuits "
            "(no comparison.json); its report.html and figures would replace files of the same names: choose a "
            "new or empty folder"
        )
    data = compare_circuits(
        run, cfg, out=other["out"], overrides=overrides(other["model"], other["backend"], other["device"]), log=typer.echo
    )
    print_agreement(data)
    typer.echo(
        f"wrote {data['files']['report']} and comparison.json, PNG heatmaps in {Path(data['files']['report']).parent} "
        f"({data['timing_s']['total']:.1f} s)"
    )


def register(app: typer.Typer) -> None:
    run = argument("run", Path, "run directory written by `kcs-lens discover`")
    params = [run, *config_parameters(CompareConfig), *option_parameters(OTHER_OPTIONS)]
    app.command("compare-circuits")(with_parameters(compare_circuits_cmd, params))
