"""KG rows and files: the row formats :func:`load_kg <kcs_lens.data.loaders.load_kg>` detects
(canonical ``head``/``relation``/``tail``, the paper's ``*_best_format.json`` /
``*_worse_format.json``, LAMA jsonl) turned into triplets (:func:`rows_to_triplets`), and reading
JSONL / JSON / CSV / TSV files row by row with the file and line of each (:func:`read_rows`).
Every error is a :class:`KGError` naming the file and line (JSONL/CSV), item (JSON) and field."""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from kcs_lens.data.templates import canonical_relation, merge_templates, verbalize
from kcs_lens.data.triplets import Triplet
from kcs_lens.errors import KGError
from kcs_lens.files import json_records

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
