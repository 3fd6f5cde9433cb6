"""The study report (``kcs-lens report DIR`` on a sweep directory): the cells grouped by everything
but the seed; per group the mean ± std over seeds of sparsity and dPPL (TargetKG, ControlKG,
ControlLM) with the random baseline beside them, and the seeds' overlap (Jaccard, union,
intersection, each removed and evaluated). Per-run rows come from :mod:`kcs_lens.evaluation.paper_table`
(``evaluated_rows``, ``mean_row``, ``markdown``), so its columns and caches are the study's too.
Writes ``study.md``, ``study.csv``, ``study.json``, ``study-density.png``, ``study-tradeoff.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kcs_lens.discovery.rundir import RunInfo, load_run
from kcs_lens.evaluation import paper_report
from kcs_lens.evaluation import paper_table as report
from kcs_lens.evaluation.paper_table import RowSettings
from kcs_lens.files import atomic_write_bytes, atomic_write_json, check_output_file, output_files, with_added_suffix
from kcs_lens.sweep.cells import DONE, cell_state, describe
from kcs_lens.sweep.plan import Cell, identity, load_plan
from kcs_lens.tables import csv_text, md_row, md_table, png_bytes, pyplot

OVERLAP_CACHE = ".cells/overlap"
COMBOS = ("union", "intersection")
STUDY_SUFFIXES = (".md", ".csv", ".json", "-density.png", "-tradeoff.png")


def group_key(cell: Cell) -> str:
    return identity({k: v for k, v in cell.config.items() if k != "seed"})


def group_label(cell: Cell) -> str:
    parts = [p for p in cell.name.split("/") if p != f"seed{cell.config['seed']}"]
    return "/".join(parts) or cell.name


def study_report(
    study_dir: str | Path,
    out: str | Path | None = None,
    settings: RowSettings = RowSettings(),
    *,
    html: bool = False,
) -> dict[str, Any]:
    """Evaluate (or reuse the caches of) every finished cell and write the study report files to
    ``out`` (default ``DIR/study``: ``DIR/study.md`` ...). Unfinished cells are listed. ``html``:
    also a run page per group of seeds (:mod:`kcs_lens.evaluation.run_page`, ``DIR/study-<group>.html``).
    ``settings``: how each run's numbers are obtained (draws, relearning, caches, the model)."""
    from kcs_lens.evaluation import run_page

    study_dir = Path(study_dir)
    plan = load_plan(study_dir)
    base, files = study_files(out if out is not None else study_dir / "study")
    for f in files:  # every file it writes is checked before the evaluations
        check_output_file(f, "--out")
    done = [c for c in plan.cells if cell_state(study_dir, c) == DONE]
    pending = [describe(study_dir, c) for c in plan.cells if c not in done]
    infos = [load_run(study_dir / c.name) for c in done]
    if html and infos:
        run_page.check_pages(run_page.group_runs(infos), base)
    rows = report.evaluated_rows(infos, settings, facts=html) if infos else []
    groups: dict[str, dict[str, Any]] = {}
    for c in plan.cells:
        g = groups.setdefault(group_key(c), {"group": group_label(c), "planned": 0, "cells": [], "infos": [], "rows": []})
        g["planned"] += 1
    for c, info, row in zip(done, infos, rows):
        row["cell"], row["group"] = c.name, group_label(c)
        g = groups[group_key(c)]
        g["cells"].append(c)
        g["infos"].append(info)
        g["rows"].append(row)
    models: dict[str, Any] = {}
    summary = []
    for g in groups.values():
        if not g["rows"]:
            summary.append({"group": g["group"], "n_seeds": 0, "n_planned": g["planned"]})
            continue
        m = report.mean_row(g["rows"])
        m.update(group=g["group"], n_seeds=len(g["rows"]), n_planned=g["planned"], seeds=[r["seed"] for r in g["rows"]])
        if len(g["infos"]) > 1:
            m["overlap"] = seed_overlap(study_dir, g, models, settings)
        summary.append(m)
    res = {"study": plan.study, "dir": str(study_dir), "groups": summary, "runs": rows, "not_finished": pending}
    written = write_study(base, res, infos, groups)
    if html and infos:
        written += [str(p) for p in run_page.run_pages(infos, base, settings)]
    res["files"] = written
    return res


def seed_overlap(study_dir: Path, g: dict[str, Any], models: dict[str, Any], settings: RowSettings) -> dict[str, Any]:
    """Jaccard of the group's seeds, and the union, at-least-k-of-n and intersection of their subnetworks
    removed and evaluated (cached by the members' subnetworks)."""
    from kcs_lens.evaluation.evaluate import Evaluator
    from kcs_lens.evaluation.overlap import at_least, check_compatible, combination_name, overlap_stats

    infos: list[RunInfo] = g["infos"]
    shas = [i.subnetwork.membership_sha() for i in infos]
    cache = study_dir / OVERLAP_CACHE / f"{g['group']}.json"
    if not settings.recompute and cache.exists():
        try:
            d = json.loads(cache.read_text())
            if d.get("shas") == shas:
                return d
        except ValueError:
            pass
    check_compatible(infos)
    subs = [i.subnetwork for i in infos]
    stats = overlap_stats(subs)
    first = infos[0]
    if first.fingerprint not in models:
        models[first.fingerprint] = settings.run_model(first)
    settings.log(f"evaluating the union and intersection of {len(infos)} seeds of {g['group']}")
    ev = Evaluator(first, lens_model=models[first.fingerprint], log=settings.log)
    out: dict[str, Any] = {
        "shas": shas,
        "jaccard_mean": stats["jaccard_mean"],
        "jaccard": stats["jaccard"],
        "shared": stats["all"],
    }
    for k in range(1, len(subs) + 1):  # union, at least 2 of n, ..., intersection
        name = combination_name(k, len(subs))
        comb = at_least(subs, k)
        rem = ev.metrics(comb, ("remaining",))["remaining"]
        out[name] = {"sparsity": comb.sparsity, **{f"dppl_{s}": rem[s]["dppl"] for s, _ in report.KEYS}}
    atomic_write_json(cache, out)
    return out


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------
def _pm(r: dict[str, Any], k: str, scale: float = 1.0, fmt: str = "{:+.3g}") -> str:
    s = fmt.format(scale * r[k])
    sd = r.get(f"{k}_seed_std")
    return s if not sd else f"{s} ± {scale * sd:.2g}"


def markdown(res: dict[str, Any], infos: list[RunInfo]) -> str:
    groups = res["groups"]
    n_cells = sum(g["n_planned"] for g in groups)
    lines = [f"# Study `{res['dir']}`", "", f"Study file `{res['study']}`: {n_cells} cells, {len(res['runs'])} finished."]
    lines += [
        "",
        "Per group (all settings equal but the seed): mean ± std over the finished seeds. dPPL = PPL(remaining model) - "
        "PPL(original); random = the same number of weights removed at random in every masked matrix; MC = multiple "
        "choice among same-relation tails (docs/method.md).",
        "",
    ]
    head = ["group", "seeds", "sparsity %", "dPPL TargetKG", "dPPL ControlKG", "dPPL ControlLM"]
    head += ["random dPPL TargetKG", "random dPPL ControlKG", "random dPPL ControlLM"]
    head += [f"top-1 {label} (original → remaining)" for _, label in report.ANSWER_SETS]
    head += [f"MC {label} (original → remaining [random])" for _, label in report.ANSWER_SETS] + ["criteria met"]
    lines += md_table(head)
    for g in groups:
        if not g["n_seeds"]:
            lines.append(f"| {g['group']} | 0/{g['n_planned']} |" + " |" * (len(head) - 2))
            continue
        cells = [g["group"], f"{g['n_seeds']}/{g['n_planned']}", _pm(g, "sparsity", 100, "{:.2f}")]
        cells += [_pm(g, f"dppl_{k}") for k, _ in report.KEYS] + [_pm(g, f"random_dppl_{k}") for k, _ in report.KEYS]
        cells += [report.before_after(g.get(f"top1_original_{k}"), g.get(f"top1_remaining_{k}")) for k, _ in report.ANSWER_SETS]
        cells += [paper_report.format_cell(g, "mc", k, ".2f") for k, _ in report.ANSWER_SETS]
        cells.append("yes" if g["meets_criteria"] else "no")
        lines.append(md_row(cells))
    ov = [g for g in groups if "overlap" in g]
    if ov:
        lines += ["", "## Seeds: overlap, union and intersection removed", ""]
        lines += ["The seeds' subnetworks combined and removed (at least k of n seeds: in study.json).", ""]
        head = ["group", "seeds", "Jaccard (mean pair)"]
        head += [f"{c} {x}" for c in COMBOS for x in ("sparsity %", "dPPL TargetKG", "dPPL ControlKG", "dPPL ControlLM")]
        lines += md_table(head)
        for g in ov:
            o = g["overlap"]
            cells = [g["group"], str(g["n_seeds"]), f"{o['jaccard_mean']:.3f}"]
            for c in COMBOS:
                cells += [f"{100 * o[c]['sparsity']:.2f}"] + [f"{o[c][f'dppl_{k}']:+.3g}" for k, _ in report.KEYS]
            lines.append(md_row(cells))
    if res["not_finished"]:
        lines += ["", "## Cells not finished (not in the tables)", ""]
        lines += md_table(
            ["cell", "state", "step", "last error"],
            ([r["cell"], r["state"], f"{r['step']}/{r['steps']}", r["error"] or ""] for r in res["not_finished"]),
        )
    if infos:
        detail = paper_report.markdown(report.with_means(res["runs"]), infos)
        lines += ["", "## Per run", ""] + [("#" + x if x.startswith("#") else x) for x in detail.splitlines()[2:]]
    return "\n".join(lines) + "\n"


def study_csv(res: dict[str, Any], groups: dict[str, dict[str, Any]]) -> str:
    """The per-run rows and one mean row per group (``report``'s columns), with the overlap columns."""
    extra = ["group", "cell", "n_seeds", "n_planned", "jaccard_mean"]
    extra += [f"{c}_{x}" for c in COMBOS for x in ["sparsity"] + [f"dppl_{k}" for k, _ in report.KEYS]]
    cols = extra + paper_report.CSV_COLUMNS + [f"{k}_seed_std" for k in report.NUMERIC] + ["run"]
    means = {g["group"]: g for g in res["groups"]}
    rows: list[dict[str, Any]] = []
    for g in groups.values():
        rows += g["rows"]
        m = means[g["group"]]
        if m.get("n_seeds"):
            flat = dict(m)
            o = m.get("overlap")
            if o:
                flat["jaccard_mean"] = o["jaccard_mean"]
                flat.update({f"{c}_{k}": v for c in COMBOS for k, v in o[c].items()})
            rows.append(flat)
    return csv_text(rows, cols)


def density_png(groups: dict[str, dict[str, Any]]) -> bytes:
    """Per group: the density (% of weights kept in the subnetwork) per layer and matrix, mean over seeds."""
    plt = pyplot()
    done = [g for g in groups.values() if g["infos"]]
    cols = min(3, max(1, len(done)))
    nrows = max(1, -(-len(done) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, g in zip(axes.flat, done):
        per = [i.subnetwork.density_stats()["density"]["per_layer_matrix"] for i in g["infos"]]
        layers = sorted(per[0], key=int)
        mats = list(per[0][layers[0]])
        grid = [[100 * sum(p[l][m] for p in per) / len(per) for m in mats] for l in layers]
        ax.axis("on")
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(mats)), mats, rotation=45, fontsize=7)
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(f"{g['group']} ({len(per)} seeds)", fontsize=8)
        fig.colorbar(im, ax=ax, label="density %")
    fig.tight_layout()
    return png_bytes(fig, dpi=110)


def tradeoff_png(res: dict[str, Any]) -> bytes:
    """Sparsity against dPPL on TargetKG and on the controls, one point per group (± std over seeds),
    the random baseline in grey."""
    plt = pyplot()
    gs = [g for g in res["groups"] if g.get("n_seeds")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (k, label) in zip(axes, report.KEYS):
        for g in gs:
            x, xe = 100 * g["sparsity"], 100 * g["sparsity_seed_std"]
            ax.errorbar(x, g[f"dppl_{k}"], xerr=xe, yerr=g[f"dppl_{k}_seed_std"], fmt="o", capsize=3, label=g["group"])
            ax.errorbar(x, g[f"random_dppl_{k}"], yerr=g[f"random_dppl_{k}_std"], fmt="x", color="grey", capsize=2)
        ax.set_xlabel("sparsity % (of masked weights)")
        ax.set_ylabel(f"dPPL {label}")
        ax.set_title(f"{label} (x: random baseline)")
        ax.grid(alpha=0.3)
    if gs:
        axes[0].legend(fontsize=6)
    fig.tight_layout()
    return png_bytes(fig, dpi=110)


def study_files(out: str | Path) -> tuple[Path, list[Path]]:
    """The base name of ``--out`` and the files of the study report (``study_dir/study`` by
    default): BASE.md, .csv, .json, -density.png, -tradeoff.png; a dotted name keeps its dots."""
    base, _ = output_files(out, (".md", ".csv", ".json", ".png", ".html"))
    return base, [with_added_suffix(base, s) for s in STUDY_SUFFIXES]


def write_study(base: Path, res: dict[str, Any], infos: list[RunInfo], groups: dict[str, dict[str, Any]]) -> list[str]:
    md, csv_file, json_file, density, tradeoff = (with_added_suffix(base, s) for s in STUDY_SUFFIXES)
    out = [
        str(atomic_write_bytes(md, markdown(res, infos).encode())),
        str(atomic_write_bytes(csv_file, study_csv(res, groups).encode())),
    ]
    slim = {**res, "runs": [{k: v for k, v in r.items() if k != "config"} for r in res["runs"]]}
    out.append(str(atomic_write_json(json_file, slim)))
    if infos:
        out.append(str(atomic_write_bytes(density, density_png(groups))))
        out.append(str(atomic_write_bytes(tradeoff, tradeoff_png(res))))
    return out
