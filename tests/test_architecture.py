"""The architecture's promises (issue 23), checked so that they stay kept: every command that loads
a run takes the same model-override options, typed settings name the option in their errors, and
no module or function grows past the size a reader takes in at once."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOADS_A_RUN = ("evaluate", "baseline", "overlap", "report", "export", "downstream", "compare-circuits")


def _commands() -> dict[str, object]:
    import click
    import typer

    from kcs_lens.cli.main import app

    root = typer.main.get_command(app)
    ctx = click.Context(root)
    return {n: root.get_command(ctx, n) for n in root.list_commands(ctx)}


def test_every_command_that_loads_a_run_takes_the_same_model_overrides():
    cmds = _commands()
    seen = {}
    for name in LOADS_A_RUN:
        opts = {o: p for p in cmds[name].params for o in getattr(p, "opts", [])}
        for flag in ("--model", "--backend", "--device"):
            assert flag in opts, f"kcs-lens {name} has no {flag}"
            seen.setdefault(flag, set()).add(opts[flag].help)
    assert all(len(helps) == 1 for helps in seen.values()), seen  # declared once (cli/model_options.py)


@pytest.mark.parametrize(
    "where, kw, message",
    [
        ("kcs_lens.analyses.config:CompareConfig", {"corrupt": "flip"}, "--corrupt 'flip'"),
        ("kcs_lens.analyses.config:CompareConfig", {"n_bootstrap": 0}, "--n-bootstrap 0"),
        ("kcs_lens.sweep.config:SweepConfig", {"force": True, "add": True}, "--force"),
        ("kcs_lens.sweep.config:SweepConfig", {"executor": "slurm"}, "--executor 'slurm'"),
        ("kcs_lens.downstream.config:DownstreamConfig", {"task": "bundled", "mode": "adapter"}, "--finetune 'adapter'"),
        ("kcs_lens.discovery.config:DiscoveryConfig", {"granularity": "atom"}, "--granularity 'atom'"),
    ],
)
def test_typed_settings_name_the_option(where, kw, message):
    import importlib

    from kcs_lens.errors import ConfigError
    from kcs_lens.settings import build

    module, name = where.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError, match=message):
        build(cls, kw).validate()


def test_typed_settings_reach_the_command_line(tmp_path):
    """A bad value of a generated flag is one error line naming it, before any work (no run needed)."""
    from _eval_fixtures import cli

    r = cli("compare-circuits", tmp_path / "nope", "--corrupt", "flip")
    assert r.exit_code == 2 and r.output.startswith("error: --corrupt 'flip'"), r.output


def _sizes():
    for root in ("kcs_lens", "cli", "analyses"):
        for p in sorted((ROOT / root).rglob("*.py")):
            src = p.read_text()
            yield (
                p,
                len(src.splitlines()),
                [
                    (n.name, n.end_lineno - n.lineno + 1)
                    for n in ast.walk(ast.parse(src))
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                ],
            )


def test_no_module_over_400_lines_and_no_function_over_80():
    too_long = [f"{p.relative_to(ROOT)}" for p, n, _ in _sizes() if n > 400]
    too_long += [f"{p.relative_to(ROOT)}: {f}()" for p, _, fs in _sizes() for f, n in fs if n > 80]
    assert not too_long, sorted(too_long)
