"""The run page (``kcs-lens report RUN... --html``): one self-contained HTML file per run, or per
group of runs that differ only in their seed, with

- the summary table (the paper table's rows, :mod:`kcs_lens.evaluation.paper_table`, random
  baseline beside) and every number of each run's ``summary.json``;
- training curves over steps of every number in ``metrics.jsonl`` (loss terms, sparsity, PPL
  ratios, top-1, ranks, and whatever later versions add), seeds overlaid, with each seed's
  selected step and the selection thresholds drawn;
- the per-fact table (``evaluation.json``'s ``facts``: head, relation, tail, the answer and the
  tail's rank, original -> remaining), sortable and filterable with a few lines of inline
  JavaScript;
- density per layer and matrix, and the runs' configs.

The HTML (SVG charts, sections, inline CSS and JavaScript) is :mod:`kcs_lens.evaluation.run_page_html`;
nothing is loaded from the network when the page is viewed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from kcs_lens.discovery.rundir import RunInfo
from kcs_lens.evaluation.paper_table import RowSettings, evaluated_rows, mean_row, short
from kcs_lens.evaluation.run_page_html import render
from kcs_lens.files import atomic_write_bytes, check_output_file, output_files
from kcs_lens.stats import flat_numbers

# Settings that say where a run ran, not what it computed: runs differing only in these (and the
# seed) share a page.
EXECUTION_KEYS = ("seed", "device")


# ------------------------------------------------------------------------------------------
# Groups and output paths
# ------------------------------------------------------------------------------------------
@dataclass
class Group:
    """Runs of one setting (everything but the seed equal), one page."""

    label: str
    runs: list[RunInfo]


def setting_key(info: RunInfo) -> str:
    cfg = {k: v for k, v in info.config.to_dict().items() if k not in EXECUTION_KEYS}
    return json.dumps([info.fingerprint, cfg], sort_keys=True, default=str)


def group_runs(infos: Sequence[RunInfo]) -> list[Group]:
    """Runs grouped by setting (in the order given), seeds sorted within a group."""
    by_key: dict[str, list[RunInfo]] = {}
    for r in infos:
        by_key.setdefault(setting_key(r), []).append(r)
    groups = []
    for runs in by_key.values():
        runs = sorted(runs, key=lambda r: r.config.seed)
        c = runs[0].config
        label = f"{short(c.model)}-{short(str(c.target_kg))}" + ("" if c.ablation == "full" else f"-{c.ablation}")
        groups.append(Group(label, runs))
    labels = [g.label for g in groups]
    for i, g in enumerate(groups):  # settings that differ elsewhere than model/KG/ablation
        if labels.count(g.label) > 1:
            g.label += f"-{i + 1}"
    return groups


def page_paths(groups: Sequence[Group], base: str | Path) -> list[Path]:
    """``BASE.html`` for one group, ``BASE-<label>.html`` for each of several."""
    base = output_files(base, (".html", ".md", ".csv", ".png"))[0]  # a dotted name keeps its dots
    if len(groups) == 1:
        return [base.with_name(base.name + ".html")]
    return [base.with_name(f"{base.name}-{re.sub(r'[^A-Za-z0-9._=+-]+', '_', g.label)}.html") for g in groups]


def check_pages(groups: Sequence[Group], base: str | Path, option: str = "--out") -> list[Path]:
    """The page paths, each checked writable (before any evaluation starts)."""
    return [check_output_file(p, option) for p in page_paths(groups, base)]


# ------------------------------------------------------------------------------------------
# Data of a page
# ------------------------------------------------------------------------------------------
def curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` of every number in the records."""
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for k, v in flat_numbers(rec).items():
            out.setdefault(k, []).append((int(rec["step"]), v))
    return out


def thresholds(info: RunInfo) -> dict[str, tuple[float, str]]:
    """The selection thresholds by metric: ``(value, '>=' | '<=')``."""
    c = info.config
    out = {
        "target_ratio": (c.select_min_target_ratio, ">="),
        "control_ratio": (c.select_max_control_ratio, "<="),
        "lm_ratio": (c.select_max_lm_ratio, "<="),
    }
    for key, value, op in (
        ("target_top1", c.select_max_target_top1, "<="),
        ("target_mc", c.select_max_target_mc, "<="),
        ("control_mc", c.select_min_control_mc, ">="),
    ):
        if value is not None:
            out[key] = (value, op)
    return out


def page_data(
    group: Group, rows: list[dict[str, Any]], evaluations: list[dict[str, Any]], baselines: list[dict[str, Any] | None]
) -> dict[str, Any]:
    """Everything one page shows, as plain data (also what tests and notebooks read)."""
    runs = []
    for info, row, ev_, base in zip(group.runs, rows, evaluations, baselines):
        summary = info.summary or {}
        runs.append(
            {
                "seed": info.config.seed,
                "dir": str(info.dir),
                "row": row,
                "summary": summary,
                "selected_step": summary.get("selected_step"),
                "curves": curves(info.files.read_metrics()),
                "facts": ev_.get("facts", {}),
                "density": ev_["subnetwork"]["density"],
                "config": info.raw_config,
                "baseline_draws": None if base is None else base.get("draws"),
            }
        )
    return {
        "label": group.label,
        "model": group.runs[0].config.model,
        "target_kg": str(group.runs[0].config.target_kg),
        "ablation": group.runs[0].config.ablation,
        "selection": group.runs[0].raw_config.get("selection", {}),
        "thresholds": thresholds(group.runs[0]),
        "runs": runs,
        "mean": mean_row(rows) if len(rows) > 1 else None,
    }


def pages_data(infos: Sequence[RunInfo], settings: RowSettings = RowSettings()) -> list[dict[str, Any]]:
    """The data of each page (one per setting group, :func:`group_runs` order): evaluations and
    baselines reused from the run directories as ``kcs-lens report`` reuses them, else computed."""
    groups = group_runs(infos)
    rows = evaluated_rows([r for g in groups for r in g.runs], settings, facts=True)
    out, i = [], 0
    for g in groups:
        n = len(g.runs)
        evals = [json.loads(r.files.evaluation.read_text()) for r in g.runs]
        bases = [json.loads(r.files.baseline.read_text()) if r.files.baseline.exists() else None for r in g.runs]
        out.append(page_data(g, rows[i : i + n], evals, bases))
        i += n
    return out


def run_pages(infos: Sequence[RunInfo], base: str | Path, settings: RowSettings = RowSettings()) -> list[Path]:
    """Write one page per setting group of ``infos`` (paths: :func:`page_paths`, checked first)."""
    paths = check_pages(group_runs(infos), base)
    for path, d in zip(paths, pages_data(infos, settings)):
        atomic_write_bytes(path, render(d).encode())
    return paths
