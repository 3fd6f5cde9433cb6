"""The run's model: the one way every command that reads a run gets its model (the run's spec,
or ``--model`` / ``--backend`` / ``--device`` overrides, or a model the caller holds), checked to be
the model the run was found on (shape first, then the weights fingerprint)."""

from __future__ import annotations

from dataclasses import dataclass

from kcs_lens.discovery.rundir import RunInfo
from kcs_lens.model.lens import LensModel
from kcs_lens.model.loading import load_model


@dataclass(frozen=True)
class ModelOverrides:
    """What a command may change about the run's model (None keeps the run's): a spec with the same
    weights (another copy, a local directory), the backend, the torch device."""

    model: str | None = None
    backend: str | None = None
    device: str | None = None


def load_run_model(run: RunInfo, overrides: ModelOverrides | None = None, *, lens_model: LensModel | None = None) -> LensModel:
    """``lens_model`` if given, else the run's model with ``overrides``; refused (SubnetworkError)
    unless it is the run's model."""
    o = overrides or ModelOverrides()
    c = run.config
    lm = lens_model or load_model(o.model or c.model, backend=o.backend or c.backend, device=o.device or c.device)
    check_run_model(run, lm)
    return lm


def check_run_model(run: RunInfo, lm: LensModel) -> None:
    """The model must be the run's: same shape (checked first) and the same weights."""
    run.subnetwork.check_model(lm, strict_fingerprint=False)
    lm.check_fingerprint(run.fingerprint, f"run {run.dir} was found on model {run.config.model!r}")
