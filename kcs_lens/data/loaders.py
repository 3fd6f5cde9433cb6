"""Load knowledge graphs (TargetKG, ControlKG, paraphrase sets) from a spec string.

Specs understood by :func:`load_kg`:

- ``path.jsonl`` / ``path.json`` / ``path.csv`` / ``path.tsv``: the format is detected from the rows:
  canonical (``head``, ``relation`` (or ``rel``), ``tail``, optional ``text``; extra fields kept in
  ``meta``), the paper's released ``*_best_format.json`` (``best_<model>_input`` fields) and
  ``*_worse_format.json`` (paraphrases), or LAMA jsonl (``sub``, ``obj``, ``pred``). Rows without a
  text are verbalized with the relation's first template.
- a directory: every supported file in it (sorted by name, ``*_worse_format.json`` skipped),
  concatenated; e.g. the paper's ``conceptnet_lama/controlkg`` gives its train + val.
- ``hf:owner/name[:split]`` (Hugging Face Hub) or ``hf:/local/path[:split]``: any dataset with
  the columns above, through ``datasets.load_dataset``.
- ``wordnet:<root synset>[:<wordnet dir>]``: a TargetKG built from WordNet (``kcs_lens.data.wordnet``).
- ``builtin:<name>`` or a bare short name (``building``, ``control``, ``control-val``,
  ``building-paraphrases``, ...): the sets shipped in ``kcs_lens/bundled/kg``.

Every error is a :class:`KGError` naming the file and line (JSONL/CSV), item (JSON) or row (HF)
and the field concerned.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from kcs_lens.data.kg_rows import (
    FILE_SUFFIXES,
    KGFallbackWarning,
    detect_format,
    model_field_name,
    read_rows,
    rows_to_triplets,
)
from kcs_lens.data.templates import merge_templates
from kcs_lens.data.triplets import TripletSet, concat
from kcs_lens.errors import KGError

__all__ = [
    "KGFallbackWarning",
    "load_kg",
    "read_rows",
    "rows_to_triplets",
    "detect_format",
    "bundled_dir",
    "builtin_names",
    "model_field_name",
    "parse_hf_spec",
    "hub_offline",
]

log = logging.getLogger(__name__)


def _set_name(path: Path) -> str:
    """'building.n.01_best_format.json' -> 'building.n.01'; worse format -> '<name>-paraphrases'."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    if stem.endswith("_worse_format"):
        return stem[: -len("_worse_format")] + "-paraphrases"
    for tag in ("_best_format",):
        stem = stem.replace(tag, "")
    return stem


def _load_file(path: Path, model_name: str | None, templates: Mapping[str, list[str]]) -> TripletSet:
    paraphrase = "worse_format" in path.name or path.stem.endswith("paraphrases")
    try:
        triplets = rows_to_triplets(
            read_rows(path), source=str(path), model_name=model_name, templates=templates, paraphrase=paraphrase
        )
    except OSError as e:
        raise KGError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise KGError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return TripletSet(triplets, _set_name(path), str(path))


def _load_dir(path: Path, model_name: str | None, templates: Mapping[str, list[str]]) -> TripletSet:
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES and "worse_format" not in p.name
    )
    if not files:
        raise KGError(f"{path}: directory has no {'/'.join(FILE_SUFFIXES)} files")
    return concat([_load_file(p, model_name, templates) for p in files], name=path.name, source=str(path))


# ------------------------------------------------------------------------------------------
# Hugging Face datasets
# ------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags):
        return True
    try:
        import datasets

        return bool(datasets.config.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old datasets
        return False


def parse_hf_spec(spec: str, split: str | None = None) -> tuple[str, str]:
    """'hf:owner/name:split' -> ('owner/name', 'split'); the split defaults to 'train'."""
    rest = spec[len("hf:") :]
    name, _, maybe_split = rest.rpartition(":")
    if name and maybe_split and "/" not in maybe_split and "\\" not in maybe_split:
        rest, spec_split = name, maybe_split
    else:
        spec_split = None
    if not rest:
        raise KGError(f"{spec}: empty dataset name; expected hf:owner/name[:split] or hf:/local/path[:split]")
    return rest, split or spec_split or "train"


def _load_hf_dataset(spec: str, name: str, split: str) -> Any:
    """``datasets.load_dataset`` for a local file/folder or a Hub name (KGError when offline)."""
    import datasets

    local = Path(name).expanduser()
    builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
    try:
        if local.is_file():
            builder = builders.get(local.suffix.lower())
            if builder is None:
                raise KGError(f"{spec}: cannot load {local.suffix!r} files with datasets; use .json/.jsonl/.csv/.parquet")
            kw = {"delimiter": "\t"} if local.suffix.lower() == ".tsv" else {}
            return datasets.load_dataset(builder, data_files={split: str(local)}, split=split, **kw)
        if local.is_dir():
            return datasets.load_dataset(str(local), split=split)
        if name.startswith(("/", "./", "../", "~")):
            raise KGError(f"{spec}: local dataset path {name} does not exist")
        if hub_offline():
            raise KGError(
                f"{spec}: dataset {name!r} needs the Hugging Face Hub, but offline mode is on "
                "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE). Use a local file: hf:/path/to/data.jsonl[:split]"
            )
        return datasets.load_dataset(name, split=split)
    except KGError:
        raise
    except Exception as e:  # connection, missing split, parse errors
        raise KGError(f"{spec}: datasets.load_dataset failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None


def _load_hf(spec: str, split: str | None, model_name: str | None, templates: Mapping[str, list[str]]) -> TripletSet:
    name, split = parse_hf_spec(spec, split)
    ds = _load_hf_dataset(spec, name, split)
    rows = ((f"{spec} row {i}", row) for i, row in enumerate(ds))
    paraphrase = "worse_format" in name
    triplets = rows_to_triplets(rows, source=spec, model_name=model_name, templates=templates, paraphrase=paraphrase)
    set_name = _set_name(Path(name)) if Path(name).suffix else name.rstrip("/").split("/")[-1]
    return TripletSet(triplets, f"{set_name}:{split}" if split != "train" else set_name, spec)


# ------------------------------------------------------------------------------------------
# WordNet and built-in sets
# ------------------------------------------------------------------------------------------


def _load_wordnet(spec: str, templates: Mapping[str, list[str]]) -> TripletSet:
    """``wordnet:<root>[:<dir>]``: a TargetKG from ``kcs_lens.data.wordnet.build_target_kg``."""
    root, _, wn_dir = spec[len("wordnet:") :].partition(":")
    if not root:
        raise KGError(f"{spec}: expected wordnet:<root synset>[:<wordnet dir>], e.g. wordnet:building.n.01")
    if wn_dir and not Path(wn_dir).expanduser().is_dir():
        raise KGError(
            f"{spec}: WordNet directory {wn_dir} does not exist. Install WordNet with "
            "nltk.download('wordnet') or apt-get install wordnet-base (/usr/share/wordnet)"
        )
    try:
        from kcs_lens.data import wordnet
    except ImportError as e:
        raise KGError(f"{spec}: WordNet support is not available ({e})") from None
    try:
        wn = wordnet.open_wordnet(wn_dir or None)
        rows = wordnet.build_target_kg(wn, root)
    except (ValueError, LookupError, OSError) as e:
        raise KGError(f"{spec}: {e}") from None
    triplets = rows_to_triplets(((f"{spec} #{i}", r) for i, r in enumerate(rows)), source=spec, templates=templates)
    return TripletSet(triplets, root, spec)


def bundled_dir() -> Path:
    """The bundled data folder (``kcs_lens/bundled``; ``$KCS_BUNDLED_DIR`` overrides it)."""
    env = os.environ.get("KCS_BUNDLED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "bundled"


def _builtin_short(stem: str) -> str:
    """'target_building_paraphrases' -> 'building-paraphrases'; 'control_train' -> 'control'."""
    if stem == "control_train":
        return "control"
    if stem.startswith("target_"):
        stem = stem[len("target_") :]
    return stem.replace("_", "-")


def builtin_names() -> dict[str, Path]:
    """Short name -> file of the bundled KGs (empty when the bundle is absent)."""
    kg = bundled_dir() / "kg"
    if not kg.is_dir():
        return {}
    return {_builtin_short(p.stem): p for p in sorted(kg.glob("*.jsonl"))}


def _load_builtin(name: str, model_name: str | None, templates: Mapping[str, list[str]]) -> TripletSet:
    names = builtin_names()
    key = name.replace("_", "-")
    key = key[len("target-") :] if key.startswith("target-") else key
    if key not in names:
        have = ", ".join(names) if names else f"none (no bundled KGs in {bundled_dir() / 'kg'})"
        raise KGError(f"unknown built-in KG {name!r}; available: {have}")
    ts = _load_file(names[key], model_name, templates)
    return TripletSet(ts.triplets, key, f"builtin:{key}")


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------


def load_kg(
    spec: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    templates: str | Path | Mapping[str, Any] | None = None,
    split: str | None = None,
    name: str | None = None,
) -> TripletSet:
    """Load a KG from a spec (see the module docstring).

    ``model_name`` picks the paper's ``best_<model>_input`` field (fallback: gpt2, with a
    KGFallbackWarning). ``templates``: a templates file or mapping that extends the built-ins,
    used for rows without text. ``split``: the split of an ``hf:`` dataset. ``name`` renames the set.
    Raises KGError for any bad input, and for a set that ends up empty.
    """
    reg = merge_templates(templates)
    s = os.fspath(spec)
    if s.startswith("hf:"):
        ts = _load_hf(s, split, model_name, reg)
    elif s.startswith("wordnet:"):
        ts = _load_wordnet(s, reg)
    elif s.startswith("builtin:"):
        ts = _load_builtin(s[len("builtin:") :], model_name, reg)
    else:
        path = Path(s).expanduser()
        if path.is_dir():
            ts = _load_dir(path, model_name, reg)
        elif path.is_file():
            ts = _load_file(path, model_name, reg)
        elif path.suffix or os.sep in s or "/" in s:
            raise KGError(f"{s}: no such file or directory")
        else:
            ts = _load_builtin(s, model_name, reg)
    if not len(ts):
        raise KGError(f"{ts.source or s}: no triplets")
    if name:
        ts.name = name
    return ts
