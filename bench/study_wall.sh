#!/bin/bash
# Wall time of a whole `kcs-lens sweep` study (docs/study.md's measurement), with the machine's load and
# the same yardstick as bench/discover_wall.sh around it (bench/step.py's dense step of the bundled
# model, 2 threads, idle 0.159 s) as a record of how busy the machine was. No idle estimate is
# derived from it: a 2-thread step slows far more under contention than the sweep's 1-thread cells
# (measured 0.24-8.4 s during one study). Appends one JSON line to bench/results/study_wall.jsonl.
# Run from the repository root; the arguments after STUDY are passed to `kcs-lens sweep`:
#   bash bench/study_wall.sh STUDY.toml OUT_DIR [--workers 2 | --executor ray]
# Torch's threads follow the sweep's own rule (cores / workers) unless OMP_NUM_THREADS is set.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-bench/results/study_wall.jsonl}
study=$1 out=$2
shift 2
tmp=$(mktemp -d)
load0=$(cut -d' ' -f1 /proc/loadavg)
OMP_NUM_THREADS=2 $PY bench/step.py --shape bundled --impl fast --no-memory --repeats 5 | tail -1 > "$tmp/y1"
rc=0
/usr/bin/time -f "%e %M %U %S" -o "$tmp/time" .venv/bin/kcs-lens sweep "$study" --out "$out" --no-progress "$@" > "$tmp/log" 2>&1 || rc=$?
load1=$(cut -d' ' -f1 /proc/loadavg)
OMP_NUM_THREADS=2 $PY bench/step.py --shape bundled --impl fast --no-memory --repeats 5 | tail -1 > "$tmp/y2"
$PY - "$tmp" "$load0" "$load1" "$out" "$rc" "$*" >> "$RESULTS" <<'PYEOF'
import json, os, sys, pathlib
tmp, load0, load1, out, rc, args = sys.argv[1:7]
tmp = pathlib.Path(tmp)
wall, rss_kb, user, sys_s = (float(x) for x in (tmp / "time").read_text().split()[-4:])
ys = [json.loads((tmp / f).read_text())["dense_s"] for f in ("y1", "y2")]
plan = json.loads((pathlib.Path(out) / "sweep.json").read_text())
row = {
    "command": f"kcs-lens sweep STUDY --out DIR --no-progress {args}".strip(), "rc": int(rc),
    "cells": len(plan["cells"]), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "wall_s": wall, "cpu_s_parent": round(user + sys_s, 1),
    "loadavg_1m": [float(load0), float(load1)], "yardstick_dense_s": ys, "yardstick_idle_s": 0.159,
}
print(json.dumps(row))
PYEOF
echo "log: $tmp/log"
tail -3 "$tmp/log"
exit $rc
