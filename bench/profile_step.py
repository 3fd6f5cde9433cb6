"""Where a step's time goes: torch.profiler over one dense step and one step of each kcs variant.

    python bench/profile_step.py --shape gpt2-small --impl reference,fast [--rows 25]

Takes the arguments of bench/step.py (shape, batch sizes, --impl, --threads); runs one untimed
warm-up step of each, then profiles one step and prints the top operators by self CPU time and
the process CPU time of the step (less sensitive to other load on the machine than wall time).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step as bench  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rows = 25
    if "--rows" in argv:
        i = argv.index("--rows")
        rows = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    a = bench.parse(argv)
    torch.set_num_threads(a.threads)
    dense, lm, layers, (t, c, b), ac, _ = bench.build(a, need_dense=True, need_kcs=True)
    table = bench.variants()
    runs = {"dense": lambda: dense.step(t, c, b)}
    for n in a.impl:
        k = bench.Kcs(lm, *table[n], layers, a.device, ac)
        runs[n] = lambda k=k: k.step(t, c, b)
    for n, fn in runs.items():
        fn()  # warm-up (fills the fast path's per-run caches)
        c0, w0 = time.process_time(), time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n=== {n}: cpu {time.process_time() - c0:.2f} s, wall {time.perf_counter() - w0:.2f} s (profiled)")
        ka = prof.key_averages()
        print(ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))
        for e in sorted(ka, key=lambda e: e.key):
            if e.key.startswith("kcs."):
                print(f"  {e.key:36s} {e.cpu_time_total / 1e6:8.3f} s total  x{e.count}")


if __name__ == "__main__":
    main()
