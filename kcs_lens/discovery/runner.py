"""The discovery run: data -> masked model -> training loop -> checkpoints -> selected subnetwork.

Read top to bottom: :func:`discover` opens and locks a run directory (:mod:`kcs_lens.discovery.rundir` owns its
layout), :class:`Run` loads the model and the run's data, then :meth:`Run.train` is the whole loop
(Adam on mask logits, warm-up, periodic evaluation (:mod:`kcs_lens.discovery.run_metrics`) and
checkpoints, resumable from any crash: :mod:`kcs_lens.discovery.checkpoints`), and
:meth:`Run.finish` selects a checkpoint (:mod:`kcs_lens.discovery.selection`) and writes
``subnetwork.safetensors`` and ``summary.json``. The loss is :mod:`kcs_lens.objective.reference`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from kcs_lens.data.triplets import TripletBatch
from kcs_lens.discovery.checkpoints import Checkpointing, StopAtOnce, sigint_deferred
from kcs_lens.discovery.config import DiscoveryConfig, build_config
from kcs_lens.discovery.run_data import RunData, load_run_data
from kcs_lens.discovery.run_metrics import RATIO_SETS, REMAINING_KEYS, evaluate_split, with_ratios
from kcs_lens.discovery.rundir import RunDir, abandon_run_dir, open_run_dir, package_versions
from kcs_lens.discovery.selection import select_checkpoint, selection_rule
from kcs_lens.discovery.shared import SharedInputs
from kcs_lens.errors import ConfigError, NonFiniteLoss, OutputError, RunError
from kcs_lens.evaluation.choice import run_choice_sets
from kcs_lens.masks.mask import WeightMask
from kcs_lens.masks.mask_config import MaskConfig, resolve_layers
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.canonical import MATRICES
from kcs_lens.model.lens import LensModel
from kcs_lens.model.loading import load_model
from kcs_lens.objective.distractors import DistractorPools
from kcs_lens.objective.fast import FastObjective
from kcs_lens.objective.reference import Objective, ObjectiveOptions, ReferenceObjective
from kcs_lens.progress import Progress
from kcs_lens.tracking import Trackers, Tracking, check_tracking, parse_tracking


def cycling_indices(n: int, batch: int, step: int, seed: int) -> Tensor:
    """Indices of the ``step``-th batch when cycling through a fixed permutation of n items.

    A pure function of the step, so a resumed run sees exactly the batches it would have seen.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    batch = min(batch, n)
    start = (step * batch) % n
    idx = torch.arange(start, start + batch) % n
    return perm[idx]


def make_objective(cfg: DiscoveryConfig, lm: LensModel, masks: WeightMask, data: RunData | None = None) -> Objective:
    """The loss of method.md: the fast implementation (default) or the straightforward reference.
    ``data`` gives the distractor term its pools (needed when its weight is positive)."""
    pools = None
    if cfg.loss_config().target_terms().get("distractor"):
        if data is None:
            raise ValueError("make_objective: the distractor term needs the run's data")
        pools = DistractorPools.build(
            data.target.triplets,
            data.target_batch,
            data.control.triplets,
            lm.tokenizer,
            k=cfg.distractor_k,
            seed=cfg.seed + 4,
        )
    options = ObjectiveOptions(share_sample=cfg.share_sample, distractors=pools)
    if cfg.objective == "reference":
        return ReferenceObjective(lm, masks, cfg.loss_config(), options)
    autocast = None if cfg.autocast == "none" else cfg.autocast
    return FastObjective(lm, masks, cfg.loss_config(), options, lm_cache_mb=cfg.lm_cache_mb, autocast=autocast)


def model_matrices(requested: list[str], lm: LensModel) -> tuple[str, ...]:
    """The requested matrices the model has: the default list (every matrix) drops W_gate for
    models without a gated MLP; asking for W_gate by name there is a ConfigError."""
    have = lm.shape.matrices
    if "W_gate" in requested and "W_gate" not in have and list(requested) != list(MATRICES):
        raise ConfigError(f"--matrices W_gate: {lm.spec!r} has no gated MLP (its matrices: {','.join(have)})")
    return tuple(m for m in requested if m in have)


class Run(Checkpointing):
    """One discovery run bound to a run directory (checkpoints and resume: :class:`Checkpointing`)."""

    def __init__(
        self,
        cfg: DiscoveryConfig,
        out: Path,
        lm: LensModel | None = None,
        log: Callable[[str], None] = print,
        shared: SharedInputs | None = None,
    ):
        self.cfg, self.dir, self.log, self.shared = cfg, RunDir(out), log, shared
        if shared is not None:
            lm = shared.lm if lm is None else lm
            shared.check_model(lm)
        t0 = self.t_start = time.perf_counter()
        self.wall_before = 0.0  # wall seconds of earlier sessions of this run (resumed from state.pt)
        self.lm = lm if lm is not None else load_model(cfg.model, backend=cfg.backend, device=cfg.device)
        self.data = shared.run_data(cfg, self.lm, log) if shared is not None else load_run_data(cfg, self.lm, log)
        self.choices = run_choice_sets(cfg, self.data, self.lm)
        self.load_s = time.perf_counter() - t0
        layers = resolve_layers(cfg.layers, self.lm.shape.n_layers)
        mc = MaskConfig(layers, model_matrices(cfg.matrices, self.lm), cfg.granularity, cfg.init_prob, cfg.tau)  # type: ignore[arg-type]
        self.masks = WeightMask(self.lm.shape, mc, seed=cfg.seed, device=self.lm.device)
        self.objective = make_objective(cfg, self.lm, self.masks, self.data)
        if shared is not None:
            shared.objective_caches(self.objective, self.data.target_batch, self.data.control_batch)
        self.warm = max(1, int(cfg.warmup_frac * cfg.steps))
        self._new_optimizer()
        self.step = 0
        self.original: dict[str, float] = {}
        self.trackers: Trackers | None = None  # --log: each metrics.jsonl record also goes there

    # --- files (layout: kcs_lens.discovery.rundir.RunDir) -----------------------------------------------
    def write_config(self) -> None:
        self.dir.write_json(
            RunDir.CONFIG,
            {
                "config": self.cfg.to_dict(),
                "model": self.lm.describe(),
                "model_fingerprint": self.lm.fingerprint(),
                "mask": self.masks.config.to_dict(),
                # the fast objective's switches as they act on this model (shortcuts that cannot hold are off)
                **({"fast_objective": self.objective.effective_switches()} if isinstance(self.objective, FastObjective) else {}),
                "data": {**self.data.sizes(), **(self.objective.distractors.sizes() if self.objective.distractors else {})},
                **({"multiple_choice": self.choice_info()} if self.choices else {}),
                "selection": selection_rule(self.cfg),
                "versions": package_versions(),
            },
        )

    # --- evaluation ------------------------------------------------------------------------
    def choice_info(self) -> dict[str, Any]:
        """How the multiple choice was drawn, per set (choices, chance, triplets with fewer choices)."""
        return {"distractors": self.cfg.distractors, **{k: c.describe() for k, c in self.choices.items()}}

    def evaluate(self) -> dict[str, Any]:
        with self.masks.using("eval", "remaining"):
            rem = evaluate_split(self.lm, self.data, self.choices)
        sub = Subnetwork.from_mask(self.masks)
        return {"step": self.step, "sparsity": sub.sparsity, **with_ratios(rem, self.original)}

    # --- training --------------------------------------------------------------------------
    def batches(self, step: int) -> tuple[TripletBatch, TripletBatch, Tensor]:
        cfg, d = self.cfg, self.data
        t = d.target_batch
        if len(t) > cfg.target_batch:
            t = t.select(cycling_indices(len(t), cfg.target_batch, step, cfg.seed + 1))
        c = d.control_batch.select(cycling_indices(len(d.control_batch), cfg.control_batch, step, cfg.seed + 2))
        lm = d.lm_train[cycling_indices(d.lm_train.shape[0], cfg.lm_batch, step, cfg.seed + 3)]
        return t, c, lm

    def train(self, stop_after: int | None = None, progress: bool = True) -> bool:
        """Run steps until ``cfg.steps`` (or ``stop_after`` more steps). True when training is complete."""
        cfg = self.cfg
        last = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        running: dict[str, list[float]] = {}
        bar = Progress(cfg.steps, self.step, enabled=progress)
        gen_state = self.masks.generator.get_state()  # the noise state matching self.step
        try:
            if not self.original:
                with self.masks.using("off"):
                    self.original = evaluate_split(self.lm, self.data, self.choices, self.shared)
            self.objective.prepare(self.data.target_batch, self.data.control_batch)  # per-run caches, once
            while self.step < last:
                t, c, lmb = self.batches(self.step)
                self.opt.zero_grad(set_to_none=True)
                losses = self.objective.step(t, c, lmb, self.step, cfg.steps)  # Ctrl-C here: nothing applied yet
                if not all(math.isfinite(v) for v in losses.values()):
                    self.opt.zero_grad(set_to_none=True)
                    raise NonFiniteLoss(
                        f"non-finite loss at step {self.step}: {losses}. Stopped; the last good checkpoint is kept "
                        f"in {self.dir.checkpoints} (resume or lower --lr)."
                    )
                with sigint_deferred(bar):  # the update and its bookkeeping happen whole or not at all
                    self.opt.step()
                    self.sched.step()
                    self.step += 1
                    gen_state = self.masks.generator.get_state()
                    for k, v in losses.items():
                        running.setdefault(k, []).append(v)
                    bar.update(self.step, losses)
                    if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                        rec = self.evaluate()
                        rec["train"] = {k: sum(v) / len(v) for k, v in running.items()}
                        rec["lr"] = self.sched.get_last_lr()[0]
                        running = {}
                        self.dir.append_metrics(rec)
                        if self.trackers is not None:
                            self.trackers.log(rec)
                        bar.note(rec)
                    if self.is_checkpoint_step(self.step):
                        self.save_state()  # first: a state without its mask checkpoint is resumable exactly
                        self.save_mask_checkpoint()
                        if not cfg.keep_all_checkpoints:
                            self.prune_checkpoints()
            if self.step < cfg.steps:  # stopped by stop_after: resumable from exactly here
                self.save_state(gen_state)
        except StopAtOnce:
            bar.close()
            raise RunError(
                f"stopped at once inside step {self.step}'s update; its state was not saved. Resume with: "
                f"kcs-lens discover --resume {self.dir.path} (continues from the last saved state)"
            ) from None
        except KeyboardInterrupt:
            bar.close()
            self.save_state(gen_state)  # between steps: logits, Adam and noise state agree
            raise RunError(f"interrupted at step {self.step}; resume with: kcs-lens discover --resume {self.dir.path}") from None
        finally:
            bar.close()
        return self.step >= cfg.steps

    # --- result ----------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        ckpts = self.dir.checkpoint_steps()
        chosen, meets = select_checkpoint([r for r in self.dir.read_metrics() if r["step"] in ckpts], self.cfg)
        sub = Subnetwork.load(self.dir.checkpoint(chosen["step"]))
        sub.meta.update(
            selected_by=selection_rule(self.cfg),
            meets_criteria=meets,
            target_kg=self.cfg.target_kg,
            granularity=self.cfg.granularity,
        )
        sub.save(self.dir.subnetwork)
        summary = {
            "model": self.lm.spec,
            "target_kg": self.cfg.target_kg,
            "seed": self.cfg.seed,
            "selected_step": chosen["step"],
            "meets_criteria": meets,
            "selection": selection_rule(self.cfg),
            "sparsity": sub.sparsity,
            "sparsity_all_linear": sub.sparsity_all_linear,
            "original": self.original,
            "remaining": {k: chosen[k] for k in REMAINING_KEYS if k in chosen},
            "delta": {f"{k}_dppl": chosen[f"{k}_dppl"] for k in RATIO_SETS if f"{k}_dppl" in chosen},
            "ratio": {f"{k}_ratio": chosen[f"{k}_ratio"] for k in RATIO_SETS if f"{k}_ratio" in chosen},
            "data": self.data.sizes(),
            **({"multiple_choice": self.choice_info()} if self.choices else {}),
            "torch_threads": torch.get_num_threads(),
            # the one field that differs between two otherwise byte-identical runs
            "wall_s": round(self.wall_s(), 1),
        }
        self.dir.write_json(RunDir.SUMMARY, summary)
        return summary


def _run(
    cfg: DiscoveryConfig,
    rd: RunDir,
    resume: bool,
    force: bool,
    lens_model: LensModel | None,
    stop_after: int | None,
    progress: bool,
    log: Callable[[str], None],
    tracking: Tracking = Tracking(),
    shared: SharedInputs | None = None,
) -> tuple[dict[str, Any] | None, Run]:
    """The run in a directory this process holds (:func:`discover` opened and locked it)."""
    torch.manual_seed(cfg.seed)
    run = Run(cfg, rd.path, lm=lens_model, log=log, shared=shared)
    if resume:
        run.lm.check_fingerprint(
            rd.read_config()["model_fingerprint"], f"--resume {rd.path}: the run was found on model {cfg.model!r}"
        )
        run.load_state()
    else:
        kept = rd.clear() if force else []
        if kept:
            log(f"note: --force kept {len(kept)} entries of {rd.path} that kcs-lens did not write: {[p.name for p in kept]}")
        run.write_config()
    if tracking:
        run.trackers = Trackers(tracking, rd.path, rd.read_config(), start_step=run.step)
    run.masks.attach(run.lm)
    try:
        done = run.train(stop_after=stop_after, progress=progress)
    finally:
        run.masks.detach()
        if run.trackers is not None:
            run.trackers.close()
    return (run.finish() if done else None), run


def discover(
    config: DiscoveryConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    lens_model: LensModel | None = None,
    stop_after: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    track: Sequence[str] | Tracking | None = None,
    shared: SharedInputs | None = None,
    **overrides: Any,
) -> dict[str, Any] | None:
    """Find a knowledge-critical subnetwork; returns the summary (None if stopped early).

    ``discover(target_kg="location", seed=1318, out="runs/loc")`` uses the defaults of
    :class:`~kcs_lens.discovery.config.DiscoveryConfig`; ``discover(resume="runs/loc")`` continues a run. ``lens_model`` reuses a model already loaded.
    ``track``: ``["tensorboard"]``, ``["wandb"]`` or both (:mod:`kcs_lens.tracking`), a run option
    like ``progress``: not part of the run's config, so a run may be resumed with or without it.
    ``shared`` (:class:`~kcs_lens.discovery.shared.SharedInputs`): data, the original model's
    evaluation and per-row caches shared with other runs of its model in this process (same masks).
    """
    tracking = parse_tracking(track)
    check_tracking(tracking)  # a missing package or W&B login: one error line before any work
    if resume is not None:
        rd, lock, created = open_run_dir(resume, resume=True, force=False)
        try:
            cfg = rd.read_discovery_config()
        except BaseException:
            lock.release()
            raise
    else:
        cfg = config or build_config(**overrides)
        if config is not None and overrides:
            raise ConfigError("pass either a DiscoveryConfig or keyword overrides, not both")
        out_dir = Path(out) if out else Path("runs") / f"{Path(str(cfg.target_kg)).stem}-seed{cfg.seed}"
        rd, lock, created = open_run_dir(out_dir, resume=False, force=force)
    try:
        try:
            summary, run = _run(cfg, rd, resume is not None, force, lens_model, stop_after, progress, log, tracking, shared)
        except (OSError, OutputError) as e:  # disk full, permissions, ...: the last complete checkpoint is kept
            msg = str(e) if isinstance(e, OutputError) else f"{e.filename or rd.path}: {e.strerror or e}"
            if rd.config.exists():
                msg += f"; the last complete checkpoint is kept (continue with: kcs-lens discover --resume {rd.path})"
            raise OutputError(msg) from None
    except BaseException:
        if resume is None:
            abandon_run_dir(rd, lock, created)  # removes the folder again only if nothing was written
        raise
    finally:
        lock.release()
    if summary is None:
        return None
    summary["run_dir"] = str(rd.path)
    summary["load_s"] = run.load_s
    return summary
