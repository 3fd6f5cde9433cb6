"""What the commands print fits an 80-column terminal: tables, the progress bar, ``--help``; and the
help shows the value that will run (paper and bundled recipe)."""

from __future__ import annotations

import io
import json
import re

import pytest
from _eval_fixtures import cli

from kcs_lens.discovery.config import field_default
from kcs_lens.discovery.recipes import BUNDLED_RECIPE

pytest_plugins = ["_eval_fixtures"]  # fixtures tiny_lm, real_run (shared by the session)

WIDTH = 80


def _fits(text: str) -> None:
    # transformers' own weight-loading bar (stderr, redrawn with \r) is not ours
    lines = [line for line in text.split("\n") if "\r" not in line and not line.startswith("Loading weights")]
    text = "\n".join(lines)
    assert lines and max(len(line) for line in lines) <= WIDTH, "\n".join(line for line in lines if len(line) > WIDTH)
    assert "…" not in text, text  # nothing cut short


def test_evaluate_and_baseline_tables_fit_80_columns(real_run, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    r = cli("evaluate", real_run, "--json", tmp_path / "ev.json")
    assert r.exit_code == 0, r.output
    _fits(r.output)
    m = json.loads((tmp_path / "ev.json").read_text())["metrics"]
    for s in ("target", "control", "lm"):  # every number whole, in its row
        x = m["remaining"][s]
        assert re.search(re.escape(f"{x['ppl']:.3f}") + r"\s+" + re.escape(f"{x['dppl']:+.3f}"), r.output), s
    t = m["remaining"]["target"]
    words = r.output.split()  # a cell may wrap at its space, never inside a number
    assert f"{t['dlogprob_mean']:+.2f}" in words and f"[{t['dlogprob_min']:+.2f},{t['dlogprob_max']:+.2f}]" in words
    r = cli("baseline", real_run, "--draws", "2", "--json", tmp_path / "bl.json")
    assert r.exit_code == 0, r.output
    _fits(r.output)
    assert "dPPL" in r.output and "±" in r.output


def test_discover_summary_fits_80_columns(real_run, capsys, monkeypatch):
    from kcs_lens.cli.discover import print_summary

    monkeypatch.setenv("COLUMNS", str(WIDTH))
    s = json.loads((real_run / "summary.json").read_text())
    print_summary({**s, "run_dir": str(real_run)})
    out = capsys.readouterr().out
    _fits(out)
    r = s["remaining"]
    assert re.search(re.escape(f"{s['original']['target_ppl']:.3f}") + r"\s+" + re.escape(f"{r['target_ppl']:.3f}") + r"\s+", out)


def test_progress_bar_wraps_its_numbers_instead_of_cutting_them():
    from rich.console import Console

    from kcs_lens.progress import Progress

    buf = io.StringIO()
    bar = Progress(250, 0, True, console=Console(width=WIDTH, file=buf))
    losses = {"suppression": 6.2034, "control_kg": 0.225123, "control_lm": 0.2331, "tail": 1.84, "sparsity": 0.391}
    bar.update(13, {**losses, "total": 1312.5})
    bar.close()
    out = buf.getvalue()
    _fits(out)
    for label, v in (("supp", 6.2034), ("ctrl_kg", 0.225123), ("total", 1312.5)):
        assert f"{label}={v:.3g}" in out.split(), out


@pytest.mark.parametrize("group", [[], ["sweep"], ["kg"]])
def test_short_help_lines_are_whole_sentences_at_80_columns(group, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    r = cli(*group, "--help")
    assert r.exit_code == 0, r.output
    commands = r.output.split("Commands:")[1]
    assert commands.strip() and "..." not in commands, commands
    _fits(r.output)


def test_discover_help_shows_the_value_each_recipe_runs(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    r = cli("discover", "--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    for flag in ("steps", "lr", "eval_every"):
        want = f"[default: {field_default(flag)} (paper recipe); bundled recipe: {BUNDLED_RECIPE[flag]}]"
        assert want in text, (flag, want)
    assert "bundled recipe: 75.0; 5 at --granularity head]" in text  # --sparsity-start
