"""One error convention for every command: a one-line message on stderr and exit code 2."""

from __future__ import annotations

import typer

from kcs_lens.config import ConfigError
from kcs_lens.data.triplets import KGError
from kcs_lens.discovery import RunError
from kcs_lens.masks import MaskError
from kcs_lens.models import ModelLoadError
from kcs_lens.subnetwork import SubnetworkError

EXIT_BAD_INPUT = 2
EXPECTED_ERRORS = (ConfigError, KGError, RunError, MaskError, ModelLoadError, SubnetworkError, FileNotFoundError)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)
