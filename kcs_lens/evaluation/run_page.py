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

Charts are SVG written here; nothing is loaded from the network when the page is viewed.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from kcs_lens.discovery.rundir import RunInfo
from kcs_lens.evaluation.paper_table import ANSWER_SETS, KEYS, before_after, evaluated_rows, mean_row, short
from kcs_lens.files import atomic_write_bytes, check_output_file, output_files
from kcs_lens.model.backends import LensModel

Log = Callable[[str], None]
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
# Settings that say where a run ran, not what it computed: runs differing only in these (and the
# seed) share a page.
EXECUTION_KEYS = ("seed", "device")
SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"),
    ("curves", "Training curves"),
    ("facts", "Per-fact answers"),
    ("density", "Density"),
    ("config", "Configuration"),
)
# Curves first in this order; every other number of metrics.jsonl follows in the order it appears.
FIRST = (
    "target_ratio",
    "control_ratio",
    "lm_ratio",
    "target_top1",
    "target_mc",
    "control_mc",
    "sparsity",
    "control_top1",
    "target_rank",
    "control_rank",
)


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
def flat_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a record as ``a/b`` keys (booleans and the step left out)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if k == "step" and not prefix:
            continue
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


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


def pages_data(
    infos: Sequence[RunInfo],
    *,
    draws: int = 5,
    seed: int = 0,
    recompute: bool = False,
    lens_model: LensModel | None = None,
    device: str | None = None,
    log: Log = print,
) -> list[dict[str, Any]]:
    """The data of each page (one per setting group, :func:`group_runs` order): evaluations and
    baselines reused from the run directories as ``kcs-lens report`` reuses them, else computed."""
    groups = group_runs(infos)
    ordered = [r for g in groups for r in g.runs]
    rows = evaluated_rows(
        ordered, draws=draws, seed=seed, recompute=recompute, lens_model=lens_model, device=device, log=log, facts=True
    )
    out, i = [], 0
    for g in groups:
        n = len(g.runs)
        evals = [json.loads(r.files.evaluation.read_text()) for r in g.runs]
        bases = [json.loads(r.files.baseline.read_text()) if r.files.baseline.exists() else None for r in g.runs]
        out.append(page_data(g, rows[i : i + n], evals, bases))
        i += n
    return out


def run_pages(
    infos: Sequence[RunInfo],
    base: str | Path,
    *,
    draws: int = 5,
    seed: int = 0,
    recompute: bool = False,
    lens_model: LensModel | None = None,
    device: str | None = None,
    log: Log = print,
) -> list[Path]:
    """Write one page per setting group of ``infos`` (paths: :func:`page_paths`, checked first)."""
    paths = check_pages(group_runs(infos), base)
    data = pages_data(infos, draws=draws, seed=seed, recompute=recompute, lens_model=lens_model, device=device, log=log)
    for path, d in zip(paths, data):
        atomic_write_bytes(path, render(d).encode())
    return paths


# ------------------------------------------------------------------------------------------
# SVG charts
# ------------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x))


def _nice(x: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``x``."""
    if x <= 0:
        return 1.0
    p = 10 ** math.floor(math.log10(x))
    return next(m * p for m in (1, 2, 5, 10) if m * p >= x * (1 - 1e-9))


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        every = max(1, math.ceil((b - a) / 5))
        return [10.0**k for k in range(a, b + 1, every)]
    step = _nice((hi - lo) / 4 if hi > lo else abs(hi) or 1.0)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:.4g}"


def line_chart(
    title: str,
    series: list[tuple[str, str, list[tuple[int, float]]]],
    *,
    vlines: Sequence[tuple[float, str, str]] = (),
    hline: tuple[float, str] | None = None,
    width: int = 330,
    height: int = 200,
) -> str:
    """An SVG line chart: ``series`` = (label, colour, [(x, y)]); ``vlines`` = (x, colour, label)
    (selected steps, dashed); ``hline`` = (y, label) (a threshold, grey). Log y where the values
    are positive and span more than 50x."""
    xs = [x for _, _, pts in series for x, _ in pts] + [v for v, _, _ in vlines]
    ys = [y for _, _, pts in series for _, y in pts] + ([hline[0]] if hline else [])
    if not xs or not ys:
        return ""
    log = min(ys) > 0 and max(ys) / min(ys) > 50
    tr = (lambda y: math.log10(y)) if log else (lambda y: y)
    ylo, yhi = min(ys), max(ys)
    if not log and ylo == yhi:
        ylo, yhi = ylo - 0.5 * (abs(ylo) or 1), yhi + 0.5 * (abs(yhi) or 1)
    ticks = _ticks(ylo, yhi, log)
    t_lo, t_hi = tr(min(ticks[0], ylo)), tr(max(ticks[-1], yhi))
    x_lo, x_hi = min(xs), max(xs)
    x_hi = x_hi if x_hi > x_lo else x_lo + 1
    L, R, T, B = 52, 16, 22, 28
    px = lambda x: L + (x - x_lo) / (x_hi - x_lo) * (width - L - R)
    py = lambda y: T + (1 - (tr(y) - t_lo) / ((t_hi - t_lo) or 1)) * (height - T - B)
    out = [
        f'<svg class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img"><title>{_e(title)}</title>',
        f'<text x="{L}" y="14" class="ct">{_e(title)}{" (log scale)" if log else ""}</text>',
        f'<rect x="{L}" y="{T}" width="{width - L - R}" height="{height - T - B}" fill="none" stroke="#ccc"/>',
    ]
    for t in ticks:
        if t_lo - 1e-12 <= tr(t) <= t_hi + 1e-12:
            y = py(t)
            out.append(f'<line x1="{L}" x2="{width - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{L - 4}" y="{y + 3:.1f}" text-anchor="end" class="tk">{_fmt_tick(t)}</text>')
    for x in _ticks(x_lo, x_hi, False):
        if x_lo <= x <= x_hi:
            out.append(f'<text x="{px(x):.1f}" y="{height - 14}" text-anchor="middle" class="tk">{_fmt_tick(x)}</text>')
    out.append(f'<text x="{(L + width - R) / 2:.0f}" y="{height - 2}" text-anchor="middle" class="tk">step</text>')
    if hline is not None:
        y = py(hline[0])
        out.append(
            f'<line class="threshold" x1="{L}" x2="{width - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#555" '
            f'stroke-dasharray="2,3"><title>{_e(hline[1])}</title></line>'
            f'<text x="{width - R - 2}" y="{y - 3:.1f}" text-anchor="end" class="tk">{_e(hline[1])}</text>'
        )
    for x, color, label in vlines:
        out.append(
            f'<line class="selected" x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{T}" y2="{height - B}" stroke="{color}" '
            f'stroke-dasharray="5,3" opacity="0.8"><title>{_e(label)}</title></line>'
        )
    for label, color, pts in series:
        pts = sorted(pts)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline class="series" points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        out += [
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2" fill="{color}"><title>{_e(label)} step {x}: {y:.6g}</title></circle>'
            for x, y in pts
        ]
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------------------
# HTML sections
# ------------------------------------------------------------------------------------------
def _table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "", attrs: Sequence[str] = ()) -> str:
    h = "".join(f"<th>{c}</th>" for c in head)
    body = "".join(
        f"<tr{(' ' + attrs[i]) if attrs else ''}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for i, r in enumerate(rows)
    )
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _g(x: Any, spec: str = ".4g") -> str:
    return "&ndash;" if x is None else format(x, spec)


def _pm(x: float | None, sd: float | None) -> str:
    return "&ndash;" if x is None else f"{x:+.4g}" + ("" if sd is None else f' <span class="sd">± {sd:.2g}</span>')


def summary_section(d: dict[str, Any]) -> str:
    runs, mean = d["runs"], d["mean"]
    head = ["seed", "selected step", "criteria met", "sparsity %"]
    head += [f"dPPL {label} (random)" for _, label in KEYS] + [f"PPL ratio {label}" for _, label in KEYS]
    head += [f"top-1 {label} (orig → rem)" for _, label in ANSWER_SETS] + ["rank TargetKG (orig → rem)"]
    rows = []
    for r in [x["row"] for x in runs] + ([mean] if mean else []):
        is_mean = r["seed"] == "mean"
        sd = (lambda k, r=r: r.get(f"{k}_seed_std")) if is_mean else (lambda k: None)
        step = "" if is_mean else _g(next(x["selected_step"] for x in runs if x["row"] is r), "d")
        cells = [
            "<b>mean ± sd over seeds</b>" if is_mean else _e(r["seed"]),
            step,
            "yes" if r["meets_criteria"] else "no",
            f"{100 * r['sparsity']:.2f}" + (f' <span class="sd">± {100 * (sd("sparsity") or 0):.2f}</span>' if is_mean else ""),
        ]
        for k, _ in KEYS:
            rnd = r.get(f"random_dppl_{k}")
            rnd_sd = r.get(f"random_dppl_{k}_std") if not is_mean else sd(f"random_dppl_{k}")
            cells.append(f'{_pm(r[f"dppl_{k}"], sd(f"dppl_{k}"))}<br><span class="rnd">random {_pm(rnd, rnd_sd)}</span>')
        cells += [_pm(r[f"ratio_{k}"], sd(f"ratio_{k}")).lstrip("+") for k, _ in KEYS]
        cells += [before_after(r.get(f"top1_original_{k}"), r.get(f"top1_remaining_{k}")) for k, _ in ANSWER_SETS]
        cells.append(before_after(r.get("rank_original_target"), r.get("rank_remaining_target"), ".1f"))
        rows.append(cells)
    draws = runs[0]["baseline_draws"]
    sel = d["selection"]
    note = (
        f"<p class='note'>dPPL = PPL(remaining) &minus; PPL(original) on TargetKG, ControlKG (validation) and held-out "
        f"ControlLM text; random = the same number of weights removed at random in every masked matrix (mean ± sd over "
        f"{draws} draws). Top-1 = share of triplets whose tail's first token is the model's answer; rank = its mean rank "
        f"(0 = top). Checkpoint selection: {_e(sel.get('rule', ''))}.</p>"
    )
    keys = list(dict.fromkeys(k for x in runs for k in flat_numbers(x["summary"])))
    extra = _table(
        ["summary.json"] + [f"seed {x['seed']}" for x in runs],
        [[_e(k)] + [_g(flat_numbers(x["summary"]).get(k), ".5g") for x in runs] for k in keys],
        "num",
    )
    return (
        _table(head, rows, "num summary")
        + note
        + f"<details><summary>every number of summary.json ({len(keys)})</summary>{extra}</details>"
    )


def _label(metric: str) -> str:
    return metric.replace("_", " ").replace("/", ": ")


def curves_section(d: dict[str, Any]) -> str:
    runs = d["runs"]
    keys = list(dict.fromkeys(k for x in runs for k in x["curves"]))
    keys = [k for k in FIRST if k in keys] + [k for k in keys if k not in FIRST]
    charts = []
    for k in keys:
        series = [(f"seed {x['seed']}", COLORS[i % len(COLORS)], x["curves"].get(k, [])) for i, x in enumerate(runs)]
        vlines = [
            (x["selected_step"], COLORS[i % len(COLORS)], f"seed {x['seed']}: selected step {x['selected_step']}")
            for i, x in enumerate(runs)
            if x["selected_step"] is not None
        ]
        th = d["thresholds"].get(k)
        hline = None if th is None else (th[0], f"selection: {th[1]} {th[0]:g}")
        charts.append(f'<figure data-metric="{_e(k)}">{line_chart(_label(k), series, vlines=vlines, hline=hline)}</figure>')
    legend = " ".join(
        f'<span class="key" style="border-color:{COLORS[i % len(COLORS)]}">seed {_e(x["seed"])}</span>'
        for i, x in enumerate(runs)
    )
    return (
        f"<p class='note'>Every number of metrics.jsonl (one point per evaluation of the deterministic mask; "
        f"<code>train: ...</code> = the training loss terms averaged since the previous evaluation). Dashed vertical "
        f"line: the step each seed's selection picked; dotted grey line: a selection threshold. {legend}</p>"
        f'<div class="charts">{"".join(charts)}</div>'
    )


SET_NAMES = {"target": "TargetKG", "control": "ControlKG (val)", "paraphrases": "paraphrases"}


def facts_section(d: dict[str, Any]) -> str:
    runs = d["runs"]
    rows, attrs = [], []
    relations, sets = set(), []
    has_mc = any("mc_original" in f for x in runs for fs in x["facts"].values() for f in fs)
    for x in runs:
        for s, facts in x["facts"].items():
            if s not in sets:
                sets.append(s)
            for f in facts:
                relations.add(f["relation"])
                lost = f["rank_original"] == 0 and f["rank_remaining"] > 0
                changed = f["answer_original"] != f["answer_remaining"]
                rows.append(
                    [
                        _e(SET_NAMES.get(s, s)),
                        _e(x["seed"]),
                        _e(f["head"]),
                        _e(f["relation"]),
                        _e(f["tail"]),
                        f"<code>{_e(repr(f['answer_original']))}</code>",
                        f"<code>{_e(repr(f['answer_remaining']))}</code>",
                        str(f["rank_original"]),
                        str(f["rank_remaining"]),
                        f"{f['logprob_original']:.2f}",
                        f"{f['logprob_remaining']:.2f}",
                    ]
                    + ([_e(f.get("mc_original", "")), _e(f.get("mc_remaining", ""))] if has_mc else [])
                )
                attrs.append(
                    f'data-set="{_e(s)}" data-rel="{_e(f["relation"])}" data-seed="{_e(x["seed"])}" '
                    f'class="{"lost" if lost else ""}{" changed" if changed else ""}"'
                )
    if not rows:
        return "<p>No per-fact answers in the evaluation.</p>"
    opt = lambda vals, names=None: "".join(f'<option value="{_e(v)}">{_e((names or {}).get(v, v))}</option>' for v in vals)
    controls = (
        '<div class="filters">'
        f'<label>set <select id="f-set"><option value="">all</option>{opt(sets, SET_NAMES)}</select></label> '
        f'<label>relation <select id="f-rel"><option value="">all</option>{opt(sorted(relations))}</select></label> '
        f'<label>seed <select id="f-seed"><option value="">all</option>{opt([str(x["seed"]) for x in runs])}</select></label> '
        '<label><input type="checkbox" id="f-changed"> only answers that changed</label> '
        '<label>search <input type="search" id="f-text" size="14"></label> '
        '<span id="f-count"></span></div>'
    )
    head = ["set", "seed", "head", "relation", "tail", "answer: original", "answer: remaining"]
    head += ["tail rank: original", "tail rank: remaining", "log p tail: original", "log p tail: remaining"]
    head += ["multiple choice: original", "multiple choice: remaining"] if has_mc else []
    n_lost = sum("lost" in a for a in attrs)
    n_target = sum('data-set="target"' in a for a in attrs)
    n_lost_t = sum("lost" in a and 'data-set="target"' in a for a in attrs)
    return (
        f"<p class='note'>The answer is the model's top token at the tail's first position; rank 0 = the tail is the "
        f"answer. Multiple choice (when the run has it): the tail the model scores best among the set's choices. Rows in red lost their answer (rank 0 before, not after): {n_lost_t} of {n_target} TargetKG rows, "
        f"{n_lost} of {len(rows)} in all. Click a column to sort.</p>" + controls + _table(head, rows, "num facts", attrs)
    )


def density_section(d: dict[str, Any]) -> str:
    runs = d["runs"]
    layers = sorted({int(k) for x in runs for k in x["density"]["per_layer"]})
    series = [
        (f"seed {x['seed']}", COLORS[i % len(COLORS)], [(l, 100 * x["density"]["per_layer"][str(l)]) for l in layers])
        for i, x in enumerate(runs)
    ]
    chart = line_chart("density per layer (% of masked weights)", series, width=420).replace(">step<", ">layer<")
    tables = []
    for x in runs:
        d_ = x["density"]
        mats = list(d_["per_matrix"])
        rows = []
        for l, row in d_["per_layer_matrix"].items():
            rows.append([f"L{_e(l)}"] + [_cell(row.get(m)) for m in mats] + [_cell(d_["per_layer"].get(l))])
        rows.append(["all"] + [_cell(d_["per_matrix"][m]) for m in mats] + [_cell(x["row"]["sparsity"], invert=True)])
        tables.append(f"<div><h4>seed {_e(x['seed'])}</h4>{_table(['layer', *mats, 'all'], rows, 'num density')}</div>")
    return (
        "<p class='note'>Density = share of a layer's or matrix's masked weights that are in the subnetwork (%).</p>"
        f'<div class="row"><figure>{chart}</figure>{"".join(tables)}</div>'
    )


def _cell(v: float | None, invert: bool = False) -> str:
    if v is None:
        return "&ndash;"
    v = 1 - v if invert else v
    a = min(1.0, max(0.0, v)) ** 0.5
    return f'<span class="dens" style="background:rgba(31,119,180,{a:.2f})">{100 * v:.2f}</span>'


def config_section(d: dict[str, Any]) -> str:
    runs = d["runs"]
    cfgs = [x["config"]["config"] for x in runs]
    keys = list(dict.fromkeys(k for c in cfgs for k in c))
    same = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in cfgs}) == 1]
    diff = [k for k in keys if k not in same]
    rows = [[_e(k), f"<code>{_e(json.dumps(cfgs[0].get(k), default=str))}</code>"] for k in same]
    out = _table(["setting", "value"], rows, "config")
    if diff:
        out += "<h4>Settings that differ between the seeds</h4>" + _table(
            ["setting"] + [f"seed {x['seed']}" for x in runs],
            [[_e(k)] + [f"<code>{_e(json.dumps(c.get(k), default=str))}</code>" for c in cfgs] for k in diff],
            "config",
        )
    for x in runs:
        out += (
            f"<details><summary>{_e(x['dir'])}/config.json</summary>"
            f"<pre>{_e(json.dumps(x['config'], indent=2, default=str))}</pre></details>"
        )
    return out


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:20px;color:#222;max-width:1600px}
h1{font-size:21px;margin:0 0 4px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}h4{margin:6px 0}
nav a{margin-right:14px}table{border-collapse:collapse;font-size:12px;margin:6px 0 12px}td,th{border:1px solid #ddd;padding:3px 6px}
th{background:#f3f3f3;position:sticky;top:0}table.num td{text-align:right}table.num td:first-child{text-align:left}
.sd,.rnd{color:#777;font-size:11px}.note{color:#555;font-size:12px;max-width:1200px}.charts{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0}.ct{font-size:12px;font-weight:600}.tk{font-size:10px;fill:#555}.key{border-left:12px solid;padding-left:4px;margin-right:8px}
table.facts th{cursor:pointer;user-select:none}table.facts th.asc:after{content:" \\25B2"}table.facts th.desc:after{content:" \\25BC"}
tr.lost td{background:#fde8e8}tr.changed td:nth-child(7){font-weight:600}.filters{margin:6px 0;font-size:13px}.filters label{margin-right:10px}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.dens{display:inline-block;min-width:44px}
pre{background:#f7f7f7;padding:6px;font-size:11px;max-height:400px;overflow:auto}table.config td{text-align:left}
"""

# Sorting (click a header; numbers sort as numbers) and filtering of the per-fact table.
JS = """
(function(){
  var t=document.querySelector('table.facts'); if(!t) return;
  var body=t.tBodies[0], rows=Array.prototype.slice.call(body.rows);
  var f={set:document.getElementById('f-set'),rel:document.getElementById('f-rel'),seed:document.getElementById('f-seed'),
         ch:document.getElementById('f-changed'),tx:document.getElementById('f-text'),n:document.getElementById('f-count')};
  function apply(){
    var q=f.tx.value.toLowerCase(), shown=0;
    rows.forEach(function(r){
      var ok=(!f.set.value||r.dataset.set===f.set.value)&&(!f.rel.value||r.dataset.rel===f.rel.value)&&
             (!f.seed.value||r.dataset.seed===f.seed.value)&&(!f.ch.checked||r.classList.contains('changed'))&&
             (!q||r.textContent.toLowerCase().indexOf(q)>=0);
      r.style.display=ok?'':'none'; if(ok) shown++;
    });
    f.n.textContent=shown+' of '+rows.length+' rows';
  }
  [f.set,f.rel,f.seed,f.ch].forEach(function(e){e.addEventListener('change',apply);});
  f.tx.addEventListener('input',apply);
  Array.prototype.forEach.call(t.tHead.rows[0].cells,function(th,i){
    th.addEventListener('click',function(){
      var asc=!th.classList.contains('asc');
      Array.prototype.forEach.call(t.tHead.rows[0].cells,function(h){h.classList.remove('asc','desc');});
      th.classList.add(asc?'asc':'desc');
      var key=function(r){var s=r.cells[i].textContent, x=parseFloat(s); return isNaN(x)?s.toLowerCase():x;};
      rows.sort(function(a,b){var x=key(a),y=key(b); return (x<y?-1:x>y?1:0)*(asc?1:-1);});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
  apply();
  document.body.dataset.ready='1';
})();
"""


def render(d: dict[str, Any]) -> str:
    """The page's HTML (self-contained: inline CSS, SVG and JavaScript)."""
    seeds = ", ".join(str(x["seed"]) for x in d["runs"])
    title = f"kcs-lens run: {short(d['model'])} / {short(d['target_kg'])}" + (
        "" if d["ablation"] == "full" else f" / {d['ablation']}"
    )
    bodies = {
        "summary": summary_section(d),
        "curves": curves_section(d),
        "facts": facts_section(d),
        "density": density_section(d),
        "config": config_section(d),
    }
    nav = "".join(f'<a href="#{k}">{v}</a>' for k, v in SECTIONS)
    parts = [
        f"<h1>{_e(title)}</h1>",
        f"<p>model <code>{_e(d['model'])}</code>; TargetKG <code>{_e(d['target_kg'])}</code>; ablation {_e(d['ablation'])}; "
        f"seed{'s' if len(d['runs']) > 1 else ''} {_e(seeds)}; runs: "
        + ", ".join(f"<code>{_e(x['dir'])}</code>" for x in d["runs"])
        + "</p>",
        f"<nav>{nav}</nav>",
    ]
    parts += [f'<section id="{k}"><h2>{v}</h2>{bodies[k]}</section>' for k, v in SECTIONS]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)} (seeds {_e(seeds)})</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(parts)
        + f"\n<script>{JS}</script>\n</body></html>\n"
    )
