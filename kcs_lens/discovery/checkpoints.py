"""Checkpoints and resume of a discovery run: ``state.pt`` (mask logits, Adam, scheduler, noise
state, the original model's scores) for an exact continuation, the mask checkpoints the selection
rule may still pick, and the fallbacks when a crash left them damaged (:class:`Checkpointing`, the
part of :class:`~kcs_lens.discovery.runner.Run` that touches them); Ctrl-C handling that keeps an
update whole (:func:`sigint_deferred`)."""

from __future__ import annotations

import contextlib
import io
import signal
import threading
import time
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from kcs_lens.discovery.config import DiscoveryConfig
from kcs_lens.discovery.rundir import RunDir, read_state_file
from kcs_lens.discovery.selection import meets_criteria, select_checkpoint
from kcs_lens.errors import KcsLensError, KcsLensWarning, RunError
from kcs_lens.files import atomic_write_bytes
from kcs_lens.masks.mask import WeightMask
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.lens import LensModel
from kcs_lens.progress import Progress


class ResumeWarning(KcsLensWarning):
    """A resume that cannot continue exactly (a damaged state.pt or checkpoint): the CLI prints it as
    one ``note:`` line on stderr."""


def warn(message: str) -> None:
    warnings.warn(message, ResumeWarning, stacklevel=3)


class Checkpointing:
    """Saving and resuming a run's training state (mixed into :class:`~kcs_lens.discovery.runner.Run`)."""

    cfg: DiscoveryConfig
    dir: RunDir
    lm: LensModel
    masks: WeightMask
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    step: int
    warm: int
    original: dict[str, float]
    t_start: float  # when this session started (time.perf_counter)
    wall_before: float  # wall seconds of earlier sessions of this run (resumed from state.pt)
    log: Callable[[str], None]

    def _new_optimizer(self) -> None:
        self.opt = torch.optim.Adam(self.masks.parameters(), lr=self.cfg.lr)
        warm = self.warm  # a plain function: LambdaLR does not save it in state.pt
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))

    def wall_s(self) -> float:
        """Wall seconds of the run so far: this session (model and data loading included) plus the
        earlier sessions a resumed run continues."""
        return self.wall_before + time.perf_counter() - self.t_start

    def is_checkpoint_step(self, step: int) -> bool:
        return step > 0 and (step % self.cfg.checkpoint_every == 0 or step == self.cfg.steps)

    def save_state(self, gen_state: Tensor | None = None) -> None:
        state = {
            "step": self.step,
            "logits": {n: p.detach().clone() for n, p in self.masks.items()},
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "generator": gen_state if gen_state is not None else self.masks.generator.get_state(),
            "original": self.original,
            "wall_s": self.wall_s(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.dir.state, buf.getvalue())

    def load_state(self) -> None:
        """Continue where the run stopped, whatever stopped it. Temporary files of an interrupted
        write are removed. ``state.pt`` (written before each mask checkpoint) gives an exact
        continuation; its mask checkpoint is rewritten if it is missing. Without a usable
        ``state.pt``: the newest intact mask checkpoint with a fresh optimizer state (a warning),
        else step 0. Metrics after the resumed step are dropped (those steps are redone)."""
        for p in self.dir.remove_temporary():
            self.log(f"removed {p} (left by an interrupted write)")
        state, problem = self._read_state()
        if state is not None:
            self._apply_state(state)
            if self.is_checkpoint_step(self.step) and not self.dir.checkpoint(self.step).exists():
                self.save_mask_checkpoint()  # the state was written; the process stopped before its mask checkpoint
        else:
            self._fall_back(problem)
        self.dir.truncate_metrics(self.step)

    def _read_state(self) -> tuple[dict[str, Any] | None, str | None]:
        """The saved state, or None and what is wrong with it (None: it was never written)."""
        path = self.dir.state
        if not path.exists():
            return None, None
        try:
            state = read_state_file(path, map_location=self.lm.device)
            logits = state["logits"]
            if set(logits) != set(self.masks.names) or any(logits[n].shape != p.shape for n, p in self.masks.items()):
                return None, f"{path} does not match this run's masks"
            for k in ("step", "opt", "sched", "generator", "original"):
                state[k]  # noqa: B018 (a KeyError marks a damaged file)
            return state, None
        except RunError:  # a file kcs-lens did not write (it could run code): refused, not skipped
            raise
        except Exception as e:  # truncated, corrupted or foreign file
            first = str(e).splitlines()[0][:200] if str(e) else ""
            return None, f"{path} is damaged ({type(e).__name__}: {first})"

    def _apply_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for n, p in self.masks.items():
                p.copy_(state["logits"][n])
        try:
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            self.masks.generator.set_state(state["generator"])
        except Exception as e:
            raise RunError(f"{self.dir.state}: the optimizer state does not fit this run ({type(e).__name__}: {e})") from None
        self.step, self.original = state["step"], state["original"]
        self.wall_before = float(state.get("wall_s", 0.0))  # absent in runs saved by older versions

    def _fall_back(self, problem: str | None) -> None:
        """No usable state.pt: the newest intact mask checkpoint, else step 0."""
        for step in sorted(self.dir.checkpoint_steps(), reverse=True):
            path = self.dir.checkpoint(step)
            try:
                logits = Subnetwork.load(path).logits
                if set(logits) != set(self.masks.names) or any(logits[n].shape != p.shape for n, p in self.masks.items()):
                    raise RunError(f"{path} does not match this run's masks")
            except KcsLensError as e:
                warn(f"skipping damaged checkpoint {path} ({e})")
                continue
            with torch.no_grad():
                for n, p in self.masks.items():
                    p.copy_(logits[n].to(p.device, p.dtype))
            self._new_optimizer()
            self.sched.last_epoch = step
            for g in self.opt.param_groups:
                g["lr"] = self.cfg.lr * min(1.0, (step + 1) / self.warm)
            self.masks.generator.manual_seed(self.cfg.seed + 1_000_003 * step)
            self.step, self.original = step, {}
            why = problem or f"{self.dir.state} is missing"
            warn(
                f"{why}; resuming from the mask checkpoint at step {step} with a fresh optimizer and "
                "noise state (the result can differ from an uninterrupted run)"
            )
            return
        if problem:
            warn(f"{problem} and there is no intact mask checkpoint; starting again from step 0")
        else:
            self.log(f"{self.dir.path} never reached a checkpoint; starting from step 0")

    def save_mask_checkpoint(self) -> None:
        Subnetwork.from_mask(self.masks, self.lm, seed=self.cfg.seed, step=self.step).save(self.dir.checkpoint(self.step))

    def prune_checkpoints(self) -> None:
        """Keep only checkpoints the selection rule could still pick: the latest and the best
        qualifying one so far (a mask checkpoint of GPT-2 medium is ~0.75 GB)."""
        steps = self.dir.checkpoint_steps()
        keep = {max(steps)}
        ok = [r for r in self.dir.read_metrics() if r["step"] in steps and meets_criteria(r, self.cfg)]
        if ok:
            keep.add(select_checkpoint(ok, self.cfg)[0]["step"])
        for s in steps - keep:
            self.dir.checkpoint(s).unlink(missing_ok=True)


class StopAtOnce(KeyboardInterrupt):
    """A second Ctrl-C inside a held block: the in-memory state may be half-updated."""


@contextlib.contextmanager
def sigint_deferred(bar: Progress) -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt; a second
    Ctrl-C raises at once. Only in the main thread (elsewhere signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum, frame):  # noqa: ARG001
        if pending:
            raise StopAtOnce
        pending.append(signum)
        bar.message("Ctrl-C: stopping after this step (press again to stop at once)")

    old = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if pending:
        raise KeyboardInterrupt
