"""Can a five-choice question see a run's removal at all? No finetuning: for each bundled test
question about the run's TargetKG, score its five choices after the fact's own KG template prefix
("A building is a" + " structure"; the article in the prefix can rule out distractors that need the
other one) and count how often the right tail wins, for the original and the remaining model.

    python scripts/downstream_template_check.py RUN [RUN...]      # runs on the bundled model

docs/downstream.md ("Measured on the bundled model") reports its output for the bundled runs.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kcs_lens.data.loaders import load_kg  # noqa: E402
from kcs_lens.discovery.rundir import load_run  # noqa: E402
from kcs_lens.downstream import load_questions  # noqa: E402
from kcs_lens.downstream.finetune import choice_logprob, encode, predict, removed  # noqa: E402
from kcs_lens.model.loading import load_model  # noqa: E402


def main(runs: list[str]) -> None:
    lm = load_model("bundled")
    test = load_questions("bundled:test")
    for run in runs:
        info = load_run(run)
        facts = {t.key: t for t in load_kg(info.config.target_kg)}
        qs = [replace(q, question=facts[k].prefix) for q in test for k in q.keys if k in facts]
        enc = encode(qs, lm, "{question}")
        out = {}
        for name, sub in (("original", None), ("remaining", info.subnetwork)):
            with removed(lm, sub):
                right = predict(enc, lambda s, e=enc: choice_logprob(lm, e, s, mean=False), 64)
            out[name] = f"{int(right.sum())}/{len(right)}"
        print(f"{run}: TargetKG {info.config.target_kg}, right choice after the template prefix: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
