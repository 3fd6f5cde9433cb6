"""``kcs-lens compare-circuits RUN``: thin wrapper over :func:`kcs_lens.analyses.compare.compare_circuits`."""

from pathlib import Path
from typing import Any, Optional

import typer


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


def register(app: typer.Typer) -> None:
    @app.command("compare-circuits")
    def compare_circuits_cmd(
        run: Path = typer.Argument(..., help="run directory written by `kcs-lens discover`"),
        kg: str = typer.Option("target", "--kg", help="prompts: target (the run's TargetKG), control, or any KG spec"),
        out: Optional[Path] = typer.Option(None, "--out", help="output directory (default RUN/compare-<kg>)"),
        corrupt: str = typer.Option("swap", "--corrupt", help="swap (head entity swapped within the KG), zero or mean"),
        n_bootstrap: int = typer.Option(200, "--n-bootstrap", min=1, help="bootstrap resamples over prompts"),
        seed: int = typer.Option(0, "--seed", min=0, help="seed of the bootstrap intervals and of the head-swap corruption"),
        max_prompts: int = typer.Option(64, "--max-prompts", min=0, help="first N prompts of each set (0 = all)"),
        top_heads: int = typer.Option(3, "--top-heads", min=1, help="heads shown in the attention views"),
        attention_prompts: int = typer.Option(2, "--attention-prompts", min=0, help="prompts with attention views"),
        control: bool = typer.Option(True, "--control/--no-control", help="also analyse the ControlKG (specificity)"),
        backend: Optional[str] = typer.Option(None, help="bridge (TransformerLens 4.x) or hooked (3.x)"),
        device: Optional[str] = typer.Option(
            None, "--device", help="torch device, e.g. cpu or cuda (default: the run's --device)"
        ),
        threads: Optional[int] = typer.Option(
            None, "--threads", min=1, help="torch CPU threads (default: 1 for small models, else torch's)"
        ),
    ) -> None:
        """Compare a subnetwork with other circuit methods.

        Activation patching, attribution patching, direct logit attribution and knock-out; writes an
        offline HTML report."""
        from kcs_lens.analyses.compare import compare_circuits, kg_key
        from kcs_lens.errors import OutputError
        from kcs_lens.files import check_output_dir

        target = check_output_dir(out or run / f"compare-{kg_key(kg)}", "--out")  # before the analysis, not after
        if target.is_dir() and any(target.iterdir()) and not (target / "comparison.json").is_file():
            raise OutputError(
                f"--out {target}: the folder holds other files and is not the output of an earlier compare-circuits "
                "(no comparison.json); its report.html and figures would replace files of the same names: choose a "
                "new or empty folder"
            )

        data = compare_circuits(
            run,
            kg=kg,
            out=out,
            corrupt=corrupt,
            n_bootstrap=n_bootstrap,
            seed=seed,
            max_prompts=max_prompts or None,
            top_k_heads=top_heads,
            attention_prompts=attention_prompts,
            control=control,
            backend=backend,
            device=device,
            threads=threads or "auto",
            log=typer.echo,
        )
        print_agreement(data)
        typer.echo(
            f"wrote {data['files']['report']} and comparison.json, PNG heatmaps in {Path(data['files']['report']).parent} "
            f"({data['timing_s']['total']:.1f} s)"
        )
