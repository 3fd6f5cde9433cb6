"""The tails of each relation in some triplet sets, and which of them are true of a head: the one
owner of "which other tails may stand as distractors" for the multiple-choice measure
(:mod:`kcs_lens.evaluation.choice`) and the distractor term (:mod:`kcs_lens.objective.distractors`).

A tail is a distractor for a triplet when it is a tail of the same relation in the pool and not
the triplet's tail, not its head, and not reachable from its head through facts of that relation
(for IsA: no hypernym of the head). Tails are compared lower-cased with whitespace collapsed.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterable

from kcs_lens.data.triplets import Triplet
from kcs_lens.data.triplets import normalized as _norm


class DistractorPool:
    """The tails of each relation in some triplet sets, and the facts they state."""

    def __init__(self, sets: Iterable[Iterable[Triplet]]):
        self.tails: dict[str, dict[str, str]] = defaultdict(dict)  # relation -> normalized tail -> first spelling
        self.edges: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))  # relation -> head -> tails
        self.sets: list[list[Triplet]] = []
        for ts in sets:
            self.add(ts)

    def extended(self, triplets: Iterable[Triplet]) -> "DistractorPool":
        """A new pool with this one's triplets and ``triplets`` (this one is unchanged)."""
        return DistractorPool([*self.sets, list(triplets)])

    def add(self, triplets: Iterable[Triplet]) -> None:
        triplets = list(triplets)
        self.sets.append(triplets)
        for t in triplets:
            rel = _norm(t.relation)
            self.tails[rel].setdefault(_norm(t.tail), t.tail)
            self.edges[rel][_norm(t.head)].add(_norm(t.tail))

    def true_tails(self, head: str, relation: str) -> set[str]:
        """Tails reachable from ``head`` through facts of ``relation`` in the pool (any depth)."""
        edges = self.edges.get(_norm(relation), {})
        seen: set[str] = set()
        todo = [_norm(head)]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def candidates(self, t: Triplet) -> list[str]:
        """The tails of ``t``'s relation that are false of ``t``'s head as far as the pool knows:
        not ``t``'s tail, not its head, not a tail reachable from the head through the relation
        (for IsA: no hypernym of the head). Normalized (lower-case, whitespace collapsed), sorted."""
        banned = self.true_tails(t.head, t.relation) | {_norm(t.tail), _norm(t.head)}
        return sorted(n for n in self.tails.get(_norm(t.relation), {}) if n not in banned)

    def spelling(self, t: Triplet, tail: str) -> str:
        """The first spelling in the pool of the normalized ``tail`` of ``t``'s relation."""
        return self.tails[_norm(t.relation)][tail]

    def distractors(self, t: Triplet, k: int, seed: int) -> list[str]:
        """Up to ``k - 1`` of :meth:`candidates`, drawn with a seed fixed by ``seed`` and ``t``."""
        cands = self.candidates(t)
        rng = random.Random(f"{seed}|{'|'.join(t.key)}")  # str seeds are hashed by SHA-512: stable across processes
        picked = rng.sample(cands, min(k - 1, len(cands)))
        return [self.spelling(t, n) for n in picked]
