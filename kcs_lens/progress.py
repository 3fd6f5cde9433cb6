"""The discovery progress bar: steps, ETA, the live loss terms and each evaluation (rich)."""

from __future__ import annotations

import sys
from typing import Any

# short labels of the loss terms on the progress bar
SHORT = {"suppression": "supp", "control_kg": "ctrl_kg", "control_lm": "ctrl_lm", "sparsity": "density", "total": "total"}


class Progress:
    """A rich progress bar with live numbers (silent when disabled; messages then go to stderr)."""

    def __init__(self, total: int, start: int, enabled: bool, label: str = "discover", console: Any = None):
        self.p: Any = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress
        from rich.table import Column

        # the live numbers wrap at spaces onto a second line in a narrow terminal, never cut mid-number
        info = TextColumn("{task.fields[info]}", table_column=Column(no_wrap=False, overflow="fold", ratio=1))
        self.p = RichProgress(
            TextColumn(label), BarColumn(bar_width=20), MofNCompleteColumn(), TimeRemainingColumn(), info, console=console
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


def terminal() -> Any:
    """A rich Console as wide as the terminal (``COLUMNS`` honoured; 80 when not a terminal):
    tables wrap their cells to fit instead of running past the right edge."""
    from rich.console import Console

    return Console()


def table(title: str, columns: list[str], *, left: int = 1) -> Any:
    """A compact rich Table for terminal output: a rule under the header and no vertical lines, so
    that tables of numbers fit an 80-column terminal; the first ``left`` columns are labels
    (left-aligned, wrapped at spaces), the others numbers (right-aligned, never cut)."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0, 0, 1), title_justify="left")
    for i, c in enumerate(columns):
        if i < left:
            t.add_column(c, justify="left", overflow="fold")
        else:
            t.add_column(c, justify="right", overflow="fold")
    return t
