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

import csv
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from kcs_lens.data.templates import canonical_relation, merge_templates, verbalize
from kcs_lens.data.triplets import Triplet, TripletSet, concat
from kcs_lens.errors import KGError
from kcs_lens.files import json_records

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

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
_SYNSET = re.compile(r"^(?P<lemma>.+)\.(?P<pos>[nvasr])\.(?P<num>\d+)$")
_BEST_FIELD = re.compile(r"^best_(?P<model>.+)_input$")
_RELATION_FIELDS = ("relation", "rel", "predicate")


class KGFallbackWarning(UserWarning):
    """A paper file has no verbalization for the model in use; the gpt2 one is used instead."""


# ------------------------------------------------------------------------------------------
# Row formats
# ------------------------------------------------------------------------------------------


def detect_format(row: Mapping[str, Any]) -> str:
    """'paper' (best_<model>_input fields), 'lama' (sub/obj/pred) or 'canonical'."""
    if any(_BEST_FIELD.match(str(k)) for k in row):
        return "paper"
    if {"sub", "obj", "pred"} <= set(row) and "head" not in row:
        return "lama"
    return "canonical"


def model_field_name(model_name: str | None) -> str:
    """The paper's field for a model: 'openai-community/gpt2-medium' -> 'best_gpt2-medium_input'."""
    short = (model_name or "gpt2").rstrip("/").split("/")[-1].lower()
    return f"best_{short}_input"


def _entity(value: Any, field: str, where: str) -> str:
    """A non-empty string field."""
    if not isinstance(value, str) or not value.strip():
        raise KGError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
    return value


def _get(row: Mapping[str, Any], names: tuple[str, ...], where: str) -> tuple[str, str]:
    """(field name, value) of the first present field among ``names``; KGError naming it if none."""
    for n in names:
        if n in row and row[n] is not None and row[n] != "":
            return n, _entity(row[n], n, where)
    alts = " or ".join(repr(n) for n in names)
    raise KGError(f"{where}: missing field {alts}")


def _word(entity: str) -> tuple[str, str | None]:
    """A WordNet synset name -> (its lemma as words, the synset); other entities unchanged."""
    m = _SYNSET.match(entity)
    if m is None:
        return entity, None
    return m.group("lemma").replace("_", " "), entity


def _make(head: str, relation: str, tail: str, text: str, meta: dict[str, Any], where: str) -> Triplet:
    """Build a Triplet; a bad one (e.g. tail not a suffix of text) raises KGError naming ``where``."""
    if not text.endswith(tail):
        raise KGError(
            f"{where}: field 'text' {text!r} does not end with the tail {tail!r} "
            "(the sentence must end exactly with the tail; no trailing punctuation)"
        )
    try:
        return Triplet(head, relation, tail, text, meta)
    except KGError as e:
        raise KGError(f"{where}: {e}") from None


def _text_or_template(
    head: str, relation: str, tail: str, text: Any, meta: dict[str, Any], templates: Mapping[str, list[str]], where: str
) -> Triplet:
    """A triplet with its given text, or verbalized by the relation's canonical template."""
    if text is None or text == "":
        text, template = verbalize(head, relation, tail, templates, where=where)
        meta = {**meta, "template": template, "text_source": "template"}
    else:
        text = _entity(text, "text", where)
        meta = {"text_source": "given", **meta}
    return _make(head, relation, tail, text, meta, where)


def _canonical_row(row: Mapping[str, Any], where: str, templates: Mapping[str, list[str]]) -> Triplet:
    _, head = _get(row, ("head",), where)
    rel_field, relation = _get(row, _RELATION_FIELDS, where)
    _, tail = _get(row, ("tail",), where)
    used = {"head", "tail", "text", rel_field}
    meta = {k: v for k, v in row.items() if k not in used}
    return _text_or_template(head, canonical_relation(relation, templates), tail, row.get("text"), meta, templates, where)


def _lama_row(row: Mapping[str, Any], where: str, templates: Mapping[str, list[str]]) -> Triplet:
    _, head = _get(row, ("sub",), where)
    _, relation = _get(row, ("pred",), where)
    _, tail = _get(row, ("obj",), where)
    meta = {k: v for k, v in row.items() if k not in ("sub", "obj", "pred") and v is not None}
    return _text_or_template(head, canonical_relation(relation, templates), tail, None, meta, templates, where)


def _paper_row(row: Mapping[str, Any], where: str, field: str, templates: Mapping[str, list[str]]) -> Triplet:
    """One row of the paper's best/worse format; WordNet synset names become their lemma."""
    _, head_raw = _get(row, ("head",), where)
    _, tail_raw = _get(row, ("tail",), where)
    relation = canonical_relation(str(row.get("rel") or "IsA"), templates)
    head, head_syn = _word(head_raw)
    tail, tail_syn = _word(tail_raw)
    _, text = _get(row, (field,), where)
    skip = {"head", "tail", "rel"} | {k for k in row if str(k).startswith("best_")}
    meta: dict[str, Any] = {k: v for k, v in row.items() if k not in skip}
    if head_syn:
        meta["head_synset"] = head_syn
    if tail_syn:
        meta["tail_synset"] = tail_syn
    meta["text_source"] = field
    return _make(head, relation, tail, text, meta, where)


def _paper_field(first: Mapping[str, Any], model_name: str | None, source: str) -> str:
    """The ``best_<model>_input`` field to read; falls back to gpt2's with a KGFallbackWarning."""
    want = model_field_name(model_name)
    if want in first:
        return want
    fallback = model_field_name("gpt2")
    if fallback in first:
        msg = (
            f"{source}: no {want!r} field (verbalization chosen for {model_name!r}); "
            f"using {fallback!r} (chosen for GPT-2 small) instead"
        )
        warnings.warn(msg, KGFallbackWarning, stacklevel=4)
        return fallback
    have = sorted(k for k in first if _BEST_FIELD.match(str(k)))
    raise KGError(f"{source}: missing field {want!r} and {fallback!r} (has {have})")


def rows_to_triplets(
    rows: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    source: str,
    model_name: str | None = None,
    templates: Mapping[str, list[str]] | None = None,
    paraphrase: bool = False,
) -> list[Triplet]:
    """Convert (where, row) pairs; the format is detected on the first row and applied to all."""
    reg = merge_templates() if templates is None else templates
    out: list[Triplet] = []
    fmt = field = None
    for where, row in rows:
        if not isinstance(row, Mapping):
            raise KGError(f"{where}: expected a JSON object with head/relation/tail, got {type(row).__name__}")
        if fmt is None:
            fmt = detect_format(row)
            if fmt == "paper":  # paraphrase files hold one text per row, under the gpt2 field
                field = _paper_field(row, None if paraphrase else model_name, source)
        if fmt == "paper":
            assert field is not None  # set with fmt on the first paper row
            t = _paper_row(row, where, field, reg)
        elif fmt == "lama":
            t = _lama_row(row, where, reg)
        else:
            t = _canonical_row(row, where, reg)
        if paraphrase:
            t.meta.setdefault("paraphrase", True)
        out.append(t)
    return out


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: a byte-order mark (Windows) is not a column name
        reader = csv.DictReader(f, delimiter=delimiter)
        cols = reader.fieldnames or []
        if not cols:
            raise KGError(f"{path}:1: empty file, expected a header with head,relation,tail[,text]")
        missing = [c for c in ("head", "tail") if c not in cols]
        if not any(c in cols for c in _RELATION_FIELDS):
            missing.insert(1, "relation")
        if missing and not {"sub", "obj", "pred"} <= set(cols):
            raise KGError(f"{path}:1: missing column(s) {missing} in the header {cols}")
        for row in reader:
            if None in row:
                raise KGError(f"{path}:{reader.line_num}: more cells than header columns")
            yield f"{path}:{reader.line_num}", row


def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs of a .jsonl/.json/.csv/.tsv file; ``where`` = 'file:line' or 'file: item i'."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return json_records(path, KGError)
    if suffix in (".csv", ".tsv"):
        return _csv_rows(path)
    raise KGError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}")


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
