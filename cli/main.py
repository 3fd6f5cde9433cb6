"""The ``kcs-lens`` command line (Typer). Thin: parse flags, call the library, print results.

``kcs-lens discover`` -> :func:`kcs_lens.config.build_config` -> :func:`kcs_lens.discovery.discover`
-> run directory with ``subnetwork.safetensors`` and ``summary.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from kcs_lens.cli.errors import EXPECTED_ERRORS, fail
from kcs_lens.cli.kg import kg_app

app = typer.Typer(
    help="Knowledge-critical subnetworks (Bayazit et al., EMNLP 2024) for TransformerLens models.",
    no_args_is_help=False,
    pretty_exceptions_enable=False,
)
app.add_typer(kg_app, name="kg")


def _mount_optional() -> None:
    """Sub-commands that live in their own files (evaluation, comparison)."""
    import importlib

    for mod in ("kcs_lens.cli.evaluate", "kcs_lens.cli.compare"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        m.register(app)


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


@app.command()
def discover(
    model: Optional[str] = typer.Option(None, help="bundled (default), an HF GPT-2 name (gpt2-medium), or a local HF directory"),
    target_kg: Optional[str] = typer.Option(None, "--target-kg", help="TargetKG spec: bundled name (building), file, hf:..."),
    control_kg: Optional[str] = typer.Option(None, "--control-kg", help="ControlKG spec (training split)"),
    control_val_kg: Optional[str] = typer.Option(None, "--control-val-kg", help="ControlKG validation spec ('' = first --control-val-size items of --control-kg)"),
    control_val_size: Optional[int] = typer.Option(None, "--control-val-size", help="validation items split off --control-kg when --control-val-kg is '' (paper: 50)"),
    control_lm: Optional[str] = typer.Option(None, "--control-lm", help="ControlLM text: wikitext-2, bundled, or a .txt file/folder"),
    templates: Optional[str] = typer.Option(None, "--templates", help="relation templates file (JSON/TOML/YAML) for KG rows without text"),
    granularity: Optional[str] = typer.Option(None, help="weight or neuron"),
    layers: Optional[str] = typer.Option(None, help="top-half (default), all, 6-11, or 6,7,8"),
    matrices: Optional[str] = typer.Option(None, help="comma list of W_Q,W_K,W_V,W_O,W_in,W_out"),
    steps: Optional[int] = typer.Option(None, help="training steps (paper: 40000)"),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate on the mask logits (paper: 0.2)"),
    seed: Optional[int] = typer.Option(None, help="seed (paper: 84, 1318, 735)"),
    ablation: Optional[str] = typer.Option(None, help="full, no-suppression, no-control-kg, no-control-lm, no-sparsity"),
    recipe: Optional[str] = typer.Option(None, help="auto (bundled recipe for the bundled model, paper otherwise), paper, bundled"),
    tail_position: Optional[str] = typer.Option(None, "--tail-position", help="correct (default) or released (the authors' off-by-one, for fidelity)"),
    tail_scoring: Optional[str] = typer.Option(None, "--tail-scoring", help="all tail tokens (default) or last"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every"),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every"),
    target_batch: Optional[int] = typer.Option(None, "--target-batch"),
    control_batch: Optional[int] = typer.Option(None, "--control-batch"),
    lm_batch: Optional[int] = typer.Option(None, "--lm-batch"),
    lm_block_len: Optional[int] = typer.Option(None, "--lm-block-len"),
    suppression_weight: Optional[float] = typer.Option(None, "--suppression-weight", help="weight of KL(U||q) on TargetKG (paper: 1.5)"),
    control_kg_weight: Optional[float] = typer.Option(None, "--control-kg-weight", help="weight of KL(p||q) on ControlKG (paper: 1.0)"),
    control_lm_weight: Optional[float] = typer.Option(None, "--control-lm-weight", help="weight of KL(p||q) on ControlLM (paper: 1.0)"),
    sparsity_start: Optional[float] = typer.Option(None, "--sparsity-start", help="sparsity weight until mid-training (paper: 2.0)"),
    sparsity_end: Optional[float] = typer.Option(None, "--sparsity-end", help="sparsity weight at the end, linear from mid-training (paper: 3.0)"),
    warmup_frac: Optional[float] = typer.Option(None, "--warmup-frac", help="linear warm-up share of the steps (paper: 0.1)"),
    init_prob: Optional[float] = typer.Option(None, "--init-prob", help="initial probability of a weight in the sampled subnetwork (paper: 0.45)"),
    share_sample: Optional[bool] = typer.Option(None, "--share-sample/--fresh-sample", help="one mask sample per step for all passes (not the paper's default)"),
    lm_eval_blocks: Optional[int] = typer.Option(None, "--lm-eval-blocks", help="held-out ControlLM blocks per evaluation"),
    tau: Optional[float] = typer.Option(None, "--tau", help="Gumbel-sigmoid temperature (paper: 1.0)"),
    prepend_bos: Optional[bool] = typer.Option(None, "--prepend-bos/--no-prepend-bos", help="prepend BOS to every triplet prompt (default: yes)"),
    select_min_target_ratio: Optional[float] = typer.Option(None, "--select-min-target-ratio", help="checkpoint selection: min target PPL ratio (default 10)"),
    select_max_control_ratio: Optional[float] = typer.Option(None, "--select-max-control-ratio", help="checkpoint selection: max ControlKG PPL ratio (default 1.15)"),
    select_max_lm_ratio: Optional[float] = typer.Option(None, "--select-max-lm-ratio", help="checkpoint selection: max LM PPL ratio (default 1.05)"),
    objective: Optional[str] = typer.Option(None, "--objective", help="fast (default: same losses and gradients, cheaper) or reference (the straightforward implementation)"),
    autocast: Optional[str] = typer.Option(None, "--autocast", help="none (default) or bf16 (CUDA only, fast objective; losses in fp32)"),
    lm_cache_mb: Optional[float] = typer.Option(None, "--lm-cache-mb", help="cache frozen ControlLM activations per block up to this many MB (default 0: off)"),
    backend: Optional[str] = typer.Option(None, help="bridge (TransformerLens 4.x) or hooked (3.x)"),
    device: Optional[str] = typer.Option(None),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML or YAML file of options (flags win)"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<target>-seed<seed>)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue an interrupted run directory"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing run directory"),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="stop (resumably) after this many steps"),
    keep_all_checkpoints: Optional[bool] = typer.Option(None, "--keep-all-checkpoints/--prune-checkpoints", help="keep every mask checkpoint (default: only the latest and the best qualifying)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Find a knowledge-critical subnetwork. With no arguments: the bundled model and its 'building' TargetKG."""
    from kcs_lens.config import build_config
    from kcs_lens.discovery import discover as run_discover

    try:
        if resume is not None:
            summary = run_discover(resume=resume, stop_after=stop_after, progress=progress, log=typer.echo)
        else:
            cfg = build_config(
                config,
                model=model,
                target_kg=target_kg,
                control_kg=control_kg,
                control_val_kg=control_val_kg,
                control_val_size=control_val_size,
                control_lm=control_lm,
                templates=templates,
                granularity=granularity,
                layers=layers,
                matrices=matrices.split(",") if matrices else None,
                steps=steps,
                lr=lr,
                seed=seed,
                ablation=ablation,
                recipe=recipe,
                tail_position=tail_position,
                tail_scoring=tail_scoring,
                eval_every=eval_every,
                checkpoint_every=checkpoint_every,
                target_batch=target_batch,
                control_batch=control_batch,
                lm_batch=lm_batch,
                lm_block_len=lm_block_len,
                suppression_weight=suppression_weight,
                control_kg_weight=control_kg_weight,
                control_lm_weight=control_lm_weight,
                sparsity_start=sparsity_start,
                sparsity_end=sparsity_end,
                warmup_frac=warmup_frac,
                init_prob=init_prob,
                share_sample=share_sample,
                lm_eval_blocks=lm_eval_blocks,
                tau=tau,
                prepend_bos=prepend_bos,
                select_min_target_ratio=select_min_target_ratio,
                select_max_control_ratio=select_max_control_ratio,
                select_max_lm_ratio=select_max_lm_ratio,
                objective=objective,
                autocast=autocast,
                lm_cache_mb=lm_cache_mb,
                backend=backend,
                device=device,
                keep_all_checkpoints=keep_all_checkpoints,
            )
            typer.echo(f"kcs-lens discover: model={cfg.model} target={cfg.target_kg} seed={cfg.seed} steps={cfg.steps} ({cfg.recipe} recipe)")
            summary = run_discover(cfg, out=out, force=force, stop_after=stop_after, progress=progress, log=typer.echo)
    except EXPECTED_ERRORS as e:
        fail(str(e))
    if summary is None:
        typer.echo("stopped before the last step; continue with --resume")
        return
    print_summary(summary)


def print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{s['model']} / TargetKG {s['target_kg']} / seed {s['seed']} (step {s['selected_step']})")
    for col in ("set", "original PPL", "remaining PPL", "dPPL", "ratio"):
        t.add_column(col, justify="right" if col != "set" else "left")
    for key, label in (("target", "TargetKG"), ("control", "ControlKG (val)"), ("lm", "ControlLM (held-out)")):
        t.add_row(
            label,
            f"{s['original'][f'{key}_ppl']:.3f}",
            f"{s['remaining'][f'{key}_ppl']:.3f}",
            f"{s['delta'][f'{key}_dppl']:+.3f}",
            f"{s['ratio'][f'{key}_ratio']:.3f}",
        )
    c = Console(width=max(100, Console().width))
    c.print(t)
    c.print(
        f"sparsity {100 * s['sparsity']:.2f}% of masked weights ({100 * s['sparsity_all_linear']:.2f}% of all linear weights); "
        f"selection criteria {'met' if s['meets_criteria'] else 'NOT met (last checkpoint)'}"
    )
    c.print(f"saved {Path(s['run_dir']) / 'subnetwork.safetensors'} and summary.json")


_mount_optional()

if __name__ == "__main__":  # pragma: no cover
    app()
