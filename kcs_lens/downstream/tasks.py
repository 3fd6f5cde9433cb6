"""Multiple-choice questions and the facts they need.

Question files (one spec per ``--train`` / ``--test``):

- ``path.jsonl`` (or ``.json``: a JSON array or JSON lines), in CommonsenseQA's Hugging Face
  schema (``id``, ``question`` (string), ``question_concept``, ``choices`` {``label``: [...],
  ``text``: [...]}, ``answerKey``) or in the original CommonsenseQA jsonl (``id``, ``answerKey``,
  ``question`` {``stem``, ``question_concept``, ``choices``: [{``label``, ``text``}]}); detected
  per row;
- ``hf:owner/name[:split]`` (e.g. ``hf:tau/commonsense_qa:validation``) or ``hf:/local/file[:split]``
  through ``datasets.load_dataset`` (offline: a clear error naming the spec);
- ``bundled:train`` / ``bundled:test``: the task shipped with the bundled model
  (``kcs_lens/bundled/task``, written by ``scripts/make_bundled_task.py``).

A row may carry the fact it needs as ``triplet`` {``head``, ``relation`` (or ``rel``), ``tail``};
KG rows that carry a question ``id`` (the paper's CSQA files) link questions too
(:func:`load_links`). Every error is a :class:`~kcs_lens.errors.TaskError` naming file and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from kcs_lens.data.templates import canonical_relation
from kcs_lens.data.triplets import triplet_key
from kcs_lens.errors import KGError, TaskError
from kcs_lens.files import json_records

Key = tuple[str, str, str]
BUNDLED_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; ``answer`` indexes ``choices``; ``keys``: linked facts."""

    id: str
    question: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]
    answer: int
    concept: str | None = None
    keys: frozenset[Key] = frozenset()
    where: str = ""

    def with_keys(self, extra: Iterable[Key]) -> "Question":
        return Question(
            self.id, self.question, self.choices, self.labels, self.answer, self.concept, self.keys | set(extra), self.where
        )


def _str(row: Mapping[str, Any], field: str, where: str, *, required: bool = True) -> str | None:
    v = row.get(field)
    if v is None or v == "":
        if required:
            raise TaskError(f"{where}: missing field {field!r}")
        return None
    if not isinstance(v, str) or not v.strip():
        raise TaskError(f"{where}: field {field!r} must be a non-empty string, got {v!r}")
    return v


def inline_key(t: Any, where: str) -> Key:
    """The key of an inline ``triplet`` object, relation names resolved as KG loading does."""
    if not isinstance(t, Mapping):
        raise TaskError(f"{where}: field 'triplet' must be an object with head, relation and tail, got {t!r}")
    head = _str(t, "head", f"{where}: triplet")
    tail = _str(t, "tail", f"{where}: triplet")
    rel = t.get("relation", t.get("rel"))
    if not isinstance(rel, str) or not rel.strip():
        raise TaskError(f"{where}: triplet: missing field 'relation' (or 'rel')")
    assert head is not None and tail is not None
    return triplet_key(head, canonical_relation(rel), tail)


def parse_question(row: Any, where: str) -> Question:
    """One row in CommonsenseQA's HF schema or its original jsonl schema (detected)."""
    if not isinstance(row, Mapping):
        raise TaskError(f"{where}: expected a JSON object (a question), got {type(row).__name__}")
    q = row.get("question")
    if isinstance(q, Mapping):  # original CommonsenseQA jsonl
        text = _str(q, "stem", f"{where}: question")
        concept = _str(q, "question_concept", f"{where}: question", required=False)
        raw = q.get("choices")
        if not isinstance(raw, list) or not raw:
            raise TaskError(f"{where}: question.choices must be a non-empty list of {{label, text}} objects")
        labels, texts = [], []
        for i, c in enumerate(raw):
            if not isinstance(c, Mapping):
                raise TaskError(f"{where}: question.choices[{i}] must be an object with label and text")
            labels.append(_str(c, "label", f"{where}: question.choices[{i}]"))
            texts.append(_str(c, "text", f"{where}: question.choices[{i}]"))
    else:
        text = _str(row, "question", where)
        concept = _str(row, "question_concept", where, required=False)
        ch = row.get("choices")
        if not isinstance(ch, Mapping) or not isinstance(ch.get("label"), list) or not isinstance(ch.get("text"), list):
            raise TaskError(f"{where}: field 'choices' must be an object {{'label': [...], 'text': [...]}}")
        labels, texts = list(ch["label"]), list(ch["text"])
        if len(labels) != len(texts):
            raise TaskError(f"{where}: choices has {len(texts)} texts but {len(labels)} labels")
        for i, (lab, t) in enumerate(zip(labels, texts)):
            if not isinstance(lab, str) or not lab.strip() or not isinstance(t, str) or not t.strip():
                raise TaskError(f"{where}: choice {i}: label and text must be non-empty strings, got {lab!r}, {t!r}")
    if len(labels) < 2:
        raise TaskError(f"{where}: a multiple-choice question needs at least 2 choices, got {len(labels)}")
    if len(set(labels)) != len(labels):
        raise TaskError(f"{where}: duplicate choice labels {labels}")
    qid = row.get("id")
    if qid is None or qid == "":
        raise TaskError(f"{where}: missing field 'id'")
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or str(qid).strip() == "":
        raise TaskError(f"{where}: field 'id' must be a string or an integer, got {qid!r}")
    key = row.get("answerKey")
    if key not in labels:
        raise TaskError(f"{where}: answerKey {key!r} is not one of the labels {labels} (unlabelled test split?)")
    keys = frozenset([inline_key(row["triplet"], where)]) if row.get("triplet") is not None else frozenset()
    assert text is not None
    return Question(str(qid), text, tuple(texts), tuple(labels), labels.index(key), concept, keys, where)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Reading files and datasets
# ------------------------------------------------------------------------------------------
def bundled_task_dir() -> Path:
    """``kcs_lens/bundled/task`` (follows ``$KCS_BUNDLED_DIR`` like the bundled KGs)."""
    from kcs_lens.data.loaders import bundled_dir

    return bundled_dir() / "task"


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        yield from json_records(path, TaskError)
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise TaskError(f"{path}: cannot read ({e.strerror or e})") from None


def _resolve(spec: str) -> Path | None:
    if spec.startswith("bundled:"):
        split = spec[len("bundled:") :]
        if split not in BUNDLED_SPLITS:
            raise TaskError(f"{spec}: expected bundled:train or bundled:test")
        p = bundled_task_dir() / f"{split}.jsonl"
        if not p.exists():
            raise TaskError(f"{spec}: {p} is missing (build it: python scripts/make_bundled_task.py)")
        return p
    return None


def question_rows(spec: str | os.PathLike[str]) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs of a question spec (file, ``hf:``, ``bundled:``)."""
    s = os.fspath(spec)
    if s.startswith("hf:"):
        from kcs_lens.data.loaders import _load_hf_dataset, parse_hf_spec

        try:
            name, split = parse_hf_spec(s)
            ds = _load_hf_dataset(s, name, split)
        except KGError as e:
            raise TaskError(str(e)) from None
        return ((f"{s} row {i}", row) for i, row in enumerate(ds))
    path = _resolve(s) or Path(s).expanduser()
    if path.is_dir() or not path.exists():
        raise TaskError(f"{s}: no such question file (expected .jsonl/.json, hf:name[:split] or bundled:train|test)")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise TaskError(f"{path}: unsupported file type {path.suffix!r}; expected .jsonl or .json")
    return _file_rows(path)


def load_questions(spec: str | os.PathLike[str]) -> list[Question]:
    """Every question of a spec, in order; ids must be unique; an empty set is an error."""
    out: list[Question] = []
    seen: dict[str, str] = {}
    for where, row in question_rows(spec):
        q = parse_question(row, where)
        if q.id in seen:
            raise TaskError(f"{where}: duplicate question id {q.id!r} (first at {seen[q.id]})")
        seen[q.id] = where
        out.append(q)
    if not out:
        raise TaskError(f"{os.fspath(spec)}: no questions")
    return out


def load_links(specs: Iterable[str]) -> dict[str, set[Key]]:
    """Question id -> keys of the KG triplets linked to it: KG specs whose rows carry ``id``
    (the paper's ``csqa*_best_format.json``), read with the KG loaders."""
    from kcs_lens.data.loaders import load_kg

    out: dict[str, set[Key]] = {}
    for spec in specs:
        try:
            ts = load_kg(spec)
        except KGError as e:
            raise TaskError(f"--links {spec}: {e}") from None
        n = 0
        for t in ts:
            qid = t.meta.get("id")
            if qid is not None and str(qid).strip():
                out.setdefault(str(qid), set()).add(t.key)
                n += 1
        if n == 0:
            raise TaskError(f"--links {spec}: no row carries a question 'id' (expected KG rows with an 'id' field)")
    return out


def link(questions: list[Question], links: Mapping[str, set[Key]]) -> list[Question]:
    """The questions with the linked facts of ``links`` added to their inline triplets."""
    return [q.with_keys(links[q.id]) if q.id in links else q for q in questions]
