"""bench/step.py keeps working: one JSON line per configuration with the fields docs/performance.md
reads. (Timings themselves are never asserted: they belong to the benchmark, not the tests.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "step.py"
pytestmark = pytest.mark.skipif(not BENCH.exists(), reason="bench/ is not part of this checkout")


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_step_bench_prints_one_json_line_per_configuration():
    r = _bench(
        "--shape",
        "tiny",
        "--impl",
        "reference,fast",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--extrapolate-steps",
        "40000",
    )
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    rows = [json.loads(l) for l in lines]  # stdout holds nothing but the JSON lines
    assert [x["impl"] for x in rows] == ["reference", "fast"]
    for x in rows:
        assert x["shape"] == "tiny" and x["batch"] == {"target": [16, 10], "control": [16, 10], "lm": [2, 64]}
        assert x["kcs_s"] > 0 and x["dense_s"] > 0
        assert x["ratio"] == pytest.approx(x["kcs_s"] / x["dense_s"], rel=0.02)  # from rounded times
        assert x["kcs_peak_mb"] > 100 and x["dense_peak_mb"] > 100  # a real process's peak RSS
        assert x["extrapolated_h"]["kcs"] == pytest.approx(x["kcs_s"] * 40000 / 3600, rel=1e-2, abs=0.01)
    assert rows[1]["cache_mb"]["kg_prefix"] > 0  # the fast path cached the KG rows' prefix


def test_step_bench_names_variants_and_refuses_unknown_ones():
    r = _bench("--impl", "list")
    assert r.returncode == 0 and "fast-all-off" in r.stdout and "+prefix_cache+p_cache" in r.stdout
    r = _bench("--shape", "tiny", "--impl", "fastest")
    assert r.returncode == 2 and "unknown --impl ['fastest']" in r.stderr
