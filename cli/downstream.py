"""``kcs-lens downstream``: one flag per :class:`~kcs_lens.downstream.config.DownstreamConfig` field
(generated, cli/config_options.py), the model overrides (cli/model_options.py) and where the results
go; a thin wrapper over :func:`kcs_lens.downstream.downstream` (mounted by cli/main.py through
``register``)."""

from pathlib import Path
from typing import Any, List, Optional

import typer

from kcs_lens.cli.config_options import argument, config_parameters, given, option_parameters, with_parameters
from kcs_lens.cli.model_options import BACKEND_OPT, DEVICE_OPT, MODEL_OPT, overrides
from kcs_lens.downstream.config import DownstreamConfig
from kcs_lens.settings import build

OTHER_OPTIONS: dict[str, tuple[Any, Any]] = {
    "subnetwork": (Optional[Path], typer.Option(None, "--subnetwork", help="a subnetwork file instead of RUN's (one run)")),
    "model": (Optional[str], MODEL_OPT),
    "backend": (Optional[str], BACKEND_OPT),
    "device": (Optional[str], DEVICE_OPT),
    "out": (Optional[Path], typer.Option(None, "--out", help="where downstream.json / .md go (default: RUN)")),
    "progress": (bool, typer.Option(True, "--progress/--no-progress", help="show the progress bar")),
}


def downstream(runs: List[Path], **kw: Any) -> None:
    """Finetune the models on a QA task and compare them.

    Finetunes the original, remaining and random-pruned models on a multiple-choice task and compares their accuracy on the questions that need the removed knowledge (docs/downstream.md)."""
    from kcs_lens.downstream import downstream as run_downstream

    other = {k: kw.pop(k) for k in OTHER_OPTIONS}
    res = run_downstream(
        runs,
        build(DownstreamConfig, given(kw)),
        subnetwork=other["subnetwork"],
        overrides=overrides(other["model"], other["backend"], other["device"]),
        out=other["out"],
        progress=other["progress"],
        log=typer.echo,
    )
    typer.echo(Path(res["files"][1]).read_text())
    typer.echo("wrote " + ", ".join(res["files"]))


def register(app: typer.Typer) -> None:
    runs = argument("runs", List[Path], "discovery run directories (or overlap combinations); several need --out")
    params = [runs, *config_parameters(DownstreamConfig), *option_parameters(OTHER_OPTIONS)]
    app.command("downstream")(with_parameters(downstream, params))
