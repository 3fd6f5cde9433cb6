"""Relation templates: how a (head, relation, tail) triplet becomes one sentence ending with the tail.

A template is a format string with ``{head}`` and ``{tail}`` fields; ``{a_head}`` / ``{a_tail}``
insert the entity with its indefinite article ("a car", "an apple"), the article chosen by the
word that follows it; ``{A_head}`` / ``{Head}`` are the sentence-initial (capitalized) forms.
The tail must come last (the sentence ends exactly with the tail) so the model can be scored on
the tail tokens.

Built-in sets: WordNet IsA (``ISA_TEMPLATES``) and the 16 ConceptNet relations of the paper's
ConceptNet/LAMA data (``CONCEPTNET_TEMPLATES``), modelled on the sentence shapes of the authors'
released verbalizations. ``TEMPLATES`` is the registry (relation -> templates, first = canonical);
``load_templates`` reads user templates (JSON/TOML/YAML) and ``merge_templates`` lets them extend
or replace the built-ins.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from kcs_lens.errors import KGError
from kcs_lens.files import read_mapping

_VOWEL_SOUND_EXCEPTIONS_AN = ("hour", "honest", "honor", "honour", "heir")
_VOWEL_LETTER_EXCEPTIONS_A = ("uni", "use", "usu", "uti", "one", "once", "euro", "eu", "ure", "uk")


def indefinite_article(word: str) -> str:
    """'a' or 'an' for the word that follows, judged by its first sound (heuristic, English)."""
    w = word.strip().lower()
    if not w:
        return "a"
    if w.startswith(_VOWEL_SOUND_EXCEPTIONS_AN):
        return "an"
    if w.startswith(_VOWEL_LETTER_EXCEPTIONS_A):
        return "a"
    return "an" if w[0] in "aeiou" else "a"


def with_article(word: str) -> str:
    return f"{indefinite_article(word)} {word}"


# IsA (WordNet hypernym) templates. The first is the canonical verbalization used for training
# sets; the others serve as paraphrases.
ISA_TEMPLATES: list[str] = [
    "{A_head} is {a_tail}",
    "{A_head} is a kind of {tail}",
    "{A_head} is a type of {tail}",
    "{A_head} is an example of {a_tail}",
]

# The 16 relations of the paper's ConceptNet (LAMA) TargetKG/ControlKG, in the shapes the
# authors' released best verbalizations use. Article-less variants come from ``article_variants``.
CONCEPTNET_TEMPLATES: dict[str, list[str]] = {
    "AtLocation": [
        "{A_head} is in {a_tail}",
        "{A_head} is usually located at {a_tail}",
        "{A_head} is located at {a_tail}",
        "{A_head} is typically placed by {a_tail}",
        "{A_head} is at the location {a_tail}",
    ],
    "CapableOf": [
        "{A_head} can {tail}",
        "{A_head} is able to {tail}",
        "{A_head} has the skill to {tail}",
        "{A_head} is capable of {tail}",
    ],
    "Causes": [
        "{A_head} can lead to {tail}",
        "{A_head} can cause {tail}",
        "{A_head} causes {tail}",
    ],
    "CausesDesire": [
        "{A_head} can cause the desire to {tail}",
        "{A_head} causes a desire to {tail}",
        "{A_head} causes the desire of {a_tail}",
    ],
    "Desires": [
        "{A_head} wants {a_tail}",
        "{A_head} desires {a_tail}",
        "{A_head} craves {a_tail}",
        "{A_head} craves for {tail}",
    ],
    "HasA": [
        "{A_head} has {a_tail}",
        "{Head} have {tail}",
    ],
    "HasPrerequisite": [
        "{A_head} requires {a_tail}",
        "{A_head} needs to {tail}",
        "{A_head} has the prerequisite of {a_tail}",
        "{A_head} has a prerequisite to {a_tail}",
    ],
    "HasProperty": [
        "{A_head} is {tail}",
        "{A_head} can be {tail}",
        "{A_head} has the property of being {tail}",
        "{A_head} has the property of {a_tail}",
    ],
    "HasSubevent": [
        "{A_head} has the subevent of {a_tail}",
        "{A_head} can have the subevent of {a_tail}",
        "{A_head} has subevent {a_tail}",
    ],
    "IsA": [
        "{A_head} is {a_tail}",
        "{A_head} is a type of {tail}",
        "{A_head} is a kind of {tail}",
        "{A_head} is a hyponym of {a_tail}",
        "{A_head} is a sort of {tail}",
    ],
    "MadeOf": [
        "{A_head} is made of {tail}",
        "{A_head} is made up of {tail}",
        "{A_head} consists of {tail}",
        "{A_head} is composed of {tail}",
    ],
    "MotivatedByGoal": [
        "{A_head} is motivated by the goal of {a_tail}",
        "{A_head} is motivated by {a_tail}",
        "{A_head} can be motivated by the aim of {a_tail}",
    ],
    "NotDesires": [
        "{A_head} does not want {a_tail}",
        "{A_head} doesn't desire {a_tail}",
        "{Head} don't want {tail}",
    ],
    "PartOf": [
        "{A_head} is part of {a_tail}",
        "{A_head} is an element of {a_tail}",
        "{A_head} is a characteristic of {a_tail}",
    ],
    "ReceivesAction": [
        "{A_head} can be {tail}",
        "{A_head} is {tail}",
        "{Head} are {tail}",
    ],
    "UsedFor": [
        "{A_head} is used for {tail}",
        "{A_head} is intended for {tail}",
        "{A_head} is designed for {tail}",
        "{A_head} serves for {tail}",
    ],
}


def _isa_registry() -> list[str]:
    """IsA: the WordNet templates first (canonical unchanged), then the ConceptNet IsA shapes."""
    out = list(ISA_TEMPLATES)
    out += [t for t in CONCEPTNET_TEMPLATES["IsA"] if t not in out]
    return out


# Relation -> templates (first = canonical). Copy before mutating; use ``merge_templates``.
TEMPLATES: dict[str, list[str]] = {**CONCEPTNET_TEMPLATES, "IsA": _isa_registry()}

# Other spellings of the relations (ConceptNet URIs, WordNet pointer names).
RELATION_ALIASES: dict[str, str] = {"hypernym": "IsA", "hypernyms": "IsA", "is_a": "IsA", "isa": "IsA"}

_FIELDS = ("head", "tail", "a_head", "a_tail", "A_head", "Head")


def canonical_relation(relation: str, templates: Mapping[str, list[str]] | None = None) -> str:
    """The registry's name for a relation: strips '/r/', resolves aliases and case differences."""
    reg = TEMPLATES if templates is None else templates
    name = relation.strip()
    if name.startswith("/r/"):
        name = name[3:]
    if name in reg:
        return name
    low = name.lower()
    if low in RELATION_ALIASES and RELATION_ALIASES[low] in reg:
        return RELATION_ALIASES[low]
    for known in reg:
        if known.lower() == low:
            return known
    return name


def fill(template: str, head: str, tail: str) -> str:
    """Fill one template; ``{A_head}`` capitalizes the article at the start of a sentence."""
    a_head = with_article(head)
    a_tail = with_article(tail)
    text = template.format(
        head=head,
        tail=tail,
        a_head=a_head,
        a_tail=a_tail,
        A_head=a_head[0].upper() + a_head[1:],
        Head=head[:1].upper() + head[1:],
    )
    if not text.endswith(tail):
        raise KGError(f"template {template!r} does not end with the tail {tail!r}")
    return text


def article_variants(template: str) -> Iterator[str]:
    """The template with and without the indefinite article on head and tail (the template first).

    The paper's candidate verbalizations include both forms; the best one is chosen per triplet.
    """
    swaps = (("{A_head}", "{Head}"), ("{a_head}", "{head}"))
    head_forms = [template]
    for with_a, bare in swaps:
        if with_a in template:
            head_forms.append(template.replace(with_a, bare))
            break
        if bare in template:
            head_forms.append(template.replace(bare, with_a))
            break
    seen: set[str] = set()
    for h in head_forms:
        body = h[: -len("{a_tail}")] if h.endswith("{a_tail}") else h[: -len("{tail}")]
        for f in (h, body + "{tail}", body + "{a_tail}"):
            if f not in seen:
                seen.add(f)
                yield f


def check_template(template: Any, *, where: str) -> str:
    """Validate one template (a string whose only fields are known and whose last field is the tail)."""
    if not isinstance(template, str) or not template.strip():
        raise KGError(f"{where}: a template must be a non-empty string, got {template!r}")
    fields = re.findall(r"\{([^{}]*)\}", template)
    unknown = [f for f in fields if f not in _FIELDS]
    if unknown:
        raise KGError(f"{where}: template {template!r} uses unknown field(s) {unknown}; allowed: {list(_FIELDS)}")
    if not (template.endswith("{tail}") or template.endswith("{a_tail}")):
        raise KGError(f"{where}: template {template!r} must end with {{tail}} or {{a_tail}} (the sentence ends with the tail)")
    return template


def _read_mapping(path: Path) -> Any:
    return read_mapping(path, what="templates file", error=KGError)


def load_templates(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read user templates: ``{relation: [templates]}`` (extends the built-ins) or
    ``{relation: {"templates": [...], "replace": true}}`` (replaces them).

    Returns ``{relation: {"templates": [...], "replace": bool}}``; pass it to ``merge_templates``.
    """
    path = Path(path)
    data = _read_mapping(path)
    if not isinstance(data, dict) or not data:
        raise KGError(f"{path}: templates file must map relation names to lists of templates")
    out: dict[str, dict[str, Any]] = {}
    for rel, entry in data.items():
        replace = False
        if isinstance(entry, dict):
            replace = bool(entry.get("replace", False))
            entry = entry.get("templates")
        if isinstance(entry, str):
            entry = [entry]
        if not isinstance(entry, list) or not entry:
            raise KGError(f"{path}: relation {rel!r}: expected a non-empty list of templates")
        out[str(rel)] = {
            "templates": [check_template(t, where=f"{path}: relation {rel!r}") for t in entry],
            "replace": replace,
        }
    return out


def merge_templates(
    user: str | Path | Mapping[str, Any] | None = None, base: Mapping[str, list[str]] | None = None
) -> dict[str, list[str]]:
    """Built-in templates extended (or, per relation with ``replace``, overridden) by user ones.

    ``user`` is a file path, the output of ``load_templates``, or a plain ``{relation: [templates]}``.
    User templates come first for a relation they replace, last for one they extend.
    """
    merged = {rel: list(ts) for rel, ts in (TEMPLATES if base is None else base).items()}
    if user is None:
        return merged
    if isinstance(user, (str, Path)):
        user = load_templates(user)
    for rel, entry in user.items():
        if isinstance(entry, dict):
            ts, replace = list(entry["templates"]), bool(entry.get("replace", False))
        else:
            ts, replace = ([entry] if isinstance(entry, str) else list(entry)), False
        for t in ts:
            check_template(t, where=f"templates for {rel!r}")
        name = canonical_relation(rel, merged)
        if replace or name not in merged:
            merged[name] = ts
        else:
            merged[name] += [t for t in ts if t not in merged[name]]
    return merged


def templates_for(relation: str, templates: Mapping[str, list[str]] | None = None, *, where: str = "") -> list[str]:
    """The templates of a relation; KGError naming the relation (and ``where``) if there are none."""
    reg = TEMPLATES if templates is None else templates
    name = canonical_relation(relation, reg)
    if name in reg and reg[name]:
        return list(reg[name])
    prefix = f"{where}: " if where else ""
    raise KGError(
        f"{prefix}unknown relation {relation!r} has no template and the triplet has no text; "
        f"known relations: {', '.join(sorted(reg))}. Add templates with a templates file "
        f"(JSON/TOML/YAML mapping relation -> list of templates ending with {{tail}})"
    )


def verbalize(
    head: str, relation: str, tail: str, templates: Mapping[str, list[str]] | None = None, *, where: str = ""
) -> tuple[str, str]:
    """Canonical verbalization: (text, template) with the relation's first template."""
    template = templates_for(relation, templates, where=where)[0]
    return fill(template, head, tail), template
