"""The ``kcs-lens`` command line (Typer). Thin: parse flags, call the library, print results.

``kcs-lens discover`` (cli/discover.py) -> :func:`kcs_lens.discovery.config.build_config` ->
:func:`kcs_lens.discovery.runner.discover` -> a run directory with ``subnetwork.safetensors`` and
``summary.json``. Every command runs under one error convention (cli/errors.py).
"""

import os
import typing

import typer

from kcs_lens.cli import compare, discover, downstream, evaluate
from kcs_lens.cli.errors import App
from kcs_lens.cli.kg import kg_app
from kcs_lens.cli.sweep import sweep_app

app = App(
    help="Knowledge-critical subnetworks (Bayazit et al., EMNLP 2024) for TransformerLens models.",
    no_args_is_help=False,
    pretty_exceptions_enable=False,
)
app.add_typer(kg_app, name="kg")
app.add_typer(sweep_app, name="sweep")


@app.callback(invoke_without_command=True)
@typing.no_type_check  # typer hands in its own Context subclass; the test-time checker would refuse it
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="show the traceback of an unexpected error (also KCS_LENS_DEBUG=1)"),
) -> None:
    if debug:
        os.environ["KCS_LENS_DEBUG"] = "1"
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


for module in (discover, evaluate, compare, downstream):
    module.register(app)

if __name__ == "__main__":  # pragma: no cover
    app()
