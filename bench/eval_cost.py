"""What the removal metrics (multiple choice, logit lens, unseen wordings) add to one discovery evaluation on the bundled model.

One process, the bundled recipe's run data (TargetKG ``building``), the masks attached in eval mode
as during discovery. Per round, in turn: the evaluation without them (tail scores of
the TargetKG and ControlKG validation, held-out LM perplexity), multiple choice on both sets, the
TargetKG's logit lens, the unseen wordings (tail scores and multiple choice of the bundled
paraphrase set) and one training step; medians over ``--rounds``, so machine load hits all alike.
Prints one JSON line (seconds and ratios against the evaluation without them)::

    nice -n 10 .venv/bin/python bench/eval_cost.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", default="building")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from kcs_lens.data.loaders import load_kg
    from kcs_lens.data.triplets import tokenize_triplets
    from kcs_lens.discovery.config import build_config
    from kcs_lens.discovery.runner import Run
    from kcs_lens.evaluation.choice import DistractorPool, build_choices, choice_scores
    from kcs_lens.evaluation.lens import lens_ranks
    from kcs_lens.evaluation.scoring import lm_nll, tail_scores

    cfg = build_config(target_kg=a.target)
    run = Run(cfg, __import__("pathlib").Path(tempfile.mkdtemp()), log=lambda m: None)
    lm, d = run.lm, run.data
    para = load_kg(f"{a.target}-paraphrases", model_name=lm.spec)
    para_batch = tokenize_triplets(para, lm.tokenizer, d_vocab=lm.shape.d_vocab)
    pool = DistractorPool([d.target, d.control, d.control_val])
    para_mc = build_choices(para, pool, lm.tokenizer, k=cfg.mc_choices, d_vocab=lm.shape.d_vocab)

    def before() -> None:
        tail_scores(lm, d.target_batch)
        tail_scores(lm, d.control_val_batch)
        math.exp(lm_nll(lm, d.lm_heldout))

    def mc() -> None:
        choice_scores(lm, run.choices["target"])
        choice_scores(lm, run.choices["control"])

    def lens() -> None:
        lens_ranks(lm, d.target_batch)

    def unseen() -> None:
        tail_scores(lm, para_batch)
        choice_scores(lm, para_mc)

    step_i = [0]

    def step() -> None:
        t, c, b = run.batches(step_i[0])
        run.opt.zero_grad(set_to_none=True)
        run.objective.step(t, c, b, step_i[0], cfg.steps)
        step_i[0] += 1

    arms = {"before": before, "mc": mc, "lens": lens, "unseen": unseen}
    times: dict[str, list[float]] = {k: [] for k in [*arms, "step"]}
    run.masks.attach(lm)
    try:
        run.objective.prepare(d.target_batch, d.control_batch)
        for _ in range(a.rounds):
            with run.masks.using("eval", "remaining"), torch.no_grad():
                for name, fn in arms.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            step()
            times["step"].append(time.perf_counter() - t0)
    finally:
        run.masks.detach()
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "bench": "eval_cost",
        "target": a.target,
        "rounds": a.rounds,
        "threads": a.threads,
        "load_avg": os.getloadavg(),
        "rows": {
            "target": len(d.target),
            "control_val": len(d.control_val),
            "mc_choices": int(run.choices["target"].item.numel() + run.choices["control"].item.numel()),
            "mc_rows": int(run.choices["target"].rows.shape[0] + run.choices["control"].rows.shape[0]),
            "unseen": len(para),
        },
        "seconds": {k: round(v, 4) for k, v in med.items()},
        "ratio_vs_before": {k: round(med[k] / med["before"], 3) for k in ("mc", "lens", "unseen")},
        "eval_with_mc_and_lens_vs_before": round((med["before"] + med["mc"] + med["lens"]) / med["before"], 3),
        "evaluation_before_in_steps": round(med["before"] / med["step"], 3),
        "mc_and_lens_in_steps": round((med["mc"] + med["lens"]) / med["step"], 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
