"""Typed settings of ``kcs-lens sweep run`` (:class:`SweepConfig`): how a study's cells are run
(executor, workers, devices, Ray cluster and resources, retries) and what happens to an existing
plan; every option with its help text and check (:mod:`kcs_lens.settings`), the command's flags
generated from them, and the settings of the last run saved as ``DIR/sweep-run.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from kcs_lens.errors import ConfigError
from kcs_lens.settings import int_at_least, opt, validate_fields


def parse_resources(text: str | None) -> dict[str, float]:
    """``'{"GPU": 1}'`` -> {"GPU": 1.0} (Ray resource names to amounts per cell)."""
    if not text:
        return {"CPU": 1.0}
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--resources {text!r}: not JSON ({e.msg}); e.g. '{{\"GPU\": 1}}'") from None
    if not isinstance(d, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for k, v in d.items()
    ):
        raise ConfigError(f"--resources {text!r}: expected a JSON object of resource names to amounts >= 0")
    return {k: float(v) for k, v in d.items()}


@dataclass
class SweepConfig:
    executor: Literal["local", "ray"] = opt("local", "local (worker processes on this machine) or ray (a Ray cluster)")
    workers: int | None = opt(None, "local: worker processes (default: one per --devices entry, else 1)", check=int_at_least(1))
    devices: list[str] = opt(
        None, "local: comma list of torch devices given to the workers round-robin, e.g. cuda:0,cuda:1", factory=list
    )
    ray_address: str | None = opt(None, "ray: the cluster to join (auto or HOST:PORT; default: start Ray on this machine)")
    resources: str | None = opt(
        None, 'ray: resources of one cell (one pack with --pack) as JSON, e.g. \'{"GPU": 1}\' (default: {"CPU": 1})'
    )
    max_retries: int = opt(
        1, "times a cell whose worker died is retried (it resumes from its last checkpoint)", check=int_at_least(0)
    )
    threads: int | None = opt(
        None,
        "torch CPU threads per cell (local: per worker, default: the cores shared out among the workers; "
        "ray: per task, default: Ray's); subnetworks are byte-identical across executors at the same number",
        check=int_at_least(1),
    )
    pack: int = opt(
        1,
        "cells of one model a worker (or Ray task) runs in one process, sharing the loaded model, data, the original "
        "model's evaluation and per-row caches; each cell keeps its run directory and gets the same masks as alone",
        check=int_at_least(1),
    )
    dry_run: bool = opt(False, "print the plan (cells, names, settings) and run nothing", flag="--dry-run")
    force: bool = opt(False, "replace a different plan in --out (changed cells start over)", flag="--force")
    add: bool = opt(False, "the study adds cells to the plan in --out: run only the new ones", flag="--add")

    def validate(self) -> "SweepConfig":
        """Every field checked (naming its option), then the relations; the devices are checked too."""
        validate_fields(self)
        self.devices = [d.strip() for d in self.devices if d.strip()]
        if self.force and self.add:
            raise ConfigError("pass --force (replace the plan) or --add (new cells only), not both")
        if self.resources is not None and self.executor != "ray":
            raise ConfigError("--resources is for --executor ray (the local executor takes --workers and --devices)")
        if self.executor == "ray" and (self.workers is not None or self.devices):
            raise ConfigError("--workers and --devices are for --executor local; with ray use --resources (Ray assigns devices)")
        parse_resources(self.resources)
        if self.devices:
            from kcs_lens.model.loading import check_device

            for d in self.devices:
                check_device(d, option="--devices")
        return self

    @property
    def resource_amounts(self) -> dict[str, float]:
        return parse_resources(self.resources)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
