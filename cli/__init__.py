"""kcs_lens.cli: the Typer app behind the ``kcs-lens`` command (installed from the top-level cli/ folder)."""
