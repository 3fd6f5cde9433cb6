"""`kcs-lens kg wordnet`: builds files atomically; bad synset / missing WordNet exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kcs_lens.cli.main import app

# no TransformerLens code runs here: scripts/test.sh runs it on one TL line only
pytestmark = pytest.mark.tl_independent


def _have_wordnet() -> bool:
    try:
        from kcs_lens.data.wordnet import open_wordnet

        open_wordnet()
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _have_wordnet(), reason="no WordNet (nltk data or Debian wordnet-base)")
def test_kg_wordnet_builds_target_and_control(tmp_path):
    r = CliRunner().invoke(app, ["kg", "wordnet", "--root", "location.n.01", "--out", str(tmp_path), "--control", "30"])
    assert r.exit_code == 0, r.output
    target = [json.loads(l) for l in (tmp_path / "target_location.jsonl").read_text().splitlines()]
    control = [json.loads(l) for l in (tmp_path / "control.jsonl").read_text().splitlines()]
    assert 10 <= len(target) <= 40 and len(control) == 30
    syn = {t[k] for t in target for k in ("head_synset", "tail_synset")}
    assert not syn & {c[k] for c in control for k in ("head_synset", "tail_synset")}
    assert all(t["text"].endswith(t["tail"]) and " " not in t["tail"] for t in target)
    # loads back through the data layer
    r = CliRunner().invoke(app, ["kg", "show", str(tmp_path / "target_location.jsonl")])
    assert r.exit_code == 0 and "IsA" in r.output


@pytest.mark.skipif(not _have_wordnet(), reason="no WordNet (nltk data or Debian wordnet-base)")
def test_kg_wordnet_bad_input(tmp_path):
    r = CliRunner().invoke(app, ["kg", "wordnet", "--root", "nosuch.n.01", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "nosuch.n.01" in r.output
    assert not list(Path(tmp_path).iterdir()), "nothing written on error"
    r = CliRunner().invoke(app, ["kg", "wordnet", "--root", "building.n.01", "--wordnet", str(tmp_path / "none")])
    assert r.exit_code == 2 and "does not exist" in r.output
