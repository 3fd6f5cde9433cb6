#!/bin/bash
# Wall time and peak RSS of the default `kcs-lens discover` (README command 1: bundled model,
# bundled recipe), with the machine's load and a yardstick measured around it: bench/step.py's
# dense step of the bundled model (2 threads), whose idle time is 0.159 s (bench/results/bundled.jsonl,
# docs/performance.md). idle_estimate_s = wall_s * 0.159 / (mean yardstick now).
# Appends one JSON line to bench/results/discover_wall.jsonl. Run from the repository root:
#   nice -n 10 bash bench/discover_wall.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results/discover_wall.jsonl}
RUN=${RUN:-runs/discover-wall}
tmp=$(mktemp -d)
load0=$(cut -d' ' -f1 /proc/loadavg)
$PY bench/step.py --shape bundled --impl fast --no-memory --repeats 5 | tail -1 > "$tmp/y1"
/usr/bin/time -f "%e %M %U %S" -o "$tmp/time" .venv/bin/kcs-lens discover --out "$RUN" --force --no-progress > "$tmp/log" 2>&1
load1=$(cut -d' ' -f1 /proc/loadavg)
$PY bench/step.py --shape bundled --impl fast --no-memory --repeats 5 | tail -1 > "$tmp/y2"
$PY - "$tmp" "$load0" "$load1" "$RUN" >> "$OUT" <<'PYEOF'
import json, sys, pathlib
tmp, load0, load1, run = pathlib.Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), pathlib.Path(sys.argv[4])
wall, rss_kb, user, sys_s = (float(x) for x in (tmp / "time").read_text().split()[-4:])
ys = [json.loads((tmp / f).read_text())["dense_s"] for f in ("y1", "y2")]
s = json.loads((run / "summary.json").read_text())
row = {
    "command": "kcs-lens discover (no arguments)", "wall_s": wall, "peak_rss_mb": round(rss_kb / 1024, 1),
    "cpu_s": round(user + sys_s, 1), "loadavg_1m": [load0, load1], "yardstick_dense_s": ys, "yardstick_idle_s": 0.159,
    "idle_estimate_s": round(wall * 0.159 / (sum(ys) / len(ys)), 1), "config": json.loads((run / "config.json").read_text())["config"],
    "summary": {k: s[k] for k in ("selected_step", "meets_criteria", "sparsity", "original", "remaining", "ratio")},
}
print(json.dumps(row))
PYEOF
tail -1 "$OUT"
