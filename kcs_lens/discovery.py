"""The discovery run: data -> masked model -> training loop -> checkpoints -> selected subnetwork.

Read top to bottom: :func:`discover` prepares a run directory, :class:`Run` loads the model and
the three data sets, then :meth:`Run.train` is the whole loop (Adam on mask logits, warm-up,
periodic evaluation and checkpoints, resumable), and :meth:`Run.finish` selects a checkpoint by
the rule in method.md and writes ``subnetwork.safetensors`` and ``summary.json``.

Run directory::

    config.json          everything needed to rerun (config, model, data sizes, package versions)
    metrics.jsonl        one line per evaluation (deterministic mask) with the training losses
    checkpoints/         step_XXXXXX.safetensors (mask logits) and state.pt (resume state)
    subnetwork.safetensors, summary.json   the selected subnetwork and its evaluation
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from jaxtyping import Int
from torch import Tensor

from kcs_lens.config import ConfigError, DiscoveryConfig, build_config
from kcs_lens.data.triplets import TripletBatch, TripletSet, tokenize_triplets
from kcs_lens.fast_objective import FastObjective
from kcs_lens.masks import MaskConfig, WeightMask, resolve_layers
from kcs_lens.models import LensModel, load_model
from kcs_lens.objective import Objective
from kcs_lens.scoring import lm_nll, tail_scores
from kcs_lens.subnetwork import Subnetwork, atomic_write_bytes, atomic_write_json


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class NonFiniteLoss(RunError):
    pass


# ------------------------------------------------------------------------------------------
# Data for one run
# ------------------------------------------------------------------------------------------
@dataclass
class RunData:
    target: TripletSet
    control: TripletSet
    control_val: TripletSet
    n_overlap_dropped: int
    target_batch: TripletBatch
    control_batch: TripletBatch
    control_val_batch: TripletBatch
    lm_train: Int[Tensor, "n block"]
    lm_heldout: Int[Tensor, "n block"]

    def sizes(self) -> dict[str, int]:
        return {
            "target": len(self.target),
            "control_train": len(self.control),
            "control_val": len(self.control_val),
            "control_overlap_dropped": self.n_overlap_dropped,
            "lm_train_blocks": int(self.lm_train.shape[0]),
            "lm_heldout_blocks": int(self.lm_heldout.shape[0]),
        }


def load_run_data(cfg: DiscoveryConfig, lm: LensModel, log: Callable[[str], None] = print) -> RunData:
    from kcs_lens.data.loaders import disjoint, load_kg
    from kcs_lens.data.text import load_text_blocks

    kw = dict(model_name=lm.spec, templates=cfg.templates)
    target = load_kg(cfg.target_kg, **kw)
    control = load_kg(cfg.control_kg, **kw)
    if cfg.control_val_kg:
        control_val = load_kg(cfg.control_val_kg, **kw)
    else:
        control_val, control = control[: cfg.control_val_size], control[cfg.control_val_size :]
    control, n1 = disjoint(target, control)
    control_val, n2 = disjoint(target, control_val)
    if n1 + n2:
        log(f"dropped {n1 + n2} ControlKG triplets that are also in the TargetKG (they must be disjoint)")
    if len(control) == 0:
        raise RunError(f"ControlKG {cfg.control_kg!r} is empty after removing the TargetKG overlap")
    tok = lambda ts, name: tokenize_triplets(
        ts, lm.tokenizer, prepend_bos=cfg.prepend_bos, tail_scoring=cfg.tail_scoring, d_vocab=lm.shape.d_vocab, source=name
    ).to(lm.device)
    block = min(cfg.lm_block_len, lm.shape.n_ctx)
    lm_train = load_text_blocks(cfg.lm_source, lm.tokenizer, block_len=block, split="train").to(lm.device)
    lm_heldout = load_text_blocks(
        cfg.lm_source, lm.tokenizer, block_len=block, split="heldout", max_blocks=cfg.lm_eval_blocks
    ).to(lm.device)
    if int(max(lm_train.max(), lm_heldout.max())) >= lm.shape.d_vocab:
        raise RunError(f"ControlLM text {cfg.lm_source!r} tokenizes to ids outside the model's vocabulary")
    return RunData(
        target,
        control,
        control_val,
        n1 + n2,
        tok(target, cfg.target_kg),
        tok(control, cfg.control_kg),
        tok(control_val, cfg.control_val_kg or cfg.control_kg),
        lm_train,
        lm_heldout,
    )


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


# ------------------------------------------------------------------------------------------
# Evaluation with the deterministic mask
# ------------------------------------------------------------------------------------------
def evaluate_split(lm: LensModel, data: RunData) -> dict[str, float]:
    """Tail PPL on target and control validation, LM PPL on held-out text, for what ``lm`` is now."""
    t = tail_scores(lm, data.target_batch)
    c = tail_scores(lm, data.control_val_batch)
    return {
        "target_ppl": t.ppl,
        "control_ppl": c.ppl,
        "lm_ppl": math.exp(lm_nll(lm, data.lm_heldout)),
        "target_top1": t.topk(1),
        "control_top1": c.topk(1),
    }


def with_ratios(rem: dict[str, float], orig: dict[str, float]) -> dict[str, float]:
    out = dict(rem)
    for k in ("target", "control", "lm"):
        out[f"{k}_dppl"] = rem[f"{k}_ppl"] - orig[f"{k}_ppl"]
        out[f"{k}_ratio"] = rem[f"{k}_ppl"] / orig[f"{k}_ppl"]
    return out


def selection_rule(cfg: DiscoveryConfig) -> dict[str, Any]:
    return {
        "rule": "sparsest checkpoint with target PPL ratio >= min_target_ratio, control PPL ratio <= "
        "max_control_ratio and LM PPL ratio <= max_lm_ratio (remaining / original); otherwise the last "
        "checkpoint, flagged meets_criteria=false",
        "min_target_ratio": cfg.select_min_target_ratio,
        "max_control_ratio": cfg.select_max_control_ratio,
        "max_lm_ratio": cfg.select_max_lm_ratio,
    }


def meets_criteria(r: dict[str, Any], cfg: DiscoveryConfig) -> bool:
    return (
        r["target_ratio"] >= cfg.select_min_target_ratio
        and r["control_ratio"] <= cfg.select_max_control_ratio
        and r["lm_ratio"] <= cfg.select_max_lm_ratio
    )


def select_checkpoint(records: list[dict[str, Any]], cfg: DiscoveryConfig) -> tuple[dict[str, Any], bool]:
    """Pick among checkpointed evaluations by the rule of :func:`selection_rule`."""
    if not records:
        raise RunError("no checkpoint to select from")
    ok = [r for r in records if meets_criteria(r, cfg)]
    if ok:
        return max(ok, key=lambda r: (r["sparsity"], r["step"])), True
    return max(records, key=lambda r: r["step"]), False


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------
def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in ("kcs-lens", "torch", "transformer-lens", "transformers", "datasets"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def make_objective(cfg: DiscoveryConfig, lm: LensModel, masks: WeightMask) -> Objective | FastObjective:
    """The loss of method.md: the fast implementation (default) or the straightforward reference."""
    if cfg.objective == "reference":
        return Objective(lm, masks, cfg.loss_config())
    autocast = None if cfg.autocast == "none" else cfg.autocast
    return FastObjective(lm, masks, cfg.loss_config(), lm_cache_mb=cfg.lm_cache_mb, autocast=autocast)


class Run:
    """One discovery run bound to a run directory."""

    def __init__(self, cfg: DiscoveryConfig, out: Path, lm: LensModel | None = None, log: Callable[[str], None] = print):
        self.cfg, self.out, self.log = cfg, Path(out), log
        t0 = time.perf_counter()
        self.lm = lm if lm is not None else load_model(cfg.model, backend=cfg.backend, device=cfg.device)
        self.data = load_run_data(cfg, self.lm, log)
        self.load_s = time.perf_counter() - t0
        layers = resolve_layers(cfg.layers, self.lm.shape.n_layers)
        mc = MaskConfig(layers, tuple(cfg.matrices), cfg.granularity, cfg.init_prob, cfg.tau)
        self.masks = WeightMask(self.lm.shape, mc, seed=cfg.seed, device=self.lm.device)
        self.masks.hold_sample = cfg.share_sample
        self.objective = make_objective(cfg, self.lm, self.masks)
        self.opt = torch.optim.Adam(self.masks.parameters(), lr=cfg.lr)
        warm = max(1, int(cfg.warmup_frac * cfg.steps))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        self.step = 0
        self.original: dict[str, float] = {}

    # --- files -----------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def write_config(self) -> None:
        atomic_write_json(
            self.out / "config.json",
            {
                "config": self.cfg.to_dict(),
                "model": self.lm.describe(),
                "model_fingerprint": self.lm.fingerprint(),
                "mask": self.masks.config.to_dict(),
                "data": self.data.sizes(),
                "selection": selection_rule(self.cfg),
                "versions": package_versions(),
            },
        )

    def save_state(self, gen_state: Tensor | None = None) -> None:
        state = {
            "step": self.step,
            "logits": {n: p.detach().clone() for n, p in self.masks.items()},
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "generator": gen_state if gen_state is not None else self.masks.generator.get_state(),
            "original": self.original,
        }
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.ckpt_dir / "state.pt", buf.getvalue())

    def load_state(self) -> None:
        path = self.ckpt_dir / "state.pt"
        if not path.exists():
            raise RunError(f"{self.out}: cannot resume, {path} is missing (the run never reached a checkpoint)")
        state = torch.load(path, map_location=self.lm.device, weights_only=False)
        with torch.no_grad():
            for n, p in self.masks.items():
                p.copy_(state["logits"][n])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.masks.generator.set_state(state["generator"])
        self.step, self.original = state["step"], state["original"]
        # metrics written after the checkpoint belong to steps that will be redone
        m = self.out / "metrics.jsonl"
        if m.exists():
            keep = [l for l in m.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= self.step]
            atomic_write_bytes(m, ("\n".join(keep) + "\n" if keep else "").encode())

    def save_mask_checkpoint(self) -> None:
        Subnetwork.from_mask(self.masks, self.lm, seed=self.cfg.seed, step=self.step).save(
            self.ckpt_dir / f"step_{self.step:06d}.safetensors"
        )

    def checkpoint_steps(self) -> set[int]:
        return {int(p.stem.split("_")[1]) for p in self.ckpt_dir.glob("step_*.safetensors")}

    def read_metrics(self) -> list[dict[str, Any]]:
        m = self.out / "metrics.jsonl"
        return [json.loads(l) for l in m.read_text().splitlines() if l.strip()] if m.exists() else []

    def prune_checkpoints(self) -> None:
        """Keep only checkpoints the selection rule could still pick: the latest and the best
        qualifying one so far (a mask checkpoint of GPT-2 medium is ~0.75 GB)."""
        steps = self.checkpoint_steps()
        keep = {max(steps)}
        ok = [r for r in self.read_metrics() if r["step"] in steps and meets_criteria(r, self.cfg)]
        if ok:
            keep.add(select_checkpoint(ok, self.cfg)[0]["step"])
        for s in steps - keep:
            (self.ckpt_dir / f"step_{s:06d}.safetensors").unlink(missing_ok=True)

    # --- evaluation ------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        with self.masks.using("eval", "remaining"):
            rem = evaluate_split(self.lm, self.data)
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
        bar = _Progress(cfg.steps, self.step, enabled=progress)
        gen_state = self.masks.generator.get_state()  # the noise state matching self.step
        try:
            if not self.original:
                with self.masks.using("off"):
                    self.original = evaluate_split(self.lm, self.data)
            self.objective.prepare(self.data.target_batch, self.data.control_batch)  # per-run caches, once
            while self.step < last:
                t, c, lmb = self.batches(self.step)
                self.opt.zero_grad(set_to_none=True)
                losses = self.objective.step(t, c, lmb, self.step, cfg.steps)  # Ctrl-C here: nothing applied yet
                if not all(math.isfinite(v) for v in losses.values()):
                    self.opt.zero_grad(set_to_none=True)
                    raise NonFiniteLoss(
                        f"non-finite loss at step {self.step}: {losses}. Stopped; the last good checkpoint is kept "
                        f"in {self.ckpt_dir} (resume or lower --lr)."
                    )
                with _sigint_deferred(bar):  # the update and its bookkeeping happen whole or not at all
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
                        with open(self.out / "metrics.jsonl", "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        bar.note(rec)
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                        self.save_mask_checkpoint()
                        self.save_state()
                        if not cfg.keep_all_checkpoints:
                            self.prune_checkpoints()
            if self.step < cfg.steps:  # stopped by stop_after: resumable from exactly here
                self.save_state(gen_state)
        except _StopAtOnce:
            bar.close()
            raise RunError(
                f"stopped at once inside step {self.step}'s update; its state was not saved. Resume with: "
                f"kcs-lens discover --resume {self.out} (continues from the last saved state)"
            ) from None
        except KeyboardInterrupt:
            bar.close()
            self.save_state(gen_state)  # between steps: logits, Adam and noise state agree
            raise RunError(f"interrupted at step {self.step}; resume with: kcs-lens discover --resume {self.out}") from None
        finally:
            bar.close()
        return self.step >= cfg.steps

    # --- result ----------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        ckpts = self.checkpoint_steps()
        chosen, meets = select_checkpoint([r for r in self.read_metrics() if r["step"] in ckpts], self.cfg)
        sub = Subnetwork.load(self.ckpt_dir / f"step_{chosen['step']:06d}.safetensors")
        sub.meta.update(
            selected_by=selection_rule(self.cfg), meets_criteria=meets, target_kg=self.cfg.target_kg, granularity=self.cfg.granularity
        )
        sub.save(self.out / "subnetwork.safetensors")
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
            "remaining": {k: chosen[k] for k in ("target_ppl", "control_ppl", "lm_ppl", "target_top1", "control_top1")},
            "delta": {k: chosen[k] for k in ("target_dppl", "control_dppl", "lm_dppl")},
            "ratio": {k: chosen[k] for k in ("target_ratio", "control_ratio", "lm_ratio")},
            "data": self.data.sizes(),
        }
        atomic_write_json(self.out / "summary.json", summary)
        return summary


class _StopAtOnce(KeyboardInterrupt):
    """A second Ctrl-C inside a held block: the in-memory state may be half-updated."""


@contextlib.contextmanager
def _sigint_deferred(bar: "_Progress") -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt; a second
    Ctrl-C raises at once. Only in the main thread (elsewhere signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum, frame):  # noqa: ARG001
        if pending:
            raise _StopAtOnce
        pending.append(signum)
        bar.message("Ctrl-C: stopping after this step (press again to stop at once)")

    old = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if pending:
        raise KeyboardInterrupt


class _Progress:
    """A rich progress bar with the live loss terms and sparsity (silent when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.p = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(
            TextColumn("discover"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")
        )
        self.p.start()
        self.task = self.p.add_task("steps", total=total, completed=start, info="")

    def update(self, step: int, losses: dict[str, float]) -> None:
        if self.p:
            info = " ".join(f"{k[:4]}={v:.3g}" for k, v in losses.items() if k != "lambda")
            self.p.update(self.task, completed=step, info=info)

    def note(self, rec: dict[str, Any]) -> None:
        if self.p:
            self.p.console.print(
                f"step {rec['step']}: sparsity {rec['sparsity']:.4f}  target PPL x{rec['target_ratio']:.2f}  "
                f"control x{rec['control_ratio']:.3f}  LM x{rec['lm_ratio']:.3f}"
            )

    def message(self, text: str) -> None:
        if self.p:
            self.p.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.p:
            self.p.stop()
            self.p = None


def prepare_run_dir(out: Path, *, resume: bool, force: bool) -> None:
    if resume:
        if not (out / "config.json").exists():
            raise RunError(f"--resume {out}: not a run directory (config.json missing)")
        return
    if out.exists() and any(out.iterdir()):
        if not force:
            raise RunError(f"run directory {out} exists; pass --resume {out} to continue it or --force to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


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
    **overrides: Any,
) -> dict[str, Any] | None:
    """Find a knowledge-critical subnetwork; returns the summary (None if stopped early).

    ``discover(target_kg="location", seed=1318, out="runs/loc")`` uses the defaults of
    :class:`~kcs_lens.config.DiscoveryConfig`; ``discover(resume="runs/loc")`` continues a run. ``lens_model`` reuses a model already loaded.
    """
    if resume is not None:
        out_dir = Path(resume)
        prepare_run_dir(out_dir, resume=True, force=False)
        saved = json.loads((out_dir / "config.json").read_text())["config"]
        cfg = DiscoveryConfig(**saved).validate()
    else:
        cfg = config or build_config(**overrides)
        if config is not None and overrides:
            raise ConfigError("pass either a DiscoveryConfig or keyword overrides, not both")
        out_dir = Path(out) if out else Path("runs") / f"{Path(str(cfg.target_kg)).stem}-seed{cfg.seed}"
        prepare_run_dir(out_dir, resume=False, force=force)
    torch.manual_seed(cfg.seed)
    run = Run(cfg, out_dir, lm=lens_model, log=log)
    if resume is not None:
        run.load_state()
        if run.lm.fingerprint() != json.loads((out_dir / "config.json").read_text())["model_fingerprint"]:
            raise RunError(f"--resume {out_dir}: the model's weights differ from the run's (fingerprint mismatch)")
    else:
        run.write_config()
    run.masks.attach(run.lm)
    try:
        done = run.train(stop_after=stop_after, progress=progress)
    finally:
        run.masks.detach()
    if not done:
        return None
    summary = run.finish()
    summary["run_dir"] = str(out_dir)
    summary["load_s"] = run.load_s
    return summary
