"""Build the bundled downstream task: multiple-choice questions about the bundled WordNet facts.

Each IsA fact (head, IsA, tail) of the bundled KGs becomes one question in CommonsenseQA's
Hugging Face schema with its fact inline (``triplet``), worded unlike the KG templates ("A
cathedral is a church" becomes "Which category does a cathedral belong to?"), with five choices:
the tail and four distractor tails of other facts of the same KG (topped up from all bundled tails
where a KG has too few), none of which is a known ancestor of the head (so exactly one choice is
right under the bundled facts). Drawing distractors from the same KG keeps a cue out of the task:
with distractors from all tails, a classifier that merely prefers tails frequent in the training
questions (the ControlKG's) is wrong on almost every TargetKG question, whatever the model knows.

- ``train.jsonl``: one question per ControlKG-train fact (bundled ``control``) only;
- ``test.jsonl``: one per fact of every bundled TargetKG and of ControlKG-val (``control-val``).

A run on TargetKG ``building`` thus has 30 ``removed`` test questions (its own facts), 200 ``kept``
(ControlKG-val) and the other TargetKGs' questions ``unlinked``. Deterministic (seed 0)::

    python scripts/make_bundled_task.py            # writes kcs_lens/bundled/task/
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kcs_lens.data.loaders import builtin_names, load_kg  # noqa: E402
from kcs_lens.data.templates import with_article  # noqa: E402
from kcs_lens.files import atomic_write_bytes, atomic_write_json  # noqa: E402

WORDINGS = [
    "Which category does {a_head} belong to?",
    "Under which broader group would you file {a_head}?",
    "{A_head} falls under which class?",
    "Pick the general class that includes {a_head}.",
    "Which of these covers {a_head}?",
]
LABELS = ["A", "B", "C", "D", "E"]


def word(text: str, head: str) -> str:
    a = with_article(head)
    return text.format(a_head=a, A_head=a[:1].upper() + a[1:])


def ancestors(head: str, parents: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [head]
    while todo:
        for p in parents.get(todo.pop(), ()):
            if p not in seen:
                seen.add(p)
                todo.append(p)
    return seen


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "kcs_lens" / "bundled" / "task")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    targets = sorted(n for n in builtin_names() if n not in ("control", "control-val") and not n.endswith("-paraphrases"))
    sets = {"control": load_kg("control"), "control-val": load_kg("control-val"), **{t: load_kg(t) for t in targets}}
    parents: dict[str, set[str]] = {}
    for ts in sets.values():
        for t in ts:
            parents.setdefault(t.head, set()).add(t.tail)
    pool = sorted({t.tail for ts in sets.values() for t in ts})
    local = {name: sorted({t.tail for t in ts}) for name, ts in sets.items()}

    def questions(name: str, split: str) -> list[dict]:
        out = []
        for i, t in enumerate(sets[name]):
            banned = ancestors(t.head, parents) | {t.tail, t.head}
            own = [x for x in local[name] if x not in banned]  # distractors from the same KG first:
            if len(own) < len(LABELS) - 1:  # no answer-frequency cue separates train from test
                own += rng.sample([x for x in pool if x not in banned and x not in own], len(LABELS) - 1 - len(own))
            choices = [t.tail] + rng.sample(own, len(LABELS) - 1)
            rng.shuffle(choices)
            out.append(
                {
                    "id": f"{split}-{name}-{i:04d}",
                    "question": word(rng.choice(WORDINGS), t.head),
                    "question_concept": t.head,
                    "choices": {"label": LABELS, "text": choices},
                    "answerKey": LABELS[choices.index(t.tail)],
                    "triplet": {"head": t.head, "relation": t.relation, "tail": t.tail},
                    "source": name,
                }
            )
        return out

    train = questions("control", "train")
    test = [q for name in [*targets, "control-val"] for q in questions(name, "test")]
    for name, rows in (("train", train), ("test", test)):
        atomic_write_bytes(args.out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    atomic_write_json(
        args.out / "MANIFEST.json",
        {
            "script": "scripts/make_bundled_task.py",
            "seed": args.seed,
            "wordings": WORDINGS,
            "choices": len(LABELS),
            "train": {"control": len(train)},
            "test": {name: sum(q["source"] == name for q in test) for name in [*targets, "control-val"]},
        },
    )
    print(f"wrote {args.out}: {len(train)} train, {len(test)} test questions")


if __name__ == "__main__":
    main()
