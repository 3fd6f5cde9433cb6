"""Run directories: their layout, reading a run, and the run's data split.

A run directory (written by ``kcs-lens discover``)::

    config.json              everything needed to rerun (config, model, data sizes, versions)
    metrics.jsonl            one line per evaluation (deterministic mask) with the training losses
    checkpoints/             step_XXXXXX.safetensors (mask logits) and state.pt (resume state)
    subnetwork.safetensors   the selected subnetwork
    summary.json             its evaluation against the original model
    evaluation.json, baseline.json   caches written by ``evaluate``, ``baseline`` and ``report``

:class:`RunDir` is the one owner of these names; :func:`load_run` reads a finished run
(:class:`RunInfo`); :func:`load_run_data` builds the run's TargetKG / ControlKG / ControlLM data
(:class:`RunData`) exactly as discovery used it, for every later command.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from jaxtyping import Int
from torch import Tensor

from kcs_lens.backends import LensModel
from kcs_lens.config import DiscoveryConfig, config_from_saved
from kcs_lens.data.triplets import TripletBatch, TripletSet, disjoint, split_control, tokenize_triplets
from kcs_lens.errors import ConfigError, RunError, SubnetworkError
from kcs_lens.files import atomic_write_bytes, atomic_write_json
from kcs_lens.subnetwork import Subnetwork


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

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}.safetensors"

    def checkpoint_steps(self) -> set[int]:
        return {int(p.stem.split("_")[1]) for p in self.checkpoints.glob("step_*.safetensors")}

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
        lines = self.metrics.read_text().splitlines()
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break  # the line being written when the process died
                raise RunError(f"{self.metrics}:{i + 1}: not valid JSON (the file is damaged)") from None
        return out

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

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


def load_run(path: str | os.PathLike[str], subnetwork: str | os.PathLike[str] | None = None) -> RunInfo:
    """Read a run directory (``config.json`` + ``subnetwork.safetensors``); ``subnetwork`` replaces
    the selected subnetwork by another file (a checkpoint, an overlap combination)."""
    rd = RunDir(path)
    raw = rd.read_config()
    cfg = rd.read_discovery_config()
    fp = raw["model_fingerprint"]
    sub_file = Path(subnetwork) if subnetwork else rd.subnetwork
    if not sub_file.exists():
        hint = "" if subnetwork else f"; the run has not finished (continue it: kcs-lens discover --resume {rd.path})"
        raise RunError(f"{rd.path}: incomplete run, {sub_file.name} is missing{hint}")
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
    """Run directories; a folder without config.json stands for the run directories inside it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not RunDir(p).config.exists():
            inner = sorted(q for q in p.iterdir() if RunDir(q).config.exists())
            if not inner:
                raise RunError(f"{p}: neither a run directory nor a folder of run directories")
            out += inner
        else:
            out.append(p)
    return out


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in ("kcs-lens", "torch", "transformer-lens", "transformers", "datasets"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


# ------------------------------------------------------------------------------------------
# The run's data
# ------------------------------------------------------------------------------------------
@dataclass
class RunData:
    """TargetKG, ControlKG (train / validation, disjoint from the TargetKG) and ControlLM blocks
    of a run, tokenized for its model."""

    target: TripletSet
    control: TripletSet
    control_val: TripletSet
    n_overlap_dropped: int
    target_batch: TripletBatch
    control_batch: TripletBatch
    control_val_batch: TripletBatch
    lm_train: Int[Tensor, "n_train block"]
    lm_heldout: Int[Tensor, "n_heldout block"]

    def sizes(self) -> dict[str, int]:
        return {
            "target": len(self.target),
            "control_train": len(self.control),
            "control_val": len(self.control_val),
            "control_overlap_dropped": self.n_overlap_dropped,
            "lm_train_blocks": int(self.lm_train.shape[0]),
            "lm_heldout_blocks": int(self.lm_heldout.shape[0]),
        }


def load_run_data(cfg: DiscoveryConfig, lm: LensModel, log: Callable[[str], None] = print, *, text: bool = True) -> RunData:
    """The data of a run with config ``cfg`` on ``lm`` (TargetKG, ControlKG split, ControlLM;
    ``text=False``: no ControlLM blocks, for analyses of the KG prompts only)."""
    from kcs_lens.data.loaders import load_kg
    from kcs_lens.data.text import load_text_blocks

    kw: dict[str, Any] = dict(model_name=lm.spec, templates=cfg.templates)
    target = load_kg(cfg.target_kg, **kw)
    control = load_kg(cfg.control_kg, **kw)
    val_spec = cfg.control_val_source
    if val_spec:
        control_val = load_kg(val_spec, **kw)
    else:
        control, control_val = split_control(control, cfg.control_val_size)
    control, n1 = disjoint(target, control)
    control_val, n2 = disjoint(target, control_val)
    if n1 + n2:
        log(f"dropped {n1 + n2} ControlKG triplets that are also in the TargetKG (they must be disjoint)")
    for name, ts in (("ControlKG", control), ("ControlKG validation", control_val)):
        if len(ts) == 0:
            raise RunError(f"{name} {cfg.control_kg!r} is empty after removing the TargetKG overlap")

    def tok(ts: TripletSet, name: str) -> TripletBatch:
        return tokenize_triplets(
            ts, lm.tokenizer, prepend_bos=cfg.prepend_bos, tail_scoring=cfg.tail_scoring, d_vocab=lm.shape.d_vocab, source=name
        ).to(lm.device)

    block = min(cfg.lm_block_len, lm.shape.n_ctx)
    if text:
        lm_train = load_text_blocks(cfg.lm_source, lm.tokenizer, block_len=block, split="train").to(lm.device)
        lm_heldout = load_text_blocks(
            cfg.lm_source, lm.tokenizer, block_len=block, split="heldout", max_blocks=cfg.lm_eval_blocks
        )
        lm_heldout = lm_heldout.to(lm.device)
        if int(max(lm_train.max(), lm_heldout.max())) >= lm.shape.d_vocab:
            raise RunError(f"ControlLM text {cfg.lm_source!r} tokenizes to ids outside the model's vocabulary")
    else:
        lm_train = lm_heldout = torch.zeros((0, block), dtype=torch.long, device=lm.device)
    return RunData(
        target,
        control,
        control_val,
        n1 + n2,
        tok(target, cfg.target_kg),
        tok(control, cfg.control_kg),
        tok(control_val, val_spec or cfg.control_kg),
        lm_train,
        lm_heldout,
    )
