"""cli/ and analyses/ install as kcs_lens.cli and kcs_lens.analyses, in the wheel and editable installs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# no TransformerLens code runs here: scripts/test.sh runs it on one TL line only
pytestmark = pytest.mark.tl_independent


ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, json, kcs_lens, kcs_lens.cli.main, kcs_lens.analyses\n"
    "print(json.dumps({'kcs': kcs_lens.__file__, 'cli': kcs_lens.cli.main.__file__,"
    " 'generic': [n for n in ('cli', 'analyses') if importlib.util.find_spec(n) is not None]}))\n"
)


def _probe(env: dict, cwd: Path) -> dict:
    import json

    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_editable_install_maps_cli_and_analyses(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    got = _probe(env, tmp_path)  # a folder outside the repo: only the install is visible
    assert Path(got["cli"]).resolve() == ROOT / "cli" / "main.py"
    assert got["generic"] == [], "nothing may install as a generic top-level 'cli' or 'analyses'"


def test_wheel_contains_only_kcs_lens(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    wheel = next(tmp_path.glob("kcs_lens-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"kcs_lens", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "kcs_lens/cli/main.py" in names and "kcs_lens/analyses/__init__.py" in names
    assert {"kcs_lens/analyses/compare_circuits.ipynb", "kcs_lens/analyses/discovery_to_downstream.ipynb"} <= set(names)
    if (ROOT / "kcs_lens" / "bundled" / "model" / "config.json").exists():
        assert "kcs_lens/bundled/model/model.safetensors" in names
    if (ROOT / "kcs_lens" / "bundled" / "llama" / "model" / "config.json").exists():  # bundled-llama
        assert {"kcs_lens/bundled/llama/model/model.safetensors", "kcs_lens/bundled/llama/model/tokenizer.json"} <= set(names)
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    got = _probe({**os.environ, "PYTHONPATH": str(target)}, tmp_path)
    assert Path(got["cli"]).resolve() == (target / "kcs_lens" / "cli" / "main.py").resolve()
    assert got["generic"] == []


def test_bundled_models_ship_with_the_package():
    from conftest import bundled_available

    from kcs_lens.model.loading import BUNDLED_DIR

    assert bundled_available(), f"no bundled model at {BUNDLED_DIR}"
    assert (BUNDLED_DIR.parent / "llama" / "model" / "config.json").exists()
