"""docs/cli-reference.md is generated from the app, so the docs cannot drift from ``--help``."""

import importlib.util
from pathlib import Path

import pytest

# no TransformerLens code runs here: scripts/test.sh runs it on one TL line only
pytestmark = pytest.mark.tl_independent


ROOT = Path(__file__).resolve().parents[1]


def _render() -> str:
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.render()


def test_cli_reference_is_current():
    text = _render()
    assert (ROOT / "docs" / "cli-reference.md").read_text() == text, "run: python scripts/cli_docs.py"
    # every command and every flag of discover is there, none truncated by the terminal width
    for cmd in ("discover", "evaluate", "baseline", "overlap", "report", "export", "compare-circuits", "kg show", "kg wordnet"):
        assert f"## `kcs-lens {cmd}`" in text
    for flag in ("--select-min-target-ratio", "--threads", "--device", "--eval-every", "--lm-block-len"):
        assert flag in text
    assert "…" not in text


def test_every_flag_has_help():
    """No option in any command's help is a bare flag without a description (bug 6 of issue 13)."""
    import click
    import typer

    from kcs_lens.cli.main import app

    root = typer.main.get_command(app)
    missing = []

    def walk(group, prefix):
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            if hasattr(cmd, "list_commands"):  # typer vendors its own click: no isinstance
                walk(cmd, f"{prefix} {name}")
                continue
            for p in cmd.params:
                if type(p).__name__.endswith("Option") and not (p.help or "").strip() and "--help" not in p.opts:
                    missing.append(f"{prefix} {name} {p.opts[0]}")

    walk(root, "kcs-lens")
    assert not missing, missing
