"""The bundled study run unpacked (one cell per worker task, as before packs) and packed
(``kcs-lens sweep --pack N``) side by side on this machine, one after the other in one command:
wall time of each whole ``kcs-lens sweep``, the ratio packed / unpacked, the load average around
each, and whether every cell selected the same step with the same criteria and the same
subnetwork bytes. Appends one JSON line to bench/results/pack_study.jsonl.

    python bench/pack_study.py                                  # 5 TargetKGs x 3 seeds, 2 workers, --pack 8
    python bench/pack_study.py --targets building,location --seeds 84,1318 --steps 50   # a quick look
    python bench/pack_study.py --device cuda --workers 1 --pack 15                      # one GPU

Run from the repository root with the environment's python (the `kcs-lens` next to it is used).
The unpacked run comes first; run the command twice and compare both orders if the machine's load
changes (it is printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = "building,location,fruit,communication,change"
SEEDS = "84,1318,735"


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0]) if Path("/proc/loadavg").exists() else float("nan")


def sweep(study: Path, out: Path, args: list[str]) -> dict:
    kcs = Path(sys.executable).with_name("kcs-lens")
    cmd = [str(kcs) if kcs.exists() else "kcs-lens", "sweep", str(study), "--out", str(out), "--no-progress", *args]
    l0, t0, c0 = load(), time.perf_counter(), os.times()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall, c1 = time.perf_counter() - t0, os.times()
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    cpu = (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system)
    return {"args": " ".join(args), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "loadavg_1m": [l0, load()]}


def cells(out: Path) -> dict[str, dict]:
    plan = json.loads((out / "sweep.json").read_text())
    res = {}
    for c in plan["cells"]:
        d = out / c["name"]
        s = json.loads((d / "summary.json").read_text())
        res[c["name"]] = {
            "selected_step": s["selected_step"],
            "meets_criteria": s["meets_criteria"],
            "sparsity": s["sparsity"],
            "ratio": s["ratio"],
            "subnetwork_sha256": hashlib.sha256((d / "subnetwork.safetensors").read_bytes()).hexdigest(),
        }
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=TARGETS)
    p.add_argument("--seeds", default=SEEDS)
    p.add_argument("--steps", type=int, default=None, help="steps per cell (default: the bundled recipe's 250)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pack", type=int, default=8, help="cells per pack in the packed run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (both runs)")
    p.add_argument("--device", default=None)
    p.add_argument("--keep", default=None, help="keep the two study directories here")
    p.add_argument("--results", default="bench/results/pack_study.jsonl")
    a = p.parse_args()
    tmp = Path(a.keep or tempfile.mkdtemp(prefix="pack-study-"))
    tmp.mkdir(parents=True, exist_ok=True)
    base = {"model": "bundled", **({"steps": a.steps} if a.steps else {}), **({"device": a.device} if a.device else {})}
    lines = ["[base]", *(f"{k} = {json.dumps(v)}" for k, v in base.items()), "", "[grid]"]
    lines += [f"target_kg = {json.dumps(a.targets.split(','))}", f"seed = {json.dumps([int(s) for s in a.seeds.split(',')])}"]
    study = tmp / "study.toml"
    study.write_text("\n".join(lines) + "\n")
    common = ["--workers", str(a.workers), "--threads", str(a.threads)]
    runs = {}
    for name, extra in (("unpacked", []), ("packed", ["--pack", str(a.pack)])):
        out = tmp / name
        if out.exists():
            shutil.rmtree(out)
        runs[name] = sweep(study, out, common + extra)
        print(f"# {name}: {runs[name]}", file=sys.stderr, flush=True)
    a_cells, b_cells = cells(tmp / "unpacked"), cells(tmp / "packed")
    differ = sorted(n for n in a_cells if a_cells[n] != b_cells.get(n))
    row = {
        "command": "python bench/pack_study.py " + " ".join(sys.argv[1:]),
        "cells": len(a_cells),
        "unpacked": runs["unpacked"],
        "packed": runs["packed"],
        "ratio_packed_unpacked": round(runs["packed"]["wall_s"] / runs["unpacked"]["wall_s"], 3),
        "ratio_cpu": round(runs["packed"]["cpu_s"] / runs["unpacked"]["cpu_s"], 3),
        "same_selection_and_masks": not differ,
        "differing_cells": differ,
        "cpu_count": os.cpu_count(),
    }
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    with open(a.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
