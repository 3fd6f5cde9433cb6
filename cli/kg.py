"""``kcs-lens kg ...``: knowledge-graph commands (mounted by cli/main.py as ``app.add_typer(kg_app, name="kg")``).

Commands: ``show`` (summary of a KG) and ``wordnet`` (building TargetKGs/ControlKGs from WordNet).
"""

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import typer

from kcs_lens.cli.errors import App
from kcs_lens.data.loaders import bundled_dir, load_kg
from kcs_lens.data.summary import format_summary, kg_summary
from kcs_lens.errors import KGError

kg_app = App(
    help="Inspect and build knowledge graphs.\n\nTargetKGs and ControlKGs: summaries, and TargetKGs built from WordNet.",
    no_args_is_help=True,
)


def _load_tokenizer(path: Optional[Path]) -> Any:
    """A local tokenizer (``--tokenizer`` or the bundled model's); None when there is none."""
    path = path or (bundled_dir() / "model")
    if not path.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _load_model(spec: str) -> Any:
    from kcs_lens.model.loading import load_model

    return load_model(spec)


@kg_app.command("show")
def show(
    spec: str = typer.Argument(
        ..., help="KG spec: a .jsonl/.json/.csv file or folder, hf:NAME[:SPLIT], builtin:NAME, wordnet:ROOT."
    ),
    control: Optional[str] = typer.Option(None, "--control", help="A ControlKG spec: report its overlap with SPEC."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Model spec (e.g. bundled, gpt2-medium, a local HF dir): adds tail PPL and accuracy."
    ),
    model_name: Optional[str] = typer.Option(
        None, "--model-name", help="Which paper field best_<NAME>_input to read (default: the --model spec)."
    ),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Templates file (JSON/TOML/YAML: relation -> templates)."),
    tokenizer: Optional[Path] = typer.Option(
        None, "--tokenizer", help="Local tokenizer dir for tail token lengths (default: the model's, else the bundled one)."
    ),
    split: Optional[str] = typer.Option(None, "--split", help="Split of an hf: dataset."),
    tail_scoring: str = typer.Option("all", "--tail-scoring", help="'all' tail tokens or only the 'last'."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="triplets scored per forward pass"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarize a knowledge graph.

    Counts per relation, tail token lengths, templates, overlap with a control set, model fit."""
    if tail_scoring not in ("all", "last"):
        raise KGError(f"--tail-scoring must be 'all' or 'last', got {tail_scoring!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name_for_fields = model_name or model
        kg = load_kg(spec, model_name=name_for_fields, templates=templates, split=split)
        ctrl = load_kg(control, model_name=name_for_fields, templates=templates) if control else None
    for w in caught:
        typer.echo(f"note: {w.message}", err=True)
    lm = _load_model(model) if model else None
    tok = lm.tokenizer if lm is not None else _load_tokenizer(tokenizer)
    summary = kg_summary(kg, tokenizer=tok, control=ctrl, model=lm, tail_scoring=tail_scoring, batch_size=batch_size)  # type: ignore[arg-type]
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


@kg_app.command("wordnet")
def wordnet_cmd(
    root: str = typer.Option(..., "--root", help="Root synset of the TargetKG, e.g. building.n.01"),
    out: Path = typer.Option(Path("kg"), "--out", help="Output folder for target_<root>.jsonl (and control.jsonl)"),
    up: int = typer.Option(1, "--up", min=0, help="Hypernym levels above the root"),
    down: int = typer.Option(2, "--down", min=0, help="Hyponym levels below the root"),
    min_triplets: int = typer.Option(10, "--min-triplets", min=1, help="refuse a TargetKG with fewer triplets than this"),
    max_triplets: int = typer.Option(
        40, "--max-triplets", min=1, help="keep at most this many TargetKG triplets (sampled with --seed)"
    ),
    control: int = typer.Option(
        0, "--control", min=0, help="Also build a ControlKG of this many IsA triplets sharing no synset with the TargetKG"
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the triplet and ControlKG sampling"),
    wordnet_dir: Optional[Path] = typer.Option(
        None, "--wordnet", help="Local WordNet directory (default: NLTK data, else /usr/share/wordnet)"
    ),
) -> None:
    """Build a TargetKG from WordNet.

    Like the paper's: a connected IsA neighbourhood of a WordNet synset."""
    from kcs_lens.data.wordnet import build_control_kg, build_target_kg, kg_synsets, open_wordnet
    from kcs_lens.files import atomic_write_bytes, check_output_dir

    if min_triplets > max_triplets:
        raise KGError(f"--min-triplets {min_triplets} is larger than --max-triplets {max_triplets}")
    check_output_dir(out, "--out")
    wn = open_wordnet(wordnet_dir)
    target = build_target_kg(wn, root, up=up, down=down, min_triplets=min_triplets, max_triplets=max_triplets, seed=seed)
    files = {out / f"target_{root.split('.')[0]}.jsonl": target}
    if control:
        files[out / "control.jsonl"] = build_control_kg(wn, kg_synsets(target), control, seed)
    for path, rows in files.items():
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
        typer.echo(f"wrote {len(rows)} IsA triplets to {path}")
