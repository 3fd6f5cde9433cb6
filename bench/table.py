"""Markdown table from bench/step.py JSON lines: python bench/table.py FILE.jsonl [...]"""

from __future__ import annotations

import json
import sys


def fmt(x, nd=2):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def main(paths: list[str]) -> None:
    print(
        "| shape | backend | batch (T / C / LM) | threads | impl | kcs s | dense s | ratio | paired | cpu ratio | GFLOP ratio | kcs peak MB | dense peak MB | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        for line in open(p):
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            bt = r["batch"]
            batch = f"{bt['target'][0]}x{bt['target'][1]} / {bt['control'][0]}x{bt['control'][1]} / {bt['lm'][0]}x{bt['lm'][1]}"
            print(
                f"| {r['shape']} | {r['backend']} | {batch} | {r['threads']} | {r['impl']} | {fmt(r['kcs_s'])} | {fmt(r['dense_s'])} "
                f"| **{fmt(r['ratio'], 3)}** | {fmt(r['ratio_paired'], 3)} | {fmt(r['ratio_cpu'], 3)} | {fmt(r.get('ratio_gflop'), 3)} "
                f"| {fmt(r['kcs_peak_mb'], 0)} | {fmt(r['dense_peak_mb'], 0)} | {fmt(r['loadavg_1m'], 1)} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
