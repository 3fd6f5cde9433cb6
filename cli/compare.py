"""``kcs-lens compare-circuits RUN``: thin wrapper over :func:`kcs_lens.analyses.compare.compare_circuits`."""

from pathlib import Path
from typing import Any, Optional

import typer


def print_agreement(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console(width=max(110, Console().width))
    for name, res in data["sets"].items():
        rows = res["agreement"]["masked_layers"]
        n = next(iter(rows.values()))["n_units"]
        t = Table(title=f"{name} prompts (n={res['n_prompts']}): agreement over {n} units in masked layers, 95% CI")
        for col in ("methods", "Spearman", "Kendall", "Jaccard@5", "Jaccard@10"):
            t.add_column(col, justify="left" if col == "methods" else "right")

        def fmt(s: dict[str, Any] | None) -> str:
            if not s or s["value"] is None:
                return "n/a"
            ci = s["ci95"]
            return f"{s['value']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")

        for pair, s in rows.items():
            t.add_row(pair, fmt(s["spearman"]), fmt(s["kendall"]), fmt(s.get("jaccard@5")), fmt(s.get("jaccard@10")))
        c.print(t)
        hd = res.get("head_decisions")
        if hd:  # head-granularity run: its heads against each method, one to one
            t = Table(title=f"{name}: heads in the subnetwork ({', '.join(hd['in_subnetwork']) or 'none'}) vs |effect|")
            for col in ("method", "AUROC", "precision@k"):
                t.add_column(col, justify="left" if col == "method" else "right")
            for m, a in hd["agreement"].items():
                t.add_row(m, fmt(a["auroc"]), fmt(a["precision@k"]))
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
        """Compare a subnetwork with activation patching, attribution and knock-out; write an offline HTML report."""
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
