"""What optional TargetKG terms add to a discovery step on the bundled model.

One process, the same model and batches; the bundled recipe (with ``--set`` overrides) and the same
config with the ``--terms`` weights set to 0 take turns, ``--steps`` steps per round, medians over
``--rounds``, so machine load hits both alike. Prints one JSON line: seconds per step for each and
their ratio, which scales a measured wall time of the run without the terms (docs/performance.md)::

    nice -n 10 .venv/bin/python bench/tail_cost.py --rounds 5 --steps 10            # the tail term
    nice -n 10 .venv/bin/python bench/tail_cost.py --set distractor_weight=1 --set lens_weight=0.5 \\
        --terms tail_weight,distractor_weight,lens_weight                             # all three
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def _value(v: str) -> object:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for both arms")
    ap.add_argument("--terms", default="tail_weight", help="comma list of the weights set to 0 in the 'without' arm")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from kcs_lens.discovery.config import build_config
    from kcs_lens.discovery.runner import Run
    from kcs_lens.model.loading import load_model

    over = {k: _value(v) for k, v in (s.split("=", 1) for s in a.set)}
    terms = [t for t in a.terms.split(",") if t]
    lm = load_model("bundled")
    runs = {}
    for name, extra in (("with", {}), ("without", {t: 0.0 for t in terms})):
        cfg = build_config(**{**over, **extra})
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
                "what": f"bundled recipe step, {'+'.join(terms)} on vs 0",
                "set": over,
                "terms": terms,
                "threads": a.threads,
                "rounds": a.rounds,
                "steps_per_round": a.steps,
                "with_s": round(med["with"], 4),
                "without_s": round(med["without"], 4),
                "ratio": round(med["with"] / med["without"], 3),
                "loadavg_1m": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
