"""``kcs-lens downstream``: a thin wrapper over :func:`kcs_lens.downstream.downstream` (mounted by
cli/main.py through ``register``)."""

from pathlib import Path
from typing import List, Optional

import typer


def downstream(
    runs: List[Path] = typer.Argument(..., help="discovery run directories (or overlap combinations); several need --out"),
    train: Optional[str] = typer.Option(
        None, "--train", help="train questions: a .jsonl/.json file (CommonsenseQA HF or original schema) or hf:name[:split]"
    ),
    test: Optional[str] = typer.Option(None, "--test", help="test questions, same formats as --train"),
    task: Optional[str] = typer.Option(None, "--task", help="a shipped task instead of --train/--test: bundled"),
    links: Optional[List[str]] = typer.Option(
        None, "--links", help="KG file whose rows carry question ids (the paper's csqa*_best_format.json; repeatable)"
    ),
    finetune: str = typer.Option("head", "--finetune", help="head (MC head on the frozen model), full, or lm (causal LM)"),
    epochs: int = typer.Option(0, "--epochs", min=0, help="epochs (0: head 20, full 3, lm 3)"),
    lr: float = typer.Option(
        0.0, "--lr", min=0.0, help="AdamW learning rate (0: head 1e-3, full and lm 5e-5; 1e-3 for the bundled model)"
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="questions per step"),
    weight_decay: float = typer.Option(0.0, "--weight-decay", min=0.0, help="AdamW weight decay"),
    lm_score: str = typer.Option("sum", "--lm-score", help="lm: a choice's score is its tokens' log-likelihood, sum or mean"),
    prompt: str = typer.Option(
        "Question: {question}\nAnswer:", "--prompt", help="text before each choice; {question} is the question"
    ),
    seeds: str = typer.Option("1,2,3", "--seeds", help="finetuning seeds (head init and data order), comma-separated"),
    baseline_draws: int = typer.Option(3, "--baseline-draws", min=1, help="random removals of the same size per matrix"),
    baseline_seed: int = typer.Option(0, "--baseline-seed", help="seed of the first random draw (draw i: seed + i)"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="share of --train held out to pick the best epoch"),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="bootstrap resamples for the 95% intervals"),
    bootstrap_seed: int = typer.Option(0, "--bootstrap-seed", help="seed of the bootstrap resamples"),
    subnetwork: Optional[Path] = typer.Option(None, "--subnetwork", help="a subnetwork file instead of RUN's (one run)"),
    model: Optional[str] = typer.Option(None, "--model", help="model spec to use instead of the run's (same weights)"),
    backend: Optional[str] = typer.Option(None, "--backend", help="bridge (TransformerLens 4.x) or hooked (3.x)"),
    device: Optional[str] = typer.Option(None, "--device", help="torch device, e.g. cpu or cuda (default: the run's)"),
    out: Optional[Path] = typer.Option(None, "--out", help="where downstream.json / .md go (default: RUN)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show the progress bar"),
) -> None:
    """Finetune the models on a QA task and compare them.

    Finetunes the original, remaining and random-pruned models on a multiple-choice task and compares their accuracy on the questions that need the removed knowledge (docs/downstream.md)."""
    from kcs_lens.downstream import FinetuneSettings
    from kcs_lens.downstream import downstream as run_downstream

    settings = FinetuneSettings(
        mode=finetune,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        lm_score=lm_score,
        prompt=prompt,
    )
    res = run_downstream(
        runs,
        train=train,
        test=test,
        task=task,
        links=links or (),
        settings=settings,
        seeds=seeds,
        baseline_draws=baseline_draws,
        baseline_seed=baseline_seed,
        val_fraction=val_fraction,
        bootstrap=bootstrap,
        bootstrap_seed=bootstrap_seed,
        subnetwork=subnetwork,
        model=model,
        backend=backend,
        device=device,
        out=out,
        progress=progress,
        log=typer.echo,
    )
    typer.echo(Path(res["files"][1]).read_text())
    typer.echo("wrote " + ", ".join(res["files"]))


def register(app: typer.Typer) -> None:
    app.command("downstream")(downstream)
