"""The discovery progress bar: steps, ETA, the live loss terms and each evaluation (rich)."""

from __future__ import annotations

import sys
from typing import Any

# short labels of the loss terms on the progress bar
SHORT = {"suppression": "supp", "control_kg": "ctrl_kg", "control_lm": "ctrl_lm", "sparsity": "density", "total": "total"}


class Progress:
    """A rich progress bar with live numbers (silent when disabled; messages then go to stderr)."""

    def __init__(self, total: int, start: int, enabled: bool, label: str = "discover"):
        self.p: Any = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self.p = RichProgress(
            TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")
        )
        self.p.start()
        self.task = self.p.add_task("steps", total=total, completed=start, info="")

    def update(self, step: int, losses: dict[str, float]) -> None:
        if self.p:
            info = " ".join(f"{SHORT.get(k, k)}={v:.3g}" for k, v in losses.items() if k != "lambda")
            self.p.update(self.task, completed=step, info=info)

    def note(self, rec: dict[str, Any]) -> None:
        if self.p:
            self.p.console.print(
                f"step {rec['step']}: sparsity {rec['sparsity']:.4f}  target PPL x{rec['target_ratio']:.2f}  "
                f"control x{rec['control_ratio']:.3f}  LM x{rec['lm_ratio']:.3f}"
                + (f"  target top-1 {rec['target_top1']:.2f}" if "target_top1" in rec else "")
                + (f"  target MC {rec['target_mc']:.2f}  control MC {rec['control_mc']:.2f}" if "target_mc" in rec else "")
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
