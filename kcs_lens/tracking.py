"""Experiment tracking: ``--log tensorboard`` / ``--log wandb`` stream each evaluation record of a
discovery run (the lines of ``metrics.jsonl``) and the run's config to TensorBoard
(``torch.utils.tensorboard``, event files in ``RUN/tensorboard``) or Weights & Biases (``wandb``,
files in ``RUN/wandb``; ``WANDB_MODE=offline`` works without a network).

Tracking is a run option, not a setting of the run: it is not in ``config.json``, changes no
result, and a run may be resumed with or without it. Both packages are optional (the ``track``
extra); :func:`check_tracking` turns a missing package or W&B login into one ``error:`` line
before the run starts. Metric names are the record's keys, nested ones joined by ``/``
(``target_ratio``, ``train/suppression``); the x axis is the training step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kcs_lens.errors import ConfigError

TRACKERS = ("tensorboard", "wandb")
INSTALL = "pip install 'kcs-lens[track]'"
TENSORBOARD_DIR, WANDB_DIR = "tensorboard", "wandb"
OFFLINE_MODES = ("offline", "dryrun", "disabled")


@dataclass(frozen=True)
class Tracking:
    """Where a run's records go: ``kinds`` (a subset of :data:`TRACKERS`); ``group`` and ``name``
    label the W&B run (a sweep: the study and the cell)."""

    kinds: tuple[str, ...] = ()
    group: str | None = None
    name: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return bool(self.kinds)


def parse_tracking(kinds: Sequence[str] | Tracking | None) -> Tracking:
    """``["tensorboard", "wandb"]`` (or comma lists) as a :class:`Tracking`; ConfigError on an unknown name."""
    if isinstance(kinds, Tracking):
        return kinds
    names: list[str] = []
    for k in kinds or ():
        for name in str(k).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in TRACKERS:
                raise ConfigError(f"--log {name!r}: expected one of {', '.join(TRACKERS)}")
            if name not in names:
                names.append(name)
    return Tracking(tuple(names))


def _wandb_key_present() -> bool:
    """Whether a W&B API key is configured (environment or ``wandb login``'s netrc entry), without network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return read_netrc_auth(host=host) is not None
    except Exception:  # another wandb version: the netrc file that `wandb login` writes
        import netrc
        from urllib.parse import urlparse

        try:
            path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
            return netrc.netrc(path).authenticators(urlparse(host).hostname or host) is not None
        except (OSError, netrc.NetrcParseError):
            return False


def check_tracking(tracking: Tracking) -> None:
    """One ConfigError line, before any work, when a tracker cannot run here."""
    if "tensorboard" in tracking.kinds:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError(f"--log tensorboard needs the tensorboard package: {INSTALL}") from None
    if "wandb" in tracking.kinds:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(f"--log wandb needs the wandb package: {INSTALL}") from None
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode not in OFFLINE_MODES and not _wandb_key_present():
            raise ConfigError(
                "--log wandb: not logged in to Weights & Biases (no WANDB_API_KEY, no `wandb login`); "
                "log in, or set WANDB_MODE=offline to write the run to RUN/wandb and `wandb sync` it later"
            )


def record_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of one metrics.jsonl record by name (``train/suppression``); the step left out."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if k == "step" and not prefix:
            continue
        if isinstance(v, dict):
            out.update(record_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


class Trackers:
    """The open trackers of one run: :meth:`log` each record, :meth:`close` at the end."""

    def __init__(self, tracking: Tracking, run_dir: Path, config: dict[str, Any], start_step: int = 0):
        self.writers: list[Any] = []
        self.wandb_run: Any = None
        run_dir = Path(run_dir)
        if "tensorboard" in tracking.kinds:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run redoes the steps after its checkpoint; TensorBoard drops the
            # events the interrupted run wrote for them, as metrics.jsonl drops its lines.
            w = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)
            w.add_text("config", "    " + json.dumps(config, indent=2, default=str).replace("\n", "\n    "), start_step)
            self.writers.append(w)
        if "wandb" in tracking.kinds:
            import wandb

            name = tracking.name or run_dir.name
            self.wandb_run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "kcs-lens"),
                group=tracking.group,
                name=name if not start_step else f"{name} (resumed at step {start_step})",
                job_type="discover",
                tags=list(tracking.tags) or None,
                dir=str(run_dir),
                config=config,
                reinit="create_new",
            )

    def log(self, record: dict[str, Any]) -> None:
        scalars, step = record_scalars(record), int(record["step"])
        for w in self.writers:
            for k, v in scalars.items():
                w.add_scalar(k, v, step)
            w.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
