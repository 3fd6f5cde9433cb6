"""The one place reports are rendered: markdown tables, CSV text and matplotlib figures (PNG), used
by the paper-style report (:mod:`kcs_lens.evaluation.paper_table`), the study report
(:mod:`kcs_lens.sweep.study`), the downstream tables (:mod:`kcs_lens.downstream.experiment`) and
compare-circuits' heatmaps (:mod:`kcs_lens.analyses.figures`)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterable, Sequence


def md_row(cells: Iterable[Any]) -> str:
    """``| a | b |``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(head: Sequence[Any], rows: Iterable[Iterable[Any]] = ()) -> list[str]:
    """A markdown table's lines: the header, the rule, one line per row."""
    return [md_row(head), "|" + "---|" * len(head)] + [md_row(r) for r in rows]


def csv_text(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV with ``columns`` (a missing value is empty; keys not in ``columns`` are left out)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in columns})
    return buf.getvalue()


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()


def save_png(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write the figure as a PNG file (atomically); the figure is closed."""
    from kcs_lens.files import atomic_write_bytes

    return atomic_write_bytes(path, png_bytes(fig, dpi))
