"""What the tail term adds to a discovery step on the bundled model (issue 14's bundled recipe).

One process, the same model and batches; the recipe with the tail term and the same recipe with
``tail_weight = 0`` take turns, ``--steps`` steps per round, medians over ``--rounds``, so machine
load hits both alike. Prints one JSON line: seconds per step for each and their ratio, which
scales the measured wall time of the earlier default run (docs/performance.md)::

    nice -n 10 .venv/bin/python bench/tail_cost.py --rounds 5 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from kcs_lens.discovery.config import build_config
    from kcs_lens.discovery.runner import Run
    from kcs_lens.model.loading import load_model

    lm = load_model("bundled")
    runs = {}
    for name, over in (("tail", {}), ("no_tail", {"tail_weight": 0.0})):
        cfg = build_config(**over)
        run = Run(cfg, tempfile.mkdtemp(), lm=lm, log=lambda s: None)
        run.objective.prepare(run.data.target_batch, run.data.control_batch)
        runs[name] = run
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(a.rounds + 1):  # round 0 warms up
        for name, run in runs.items():
            run.masks.attach(lm)
            try:
                t0 = time.perf_counter()
                for s in range(a.steps):
                    t, c, b = run.batches(s)
                    run.opt.zero_grad(set_to_none=True)
                    run.objective.step(t, c, b, s, run.cfg.steps)
                    run.opt.step()
                dt = (time.perf_counter() - t0) / a.steps
            finally:
                run.masks.detach()
            if r:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "what": "bundled recipe step, tail term on vs off",
                "threads": a.threads,
                "rounds": a.rounds,
                "steps_per_round": a.steps,
                "tail_s": round(med["tail"], 4),
                "no_tail_s": round(med["no_tail"], 4),
                "ratio": round(med["tail"] / med["no_tail"], 3),
                "loadavg_1m": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
