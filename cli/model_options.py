"""The model-override options of every command that loads a run's model (``evaluate``,
``baseline``, ``overlap``, ``report``, ``export``, ``downstream``, ``compare-circuits``), declared
once: ``--model``, ``--backend``, ``--device``; :func:`overrides` turns them into the library's
:class:`~kcs_lens.discovery.run_model.ModelOverrides`."""

from typing import Any, Optional

import typer

MODEL_OPT: Any = typer.Option(None, "--model", help="model spec to use instead of the run's (must have the same weights)")
BACKEND_OPT: Any = typer.Option(None, "--backend", help="bridge (TransformerLens 4.x) or hooked (3.x) instead of the run's")
DEVICE_OPT: Any = typer.Option(None, "--device", help="torch device, e.g. cpu or cuda (default: the run's --device)")


def overrides(model: Optional[str], backend: Optional[str], device: Optional[str]) -> Any:
    """The :class:`~kcs_lens.discovery.run_model.ModelOverrides` of the three options."""
    from kcs_lens.discovery.run_model import ModelOverrides

    return ModelOverrides(model=model, backend=backend, device=device)
