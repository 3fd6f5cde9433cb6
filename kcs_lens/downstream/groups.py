"""Which test questions need the removed knowledge: the groups ``removed``, ``kept``, ``unlinked``.

A question is linked to the facts of its inline ``triplet`` and of the KG rows that carry its id
(the run's own TargetKG / ControlKG rows included, and every ``--links`` file). It is
**removed** when one of its facts is in the run's TargetKG, else **kept** when one is in the
run's ControlKG (training and validation parts), else **unlinked**. Facts are compared by
:func:`~kcs_lens.data.triplets.triplet_key`, as ``disjoint`` compares TargetKG and ControlKG.
"""

from __future__ import annotations

from typing import Iterable

from kcs_lens.data.triplets import TripletSet
from kcs_lens.downstream.tasks import Key, Question
from kcs_lens.errors import TaskError

GROUPS = ("removed", "kept", "unlinked")


def kg_links(*sets: TripletSet) -> dict[str, set[Key]]:
    """Question id -> facts, from KG rows that carry an ``id`` (the paper's CSQA TargetKG files)."""
    out: dict[str, set[Key]] = {}
    for ts in sets:
        for t in ts:
            qid = t.meta.get("id")
            if qid is not None and str(qid).strip():
                out.setdefault(str(qid), set()).add(t.key)
    return out


def assign(questions: Iterable[Question], target: set[Key], control: set[Key]) -> list[str]:
    """The group of every question (see the module docstring)."""
    out = []
    for q in questions:
        if q.keys & target:
            out.append("removed")
        elif q.keys & control:
            out.append("kept")
        else:
            out.append("unlinked")
    return out


def check_groups(groups: list[str], questions: list[Question], test_spec: str, target_spec: str, run: str) -> dict[str, int]:
    """Counts per group; a TaskError when no test question needs the removed knowledge."""
    counts = {g: groups.count(g) for g in GROUPS}
    if counts["removed"] == 0:
        n_linked = sum(1 for q in questions if q.keys)
        raise TaskError(
            f"no question of --test {test_spec} is linked to the TargetKG {target_spec!r} of run {run} "
            f"({n_linked} of {len(questions)} test questions are linked to some fact, by an inline 'triplet' or by id; "
            f"{counts['kept']} to the ControlKG): give questions about the TargetKG's facts, or --links files whose rows carry their ids"
        )
    return counts
