"""WordNet IsA knowledge graphs: TargetKGs (connected neighbourhoods of a root synset) and ControlKGs.

Triplets come back as dicts in the project's canonical JSONL format::

    {"head": "cathedral", "relation": "IsA", "tail": "building",
     "text": "A cathedral is a building",
     "head_synset": "cathedral.n.01", "tail_synset": "building.n.01"}

An entity is rendered by its synset's first lemma with ``_`` replaced by a space. Tails are always
single words (letters only: no ``_``, space, hyphen, digit or apostrophe), as in the paper's data,
so that every tail is one word after the prefix. ``text`` is the canonical IsA template
(``ISA_TEMPLATES[0]``: "A cathedral is a building").

Getting WordNet: ``open_wordnet()`` (:mod:`kcs_lens.data.wordnet_source`, re-exported here).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any, Callable, Iterable

from kcs_lens.data.templates import ISA_TEMPLATES, fill
from kcs_lens.data.wordnet_source import DEBIAN_WORDNET_DIR, open_wordnet, wordnet_version
from kcs_lens.errors import WordNetError

__all__ = [
    "WordNetError",
    "DEBIAN_WORDNET_DIR",
    "open_wordnet",
    "wordnet_version",
    "entity_name",
    "is_single_word",
    "make_isa_triplet",
    "target_neighbourhood",
    "build_target_kg",
    "build_control_kg",
    "kg_synsets",
]

# --------------------------------------------------------------------------------------------
# Triplets
# --------------------------------------------------------------------------------------------

_SINGLE_WORD = re.compile(r"^[A-Za-z]+$")


def entity_name(synset) -> str:
    """The synset's first lemma, '_' -> ' ' (e.g. 'guild_hall' -> 'guild hall')."""
    return synset.lemmas()[0].name().replace("_", " ")


def is_single_word(name: str) -> bool:
    """True for one word of letters (no '_', space, hyphen, digit, apostrophe or dot)."""
    return bool(_SINGLE_WORD.match(name))


def make_isa_triplet(head_synset, tail_synset, template: int = 0) -> dict:
    head, tail = entity_name(head_synset), entity_name(tail_synset)
    return {
        "head": head,
        "relation": "IsA",
        "tail": tail,
        "text": fill(ISA_TEMPLATES[template], head, tail),
        "head_synset": head_synset.name(),
        "tail_synset": tail_synset.name(),
    }


def _get_synset(wn, name: str):
    try:
        return wn.synset(name)
    except Exception as e:  # nltk raises WordNetError (plain Exception) or ValueError
        raise WordNetError(f"unknown WordNet synset {name!r}: {e}") from None


def _parents(s) -> list:
    return list(s.hypernyms()) + list(s.instance_hypernyms())


def target_neighbourhood(wn, root: str, *, up: int = 1, down: int = 2) -> list[tuple[int, Any, Any]]:
    """All IsA edges (level, head synset, tail synset) around ``root`` before any sampling.

    Levels: -k for hypernym edges k steps above the root (``root -> parent`` is -1), +k for
    hyponym edges k steps below (``child -> root`` is +1). Tails are single words; an upward
    chain stops at a multi-word hypernym, and a multi-word hyponym is a head but never a tail.
    """
    rs = _get_synset(wn, root)
    edges: list[tuple[int, Any, Any]] = []
    frontier = [rs]
    for level in range(1, up + 1):
        nxt = []
        for node in frontier:
            for par in sorted(node.hypernyms(), key=lambda s: s.name()):
                if is_single_word(entity_name(par)):
                    edges.append((-level, node, par))
                    nxt.append(par)
        frontier = nxt
    frontier = [rs] if is_single_word(entity_name(rs)) else []
    for level in range(1, down + 1):
        nxt = []
        for par in frontier:
            for child in sorted(par.hyponyms(), key=lambda s: s.name()):
                edges.append((level, child, par))
                if is_single_word(entity_name(child)):
                    nxt.append(child)
        frontier = nxt
    return edges


def build_target_kg(
    wn,
    root: str,
    *,
    up: int = 1,
    down: int = 2,
    max_triplets: int = 40,
    min_triplets: int = 10,
    seed: int = 0,
    exclude_synsets: Iterable[str] = (),
    exclude_heads: Iterable[str] = (),
    single_parent: bool = False,
    head_filter: Callable[[str], bool] | None = None,
) -> list[dict]:
    """A TargetKG: a connected IsA neighbourhood of ``root`` with ``min_triplets..max_triplets`` triplets.

    Hypernym edges up to ``up`` levels above the root are always kept. Hyponym edges are added
    breadth-first down to ``down`` levels; when a level has more candidate edges than the budget
    left, a seeded sample is drawn (half the remaining budget at a level that is not the last, so
    deeper levels get a share), and any budget left at the end is filled from the edges not drawn.
    An edge is only added below a node that is already in the graph, so the result is connected.

    Each head appears once. ``exclude_synsets`` / ``exclude_heads`` keep synsets / head names out
    (e.g. to make several TargetKGs pairwise disjoint); ``single_parent`` keeps only heads with
    exactly one hypernym (so "A <head> is a" has one right answer); ``head_filter(name)`` False
    keeps a hyponym out (the root and its hypernyms are always kept). Deterministic for ``seed``.
    Raises ``WordNetError`` (ValueError) for an unknown root, ValueError when fewer than
    ``min_triplets`` triplets can be built.
    """
    if min_triplets > max_triplets:  # else "only N triplets" would report the cap, not what exists
        raise WordNetError(f"min_triplets ({min_triplets}) is larger than max_triplets ({max_triplets})")
    rs = _get_synset(wn, root)
    if root in set(exclude_synsets):
        raise WordNetError(f"root synset {root!r} is excluded")
    g = _Neighbourhood(rs, set(exclude_synsets), set(exclude_heads), single_parent, head_filter)
    g.add_hypernyms(up)
    g.add_hyponyms(down, max_triplets, random.Random(f"target:{root}:{seed}"))
    if len(g.chosen) < min_triplets:
        raise WordNetError(
            f"only {len(g.chosen)} IsA triplets with single-word tails around {root!r} "
            f"(up={up}, down={down}); need at least {min_triplets}"
        )
    g.chosen.sort(key=lambda e: (e[0] > 0, abs(e[0]), e[1].name()))
    return [make_isa_triplet(child, par) for _, child, par in g.chosen]


class _Neighbourhood:
    """A TargetKG being built around a root synset: the edges chosen ``(level, child, parent)``
    (negative levels above the root), the synsets in the graph, the heads used once each."""

    def __init__(self, root, excl: set[str], excl_heads: set[str], single_parent: bool, head_filter) -> None:
        self.root, self.excl, self.excl_heads = root, excl, excl_heads
        self.single_parent, self.head_filter = single_parent, head_filter
        self.in_graph = {root.name()}
        self.heads_used: set[str] = set()
        self.chosen: list[tuple[int, Any, Any]] = []

    def ok(self, child, par) -> bool:
        """Whether the hyponym edge child -> par may join the graph."""
        h, t = entity_name(child), entity_name(par)
        return (
            child.name() not in self.in_graph
            and child.name() not in self.excl
            and par.name() not in self.excl
            and h not in self.heads_used
            and h not in self.excl_heads
            and h.lower() != t.lower()
            and is_single_word(t)
            and (not self.single_parent or len(_parents(child)) == 1)
            and (self.head_filter is None or bool(self.head_filter(h)))
        )

    def take(self, edge) -> None:
        self.chosen.append(edge)
        self.in_graph.add(edge[1].name())
        self.heads_used.add(entity_name(edge[1]))

    def add_hypernyms(self, up: int) -> None:
        """The root's hypernym chain (a hypernym is a head above the root, the root a tail)."""
        frontier = [self.root]
        for level in range(1, up + 1):
            nxt = []
            for node in frontier:
                for par in sorted(node.hypernyms(), key=lambda s: s.name()):
                    if par.name() in self.in_graph or par.name() in self.excl or not is_single_word(entity_name(par)):
                        continue
                    h = entity_name(node)
                    if h in self.heads_used or h in self.excl_heads or (self.single_parent and len(_parents(node)) != 1):
                        continue
                    self.chosen.append((-level, node, par))
                    self.heads_used.add(h)
                    self.in_graph.add(par.name())
                    nxt.append(par)
            frontier = nxt

    def add_hyponyms(self, down: int, max_triplets: int, rng: random.Random) -> None:
        """Breadth-first down to ``down`` levels, sampled when a level has too many edges; then the
        budget is filled with edges not drawn (their parent is in the graph: connected)."""
        leftovers: list[tuple[int, Any, Any]] = []
        frontier = [self.root] if is_single_word(entity_name(self.root)) else []
        for level in range(1, down + 1):
            remaining = max_triplets - len(self.chosen)
            if remaining <= 0 or not frontier:
                break
            cands, seen = [], set()
            for par in frontier:
                for child in sorted(par.hyponyms(), key=lambda s: s.name()):
                    if child.name() not in seen and self.ok(child, par):
                        seen.add(child.name())
                        cands.append((level, child, par))
            if len(cands) > remaining:
                quota = remaining if level == down else max(1, (remaining + 1) // 2)
                picked_idx = set(rng.sample(range(len(cands)), quota))
            else:
                picked_idx = set(range(len(cands)))
            nxt = []
            for i, e in enumerate(cands):
                if i in picked_idx and self.ok(e[1], e[2]):
                    self.take(e)
                    if is_single_word(entity_name(e[1])):
                        nxt.append(e[1])
                elif i not in picked_idx:
                    leftovers.append(e)
            frontier = nxt
        rng.shuffle(leftovers)
        for e in leftovers:
            if len(self.chosen) >= max_triplets:
                break
            if e[2].name() in self.in_graph and self.ok(e[1], e[2]):
                self.take(e)


def kg_synsets(triplets: Iterable[dict]) -> set[str]:
    """All head and tail synset names of a list of triplets."""
    out: set[str] = set()
    for t in triplets:
        out.add(t["head_synset"])
        out.add(t["tail_synset"])
    return out


def build_control_kg(
    wn,
    exclude_synsets: set[str],
    n: int,
    seed: int,
    *,
    exclude_names: bool = True,
    single_parent: bool = True,
    min_tail_heads: int = 1,
    exclude_heads: Iterable[str] = (),
    head_filter: Callable[[str], bool] | None = None,
) -> list[dict]:
    """A ControlKG: ``n`` IsA triplets over noun synsets sharing no synset with ``exclude_synsets``.

    Candidates: every noun synset (head) with a hypernym (tail) whose name is a single word,
    neither in ``exclude_synsets``. With ``exclude_names`` a candidate is also dropped when its
    head or tail *name* equals the name of an excluded synset (so no control sentence mentions a
    TargetKG entity, even through a homonymous synset). Head names naming several candidate
    synsets are ambiguous and dropped; with ``single_parent`` only heads with exactly one
    hypernym are kept, so each head has one right tail. ``min_tail_heads`` drops rare tails
    (tails with fewer candidate heads); ``head_filter(name)`` False drops a head name (e.g. to keep
    lower-case common nouns only). ``exclude_heads`` are head names to leave out. Returns a seeded sample in shuffled order; raises
    ValueError when fewer than ``n`` candidates exist.
    """
    excl = set(exclude_synsets)
    excl_names: set[str] = set()
    if exclude_names:
        for name in excl:
            try:
                excl_names.add(entity_name(wn.synset(name)).lower())
            except Exception:
                pass
    excl_names |= {h.lower() for h in exclude_heads}
    cands = []
    for s in wn.all_synsets("n"):
        if s.name() in excl:
            continue
        parents = _parents(s)
        if single_parent and len(parents) != 1:
            continue
        h = entity_name(s)
        if h.lower() in excl_names or (head_filter is not None and not head_filter(h)):
            continue
        for p in s.hypernyms():
            t = entity_name(p)
            if p.name() in excl or not is_single_word(t) or t.lower() in excl_names or t.lower() == h.lower():
                continue
            cands.append((s, p))
    head_count = Counter(entity_name(s).lower() for s, _ in cands)
    cands = [(s, p) for s, p in cands if head_count[entity_name(s).lower()] == 1]
    if min_tail_heads > 1:
        tail_count = Counter(entity_name(p).lower() for _, p in cands)
        cands = [(s, p) for s, p in cands if tail_count[entity_name(p).lower()] >= min_tail_heads]
    cands.sort(key=lambda e: (e[0].name(), e[1].name()))
    if len(cands) < n:
        raise WordNetError(f"only {len(cands)} control IsA candidates; asked for {n}")
    rng = random.Random(f"control:{seed}")
    return [make_isa_triplet(s, p) for s, p in rng.sample(cands, n)]
