"""A study file -> the plan: one validated discovery config and one readable run name per cell.

``study.toml``::

    [base]                     # any discover setting (the keys of ``discover --config``)
    steps = 400
    [grid]                     # every combination of these lists is a cell
    target_kg = ["building", "location"]
    seed = [84, 1318, 735]
    [[cells]]                  # optional explicit extra cells (base + these settings)
    target_kg = "fruit"
    ablation = "no-sparsity"

Every value is checked with the discover config's own checks (:func:`kcs_lens.discovery.config.check_setting`,
then :func:`kcs_lens.discovery.config.build_config` per cell) before anything runs; errors name the study
file and the key. The plan is ``DIR/sweep.json`` (:data:`PLAN_FILE`).
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kcs_lens.discovery.config import (
    FIELD_NAMES,
    DiscoveryConfig,
    build_config,
    check_setting,
    config_from_saved,
    field_default,
)
from kcs_lens.errors import ConfigError, KcsLensError, RunError
from kcs_lens.files import atomic_write_json, read_mapping

PLAN_FILE = "sweep.json"
PLAN_VERSION = 1
# Settings that say where a cell runs, not what it computes: not part of a cell's identity
# (``--devices`` assigns them per worker).
EXECUTION_KEYS = ("device",)
# Always in a cell's name, in this order (seed last); other settings only where cells differ in them.
NAME_KEYS = ("model", "target_kg")
_SAFE = re.compile(r"[^A-Za-z0-9._,+=-]+")


@dataclass
class Cell:
    """One discovery run of a study: its run name (a relative path under the study directory)
    and its full, validated config (``DiscoveryConfig.to_dict()``)."""

    name: str
    config: dict[str, Any]

    def discovery_config(self) -> DiscoveryConfig:
        return config_from_saved(self.config, f"cell {self.name}")

    def identity(self) -> str:
        return identity(self.config)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config}


def identity(config: dict[str, Any]) -> str:
    """What makes two configs the same cell: every setting except the execution ones, canonically."""
    return json.dumps({k: v for k, v in config.items() if k not in EXECUTION_KEYS}, sort_keys=True, default=str)


@dataclass
class Plan:
    study: str
    cells: list[Cell]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "study": self.study,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cells": [c.to_json() for c in self.cells],
        }

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise RunError(f"no cell named {name!r} in the plan")


# ------------------------------------------------------------------------------------------
# Reading the study file
# ------------------------------------------------------------------------------------------
def _settings(table: Any, where: str) -> dict[str, Any]:
    """A table of discover settings, each checked on its own (errors name ``where`` and the key)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of discover settings, got {type(table).__name__}")
    out = {}
    for k, v in table.items():
        key = str(k).replace("-", "_")
        if key not in FIELD_NAMES:
            raise ConfigError(f"{where} key {k!r}: not a discover setting; valid keys are {sorted(FIELD_NAMES)}")
        out[key] = check_setting(key, v, where=f"{where} {k} =")
    return out


def read_study(path: str | Path) -> tuple[dict[str, Any], dict[str, list[Any]], list[dict[str, Any]]]:
    """The [base] settings, the [grid] lists and the [[cells]] of a study file, every value checked."""
    p = Path(path)
    data = read_mapping(p, what="study", error=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"study {p}: the top level must be a table with [base], [grid] and [[cells]]")
    unknown = sorted(set(data) - {"base", "grid", "cells"})
    if unknown:
        raise ConfigError(
            f"study {p}: unknown tables {unknown}; a study has [base] (discover settings), [grid] (lists) and [[cells]]"
        )
    base = _settings(data.get("base", {}), f"{p}: [base]")
    raw_grid = data.get("grid", {})
    if not isinstance(raw_grid, dict):
        raise ConfigError(f"{p}: [grid] must be a table of lists")
    grid: dict[str, list[Any]] = {}
    for k, values in raw_grid.items():
        key = str(k).replace("-", "_")
        if key not in FIELD_NAMES:
            raise ConfigError(f"{p}: [grid] key {k!r}: not a discover setting; valid keys are {sorted(FIELD_NAMES)}")
        if not isinstance(values, list) or not values:
            example = json.dumps(field_default(key) if isinstance(values, list) else values, default=str)
            raise ConfigError(f"{p}: [grid] {k} = {values!r}: must be a non-empty list of values, e.g. {k} = [{example}]")
        grid[key] = [check_setting(key, v, where=f"{p}: [grid] {k}[{i}] =") for i, v in enumerate(values)]
    raw_cells = data.get("cells", [])
    if not isinstance(raw_cells, list) or not all(isinstance(c, dict) for c in raw_cells):
        raise ConfigError(f"{p}: cells must be an array of tables ([[cells]])")
    cells = []
    for i, c in enumerate(raw_cells):
        c = dict(c)
        name = c.pop("name", None)
        if name is not None and (not isinstance(name, str) or not _valid_name(name)):
            raise ConfigError(f"{p}: [[cells]] #{i + 1} name = {name!r}: must be a relative path of letters, digits and ._,+=-")
        cells.append({**_settings(c, f"{p}: [[cells]] #{i + 1}"), **({"name": name} if name else {})})
    return base, grid, cells


def _valid_name(name: str) -> bool:
    parts = name.split("/")
    return all(part and part not in (".", "..") and not _SAFE.search(part) for part in parts)


def _slug(value: Any) -> str:
    if isinstance(value, list):
        value = ",".join(map(str, value))
    s = str(value).lower() if isinstance(value, bool) else str(value)
    if "/" in s or s.endswith((".jsonl", ".json", ".csv", ".txt")):
        s = Path(s.rstrip("/")).stem or s
    return _SAFE.sub("-", s).strip("-") or "x"


def expand(path: str | Path, *, check_models: bool = True) -> Plan:
    """The plan of a study file: every grid combination, then every explicit cell, each built and
    validated like ``kcs-lens discover`` would, and named deterministically."""
    p = Path(path)
    base, grid, extra = read_study(p)
    settings: list[tuple[dict[str, Any], str | None, str]] = []
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        where = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "base"
        settings.append(({**base, **values}, None, where))
    for i, e in enumerate(extra):
        own = {k: v for k, v in e.items() if k != "name"}
        settings.append(({**base, **own}, e.get("name"), f"[[cells]] #{i + 1}"))
    configs: list[tuple[DiscoveryConfig, str | None]] = []
    for s, name, where in settings:
        try:
            configs.append((build_config(**s), name))
        except ConfigError as e:
            raise ConfigError(f"{p}: cell ({where}): {e}") from None
    if check_models:
        from kcs_lens.model.loading import check_spec

        for spec in dict.fromkeys(c.model for c, _ in configs):
            try:
                check_spec(spec)
            except KcsLensError as e:
                raise ConfigError(f"{p}: model = {spec!r}: {e}") from None
    varied = [k for k in dict.fromkeys([*keys, *(k for e in extra for k in e)]) if k not in (*NAME_KEYS, "seed", "name")]
    dicts = [c.to_dict() for c, _ in configs]
    varied = [k for k in varied if k not in EXECUTION_KEYS and len({json.dumps(d[k]) for d in dicts}) > 1]
    cells = [Cell(name or cell_name(d, varied), d) for d, (_, name) in zip(dicts, configs)]
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.identity() in seen:
            raise ConfigError(f"{p}: cells {seen[cell.identity()].name!r} and {cell.name!r} have the same settings")
        seen[cell.identity()] = cell
    return Plan(str(p), unique_names(cells))


def cell_name(config: dict[str, Any], varied: list[str]) -> str:
    """``model/target/key-value.../seedN``: readable, and a pure function of the config."""
    parts = [_slug(config[k]) for k in NAME_KEYS]
    parts += [f"{k.replace('_', '-')}-{_slug(config[k])}" for k in varied]
    return "/".join(parts + [f"seed{config['seed']}"])


def _short_hash(c: Cell) -> str:
    return hashlib.sha1(c.identity().encode()).hexdigest()[:6]


def unique_names(cells: list[Cell], taken: set[str] = frozenset()) -> list[Cell]:  # type: ignore[assignment]
    """Cells whose names collide (two files with the same stem...) get a short hash of their settings;
    no name is a folder of another (a run directory cannot hold another run)."""
    names = [c.name for c in cells] + sorted(taken)
    out = []
    for c in cells:
        clash = names.count(c.name) > 1 or any(n.startswith(c.name + "/") or c.name.startswith(n + "/") for n in names)
        out.append(Cell(f"{c.name}-{_short_hash(c)}" if clash else c.name, c.config))
    return out


# ------------------------------------------------------------------------------------------
# The plan on disk
# ------------------------------------------------------------------------------------------
def plan_path(study_dir: str | Path) -> Path:
    return Path(study_dir) / PLAN_FILE


def is_study(path: str | Path) -> bool:
    return plan_path(path).is_file()


def load_plan(study_dir: str | Path) -> Plan:
    f = plan_path(study_dir)
    if not f.is_file():
        raise RunError(f"{study_dir}: not a study directory ({PLAN_FILE} missing; kcs-lens sweep writes it)")
    try:
        raw = json.loads(f.read_text(encoding="utf-8-sig"))
        plan = Plan(raw["study"], [Cell(c["name"], c["config"]) for c in raw["cells"]])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise RunError(f"{f}: not a readable kcs-lens study plan ({type(e).__name__}: {e})") from None
    for c in plan.cells:  # a cell's name is a path under the study directory: nothing may escape it
        if not isinstance(c.name, str) or not _valid_name(c.name) or not isinstance(c.config, dict):
            raise RunError(
                f"{f}: cell {c.name!r}: not a valid cell (its name must be a relative path of letters, digits and "
                "._,+=- without '..'); was the file edited by hand?"
            )
    return plan


def reconcile(new: Plan, study_dir: str | Path, *, force: bool = False, add: bool = False) -> tuple[Plan, bool]:
    """The plan to run in ``study_dir`` given the study's plan ``new`` and the one already there
    (if any); True when it must be (re)written. A changed plan is refused unless ``force`` (replace
    it) or ``add`` (the old cells unchanged, new cells appended)."""
    if not is_study(study_dir):
        return new, True
    old = load_plan(study_dir)
    old_by_id = {c.identity(): c for c in old.cells}
    renamed = [old_by_id.get(c.identity(), c) for c in new.cells]  # a known cell keeps its name
    old_ids, new_ids = set(old_by_id), {c.identity() for c in renamed}
    if old_ids == new_ids:
        return Plan(new.study, [old_by_id[c.identity()] for c in renamed]), False
    added = [c for c in renamed if c.identity() not in old_ids]
    gone = [c for c in old.cells if c.identity() not in new_ids]
    if force:
        return Plan(new.study, unique_names(renamed)), True
    if add and not gone:
        fresh = unique_names(added, taken={c.name for c in old.cells})
        return Plan(new.study, old.cells + fresh), True
    what = f"{len(added)} new cell(s)" + (f", {len(gone)} removed or changed (e.g. {gone[0].name})" if gone else "")
    hint = "--add runs only the new cells" if not gone else "--add cannot remove or change cells"
    raise ConfigError(
        f"{plan_path(study_dir)}: the study's plan differs from this directory's ({what}); {hint}, --force replaces "
        "the plan (changed cells start over), or choose another --out"
    )


def write_plan(plan: Plan, study_dir: str | Path) -> Path:
    return atomic_write_json(plan_path(study_dir), plan.to_json())
