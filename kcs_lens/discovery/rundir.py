"""Run directories: their layout, opening one for a writer, and reading a finished run.

A run directory (written by ``kcs-lens discover``)::

    config.json              everything needed to rerun (config, model, data sizes, versions)
    metrics.jsonl            one line per evaluation (deterministic mask) with the training losses
    checkpoints/             step_XXXXXX.safetensors (mask logits) and state.pt (resume state)
    subnetwork.safetensors   the selected subnetwork
    summary.json             its evaluation against the original model
    evaluation.json, baseline.json   caches written by ``evaluate``, ``baseline`` and ``report``
    tensorboard/, wandb/     with ``--log tensorboard`` / ``--log wandb`` (:mod:`kcs_lens.tracking`)
    .lock                    the writer's lock (:mod:`kcs_lens.discovery.runlock`), held while a run is live

:class:`RunDir` is the one owner of these names; :func:`load_run` reads a finished run
(:class:`RunInfo`); the run's data split is :mod:`kcs_lens.discovery.run_data`.
:func:`open_run_dir` is the one way a writer gets a run directory: checked, created and locked.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from kcs_lens.discovery.config import DiscoveryConfig, config_from_saved
from kcs_lens.discovery.runlock import RunLock, lock_holder
from kcs_lens.errors import ConfigError, KcsLensWarning, OutputError, RunError, SubnetworkError
from kcs_lens.files import atomic_write_bytes, atomic_write_json, check_output_dir, is_temporary
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.tracking import TENSORBOARD_DIR, WANDB_DIR


class RunDir:
    """The files of one run directory (nothing is read or created by constructing it)."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"
    STATE = "state.pt"
    SUBNETWORK = "subnetwork.safetensors"
    SUMMARY = "summary.json"
    EVALUATION = "evaluation.json"
    BASELINE = "baseline.json"
    LOCK = ".lock"
    TRACKING = (TENSORBOARD_DIR, WANDB_DIR)  # --log tensorboard / wandb (kcs_lens.tracking)

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def state(self) -> Path:
        return self.checkpoints / self.STATE

    @property
    def subnetwork(self) -> Path:
        return self.path / self.SUBNETWORK

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def evaluation(self) -> Path:
        return self.path / self.EVALUATION

    @property
    def baseline(self) -> Path:
        return self.path / self.BASELINE

    @property
    def lock_file(self) -> Path:
        return self.path / self.LOCK

    def lock(self) -> RunLock:
        """Take the writer's lock (RunError naming the pid of a live holder); release it with
        ``.release()`` or let the process end."""
        return RunLock(self.lock_file).acquire(self.path)

    def running_pid(self) -> int | None:
        """The pid of the live process writing this run (0: pid unknown), or None."""
        return lock_holder(self.lock_file)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}.safetensors"

    def checkpoint_steps(self) -> set[int]:
        return {int(p.stem.split("_")[1]) for p in self.checkpoints.glob("step_*.safetensors")}

    def own_entries(self) -> list[Path]:
        """What is in the directory apart from the lock file and temporary files."""
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if p.name != self.LOCK and not is_temporary(p))

    def remove_temporary(self) -> list[Path]:
        """Delete temporary files left by an interrupted atomic write (only while holding the lock)."""
        gone = []
        for d in (self.path, self.checkpoints):
            if d.is_dir():
                for p in d.iterdir():
                    if is_temporary(p) and p.is_file():
                        p.unlink(missing_ok=True)
                        gone.append(p)
        return gone

    def run_entries(self) -> list[Path]:
        """The entries kcs-lens writes into a run directory (what ``--force`` may delete)."""
        fixed: tuple[str, ...] = (self.CONFIG, self.METRICS, self.CHECKPOINTS, self.SUBNETWORK, self.SUMMARY, self.EVALUATION)
        fixed += (self.BASELINE, *self.TRACKING)
        out = [self.path / n for n in fixed if (self.path / n).exists()]
        out += [p for p in self.path.glob("compare-*") if (p / "comparison.json").exists()]
        return sorted(out)

    def clear(self) -> list[Path]:
        """Delete the run's own files (a ``--force`` rerun); returns the entries kept because
        kcs-lens did not write them."""
        for p in self.run_entries():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        self.remove_temporary()
        return self.own_entries()

    def is_run(self) -> bool:
        """Whether this is a kcs-lens run directory (its config.json has the run's keys)."""
        try:
            raw = json.loads(self.config.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(raw, dict) and "config" in raw and "model_fingerprint" in raw

    def read_config(self) -> dict[str, Any]:
        """The raw config.json, or a RunError naming the file."""
        if not self.path.is_dir():
            raise RunError(f"{self.path}: no such run directory")
        if not self.config.exists():
            raise RunError(f"{self.path}: not a run directory ({self.CONFIG} missing)")
        try:
            raw = json.loads(self.config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"{self.config}: not a readable kcs-lens run config ({e})") from None
        if not isinstance(raw, dict) or "config" not in raw or "model_fingerprint" not in raw:
            raise RunError(f"{self.config}: not a kcs-lens run config (keys 'config' and 'model_fingerprint' missing)")
        return raw

    def read_discovery_config(self) -> DiscoveryConfig:
        try:
            return config_from_saved(self.read_config()["config"], str(self.config))
        except ConfigError as e:
            raise RunError(str(e)) from None

    def read_metrics(self) -> list[dict[str, Any]]:
        """The evaluation records; a partial last line (a crash mid-write) is dropped."""
        if not self.metrics.exists():
            return []
        try:
            lines = self.metrics.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise RunError(f"{self.metrics}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                    raise ValueError
                out.append(rec)
            except ValueError:
                if i == len(lines) - 1:
                    break  # the line being written when the process died
                raise RunError(f"{self.metrics}:{i + 1}: not valid JSON (the file is damaged)") from None
        return out

    def append_metrics(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        try:
            with open(self.metrics, "a") as f:
                f.write(line)
        except OSError as e:  # a partial last line is dropped by read_metrics
            raise OutputError(f"cannot write {self.metrics}: {e.strerror or e}") from None

    def truncate_metrics(self, last_step: int) -> None:
        """Keep the records up to ``last_step`` (those after a checkpoint will be redone)."""
        keep = [json.dumps(r) for r in self.read_metrics() if r["step"] <= last_step]
        atomic_write_bytes(self.metrics, ("\n".join(keep) + "\n" if keep else "").encode())

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path / name, obj)


@dataclass
class RunInfo:
    """A finished run directory: its config, model fingerprint and subnetwork."""

    dir: Path
    config: DiscoveryConfig
    fingerprint: str
    subnetwork: Subnetwork
    summary: dict[str, Any] | None
    raw_config: dict[str, Any]

    @property
    def files(self) -> RunDir:
        return RunDir(self.dir)

    def header(self) -> dict[str, Any]:
        """What every result computed from this run starts with (run, model, TargetKG, seed, subnetwork)."""
        c = self.config
        return {
            "run": str(self.dir),
            "model": c.model,
            "model_fingerprint": self.fingerprint,
            "target_kg": c.target_kg,
            "seed": c.seed,
            "ablation": c.ablation,
            "combination": self.raw_config.get("combination"),
            "subnetwork_sha": self.subnetwork.membership_sha(),
            "selected_step": (self.summary or {}).get("selected_step"),
            "meets_criteria": (self.summary or {}).get("meets_criteria"),
        }


def load_run(path: str | os.PathLike[str], subnetwork: str | os.PathLike[str] | None = None) -> RunInfo:
    """Read a run directory (``config.json`` + ``subnetwork.safetensors``); ``subnetwork`` replaces
    the selected subnetwork by another file (a checkpoint, an overlap combination)."""
    rd = RunDir(path)
    raw = rd.read_config()
    cfg = rd.read_discovery_config()
    fp = raw["model_fingerprint"]
    sub_file = Path(subnetwork) if subnetwork else rd.subnetwork
    pid = rd.running_pid()
    if not sub_file.exists():
        if pid is not None:
            raise RunError(f"{rd.path}: still running ({_pid_text(pid)}); its {sub_file.name} is written when it finishes")
        hint = "" if subnetwork else f"; the run has not finished (continue it: kcs-lens discover --resume {rd.path})"
        raise RunError(f"{rd.path}: incomplete run, {sub_file.name} is missing{hint}")
    if pid is not None:
        warnings.warn(f"{rd.path} is still running ({_pid_text(pid)}); using {sub_file} as it is now", StillRunning, stacklevel=2)
    sub = Subnetwork.load(sub_file)
    sfp = sub.meta.get("model_fingerprint")
    if sfp and sfp != fp:
        raise SubnetworkError(f"{sub_file}: found on a model with fingerprint {sfp}, but run {rd.path} used {fp}")
    summary = None
    if rd.summary.exists():
        try:
            summary = json.loads(rd.summary.read_text())
        except (OSError, ValueError) as e:
            raise RunError(f"{rd.summary}: not readable JSON ({e})") from None
    return RunInfo(rd.path, cfg, fp, sub, summary, raw)


def expand_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run directories; a folder without config.json stands for the run directories inside it
    (those still running without a subnetwork yet are skipped with a warning)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not RunDir(p).config.exists():
            inner = sorted(q for q in p.iterdir() if RunDir(q).config.exists())
            if not inner:
                raise RunError(f"{p}: neither a run directory nor a folder of run directories")
            for q in inner:
                pid = RunDir(q).running_pid()
                if pid is not None and not RunDir(q).subnetwork.exists():
                    warnings.warn(f"skipping {q}: still running ({_pid_text(pid)})", StillRunning, stacklevel=2)
                else:
                    out.append(q)
        else:
            out.append(p)
    return out


def read_state_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """A run's ``checkpoints/state.pt`` loaded with ``torch.load(weights_only=True)``: tensors,
    numbers, strings, lists and dicts only (what :meth:`Run.save_state` writes). A file that needs
    any other Python object is refused without unpickling it (a RunError): a state.pt planted in a
    run directory on shared storage must not run code. Other problems (a truncated file) raise
    as torch raises them."""
    import pickle

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise
        raise RunError(
            f"{path}: refused to load: it holds Python objects other than tensors, numbers, strings and lists "
            "(loading it could run code; kcs-lens never writes such a file). Remove it to resume from the "
            "last mask checkpoint instead"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"expected a dict, got {type(state).__name__}")
    return state


class StillRunning(KcsLensWarning):
    """A reader was given a run directory whose writer is still running."""


def _pid_text(pid: int) -> str:
    return f"pid {pid}" if pid else "pid unknown"


def open_run_dir(path: str | os.PathLike[str], *, resume: bool, force: bool) -> tuple[RunDir, RunLock, bool]:
    """Check, create and lock a run directory for writing; returns it, the held lock and whether
    this call created the folder. Refused (nothing changed): a ``--resume`` target that is not a
    run, a folder with other content that is not a run directory (even with ``force``: only a
    run directory is ever replaced), an existing run without ``force``, a run another process is
    writing. ``force`` deletes nothing here: the caller clears the old run (:meth:`RunDir.clear`)
    once the new one is ready to write."""
    rd = RunDir(path)
    p = rd.path
    if resume:
        if not p.is_dir():
            raise RunError(f"--resume {p}: no such run directory")
        if not rd.config.exists():
            raise RunError(f"--resume {p}: not a run directory ({rd.CONFIG} missing)")
        return rd, rd.lock(), False
    check_output_dir(p, "--out")
    entries = rd.own_entries()
    if entries:
        if not rd.is_run():
            names = ", ".join(e.name for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputError(
                f"--out {p}: the folder holds other files ({names}) and is not a kcs-lens run directory; "
                "--force only replaces run directories, so choose a new --out"
            )
        pid = rd.running_pid()
        if pid is not None:
            raise RunError(f"run directory {p} is still running ({_pid_text(pid)}); wait for it or stop it")
        if not force:
            raise RunError(f"run directory {p} exists; pass --resume {p} to continue it or --force to overwrite it")
    created = not p.exists()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {p}: cannot create it ({e.strerror or e})") from None
    try:
        lock = rd.lock()
    except BaseException:
        if created:
            shutil.rmtree(p, ignore_errors=True)
        raise
    return rd, lock, created


def abandon_run_dir(rd: RunDir, lock: RunLock, created: bool) -> None:
    """After a failure before the run wrote anything: remove the folder again if this process
    created it (or only the lock file if the folder was there), so a rerun needs no ``--force``."""
    if rd.config.exists() or rd.own_entries():
        lock.release()
        return
    rd.remove_temporary()
    rd.lock_file.unlink(missing_ok=True)
    lock.release()
    if created:
        try:
            rd.path.rmdir()
        except OSError:
            pass


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in ("kcs-lens", "torch", "transformer-lens", "transformers", "datasets"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out
