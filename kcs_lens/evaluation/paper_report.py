"""The paper's table per model (TargetKG x seed and means), the random baseline beside it, the
removal in other formats, loss ablations and a per-layer density plot: ``kcs-lens report`` is
:func:`report_runs`; the rows are :mod:`kcs_lens.evaluation.paper_table`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from kcs_lens import tables
from kcs_lens.discovery.rundir import RunInfo, expand_runs, load_run
from kcs_lens.errors import RunError
from kcs_lens.evaluation.paper_table import (
    ANSWER_SETS,
    KEYS,
    NUMERIC,
    REPORT_SUFFIXES,
    RowSettings,
    before_after,
    evaluated_rows,
    short,
    with_means,
)
from kcs_lens.files import atomic_write_bytes, output_files, with_added_suffix
from kcs_lens.tables import md_row, md_table


def report_files(out: str | os.PathLike) -> tuple[Path, list[Path]]:
    """``report --out FILE``: the base name (a given .md/.csv/.png/.html dropped, other dots kept)
    and the table files FILE.md, FILE.csv, FILE.png (the run pages: :func:`run_page.page_paths`)."""
    base = output_files(out, (*REPORT_SUFFIXES, ".html"))[0]
    return base, [with_added_suffix(base, s) for s in REPORT_SUFFIXES]


def report_runs(
    runs: Sequence[str | os.PathLike], out: str | os.PathLike, settings: RowSettings = RowSettings(), *, html: bool = False
) -> dict[str, Any]:
    """Evaluate (or reuse ``evaluation.json`` / ``baseline.json`` of) every run and write
    ``<out>.md``, ``<out>.csv`` and ``<out>.png`` (per-layer density); ``html``: also the run pages
    (:mod:`kcs_lens.evaluation.run_page`, one per group of seeds). Returns the rows and files."""
    from kcs_lens.evaluation import run_page

    infos = [load_run(p) for p in expand_runs(runs)]
    if not infos:
        raise RunError("report needs at least one run")
    base_out, report_paths = report_files(out)
    if html:
        run_page.check_pages(run_page.group_runs(infos), base_out)
    table = with_means(evaluated_rows(infos, settings, facts=html))
    write_report_files(base_out, table, infos)
    files = [str(f) for f in report_paths]
    if html:
        files += [str(p) for p in run_page.run_pages(infos, base_out, settings)]
    return {"rows": table, "files": files}


def _fmt(x: float, pm: float | None = None) -> str:
    s = f"{x:+.3g}" if abs(x) < 1e4 else f"{x:+.3e}"
    return s if pm is None else f"{s} ± {pm:.2g}"


def markdown(table: list[dict[str, Any]], infos: list[RunInfo]) -> str:
    sel = infos[0].raw_config.get("selection", {}).get("rule", "")
    lines = ["# kcs-lens report", ""]
    lines.append(
        "dPPL = PPL(remaining model) - PPL(original) on TargetKG, ControlKG (validation) and held-out ControlLM text. "
        "Random = the same number of weights removed uniformly at random in every masked matrix (mean ± std over draws). "
        "Top-1 = share of triplets whose tail's first token is the model's top prediction (the answer), rank = its "
        "mean rank (0 = top), original → remaining model: a PPL ratio can be large while the answer survives. "
        "Mean rows: mean ± std over seeds; - = not in the run's files (older runs)."
    )
    if sel:
        lines += ["", f"Checkpoint selection: {sel}."]
    for fp in dict.fromkeys(r["fingerprint"] for r in table):
        rows = [r for r in table if r["fingerprint"] == fp]
        info, model = next(i for i in infos if i.fingerprint == fp), rows[0]["model"]
        mc = info.subnetwork.mask_config
        lines += [
            "",
            f"## Model `{model}`",
            "",
            f"Masked layers {list(mc.layers)}, matrices {', '.join(mc.matrices)}, {mc.granularity} granularity; "
            f"fingerprint `{info.fingerprint}`. Original model: ControlKG PPL {rows[0]['ppl_original_control']:.4g}, ControlLM PPL {rows[0]['ppl_original_lm']:.4g}.",
            "",
        ]
        head = [
            "ablation",
            "TargetKG",
            "seed",
            "PPL TargetKG (original)",
            "sparsity %",
            "dPPL TargetKG",
            "dPPL ControlKG",
            "dPPL ControlLM",
            "random dPPL TargetKG",
            "random dPPL ControlKG",
            "random dPPL ControlLM",
            *[f"top-1 {label} (original → remaining)" for _, label in ANSWER_SETS],
            "rank TargetKG (original → remaining)",
            *[f"MC {label} (original → remaining)" for _, label in ANSWER_SETS],
            "criteria met",
        ]
        lines += md_table(head)
        for r in rows:
            mean = r["seed"] == "mean"

            def sd(k: str, r: dict[str, Any] = r, mean: bool = mean) -> Any:
                return r[f"{k}_seed_std"] if mean else None

            cells = [
                r["ablation"],
                short(r["target_kg"]),
                f"**{r['seed']}**" if mean else r["seed"],
                f"{r['ppl_original_target']:.3g}",
                f"{100 * r['sparsity']:.2f}" + (f" ± {100 * sd('sparsity'):.2f}" if mean else ""),
            ]
            cells += [_fmt(r[f"dppl_{k}"], sd(f"dppl_{k}")) for k, _ in KEYS]
            cells += [
                _fmt(r[f"random_dppl_{k}"], r[f"random_dppl_{k}_std"] if not mean else sd(f"random_dppl_{k}")) for k, _ in KEYS
            ]
            cells += [before_after(r.get(f"top1_original_{k}"), r.get(f"top1_remaining_{k}")) for k, _ in ANSWER_SETS]
            cells.append(before_after(r.get("rank_original_target"), r.get("rank_remaining_target"), ".1f"))
            cells += [before_after(r.get(f"mc_original_{k}"), r.get(f"mc_remaining_{k}")) for k, _ in ANSWER_SETS]
            cells.append("yes" if r["meets_criteria"] else "no")
            lines.append(md_row(cells))
        lines += formats_lines(rows) + config_note(rows) + ablation_lines(rows)
    return "\n".join(lines) + "\n"


# The removal-in-other-formats table (docs/method.md): (row key stem, set, label, format)
FORMAT_COLUMNS = (
    ("top1", "target", "top-1 TargetKG", ".2f"),
    ("mc", "target", "MC TargetKG", ".2f"),
    ("top1", "paraphrases", "top-1 unseen wordings", ".2f"),
    ("mc", "paraphrases", "MC unseen wordings", ".2f"),
    ("lens_top10", "target", "lens top-10 TargetKG (any layer)", ".2f"),
    ("lens_top10", "paraphrases", "lens top-10 unseen wordings", ".2f"),
    ("top1", "control_test", "top-1 ControlKG test", ".2f"),
    ("mc", "control_test", "MC ControlKG test", ".2f"),
    ("ratio", "control_test", "PPL ratio ControlKG test", ".3f"),
    ("mc", "control", "MC ControlKG val", ".2f"),
    ("relearn_top1", "target", "top-1 TargetKG after relearning", ".2f"),
    ("relearn_mc", "target", "MC TargetKG after relearning", ".2f"),
)


def format_cell(r: dict[str, Any], m: str, s: str, spec: str) -> str:
    """``original → remaining [random]``, ``±`` the spread over seeds on a mean row; ``-`` where missing."""
    f = lambda x: "-" if x is None else format(x, spec)
    rem = f(r.get(f"{m}_remaining_{s}"))
    sd = r.get(f"{m}_remaining_{s}_seed_std") if r["seed"] == "mean" else None
    rem += f" ± {format(sd, spec)}" if sd else ""
    orig = "" if m == "ratio" else f"{f(r.get(f'{m}_original_{s}'))} → "
    return f"{orig}{rem} [{f(r.get(f'{m}_random_{s}'))}]"


def formats_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Removal in formats the run never optimized: the answers in the training wording, multiple
    choice, unseen wordings, and the held-out ControlKG part, with the random baseline."""
    cols = [c for c in FORMAT_COLUMNS if any(r.get(f"{c[0]}_remaining_{c[1]}") is not None for r in rows)]
    if not any(c[0] == "mc" for c in cols):
        return []
    chance = next((r[f"mc_chance_{s}"] for r in rows for s in ("target",) if r.get(f"mc_chance_{s}") is not None), None)
    out = [
        "",
        "### Removal in other formats",
        "",
        "original → remaining [random removal of the same size]; MC = multiple choice among same-relation tails "
        + (f"(chance {chance:.2f}); " if chance is not None else "; ")
        + "unseen wordings = the TargetKG in templates the run did not train on; lens top-10 = share of facts whose "
        "tail is in the top 10 of the logit lens at some layer; after relearning = after `evaluate --relearn STEPS` "
        "finetuning on ControlKG sentences, original → remaining (docs/method.md).",
        "",
    ]
    head = ["ablation", "TargetKG", "seed", *[c[2] for c in cols]]
    out += md_table(head)
    for r in rows:
        seed = f"**{r['seed']}**" if r["seed"] == "mean" else r["seed"]
        out.append(md_row([r["ablation"], short(r["target_kg"]), seed] + [format_cell(r, m, s, f) for m, s, _, f in cols]))
    return out


def config_note(rows: list[dict[str, Any]]) -> list[str]:
    """A warning when the runs of one table differ in anything but TargetKG, seed and ablation."""
    cfgs = [r["config"] for r in rows if "config" in r]
    skip = {"seed", "target_kg", "ablation"}
    diff = {k: sorted({json.dumps(c.get(k)) for c in cfgs}) for k in sorted({k for c in cfgs for k in c} - skip)}
    diff = {k: v for k, v in diff.items() if len(v) > 1}
    if not diff:
        return []
    return [
        "",
        "**Warning: these runs differ in their configuration:** "
        + "; ".join(f"{k} ({', '.join(v)})" for k, v in diff.items())
        + ".",
    ]


def ablation_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Loss ablations next to the full objective on the same TargetKG and seed."""
    runs = [r for r in rows if r["seed"] != "mean"]
    full = {(r["target_kg"], r["seed"]): r for r in runs if r["ablation"] == "full"}
    others = [r for r in runs if r["ablation"] != "full" and (r["target_kg"], r["seed"]) in full]
    if not others:
        return []
    head = [
        "ablation",
        "TargetKG",
        "seed",
        "sparsity % (full)",
        "dPPL TargetKG (full)",
        "dPPL ControlKG (full)",
        "dPPL ControlLM (full)",
    ]
    out = ["", "### Loss ablations (each term dropped; the full objective on the same TargetKG and seed in parentheses)", ""]
    out += md_table(head)
    for r in sorted(others, key=lambda r: (r["ablation"], r["target_kg"], r["seed"])):
        f = full[(r["target_kg"], r["seed"])]
        cells = [r["ablation"], short(r["target_kg"]), r["seed"], f"{100 * r['sparsity']:.2f} ({100 * f['sparsity']:.2f})"]
        cells += [f"{_fmt(r[f'dppl_{k}'])} ({_fmt(f[f'dppl_{k}'])})" for k, _ in KEYS]
        out.append(md_row(cells))
    return out


CSV_COLUMNS = ["model", "fingerprint", "ablation", "target_kg", "seed", "meets_criteria", "random_draws"] + NUMERIC


def csv_text(table: list[dict[str, Any]]) -> str:
    return tables.csv_text(table, CSV_COLUMNS + [f"{k}_seed_std" for k in NUMERIC] + ["run"])


def density_png(table: list[dict[str, Any]]) -> bytes:
    """Per-layer density (% of masked weights in the subnetwork), one panel per model, a line per
    run of the full objective (per ablation run only where a model has no full run)."""
    plt = tables.pyplot()
    fps = list(dict.fromkeys(r["fingerprint"] for r in table))
    fig, axes = plt.subplots(1, len(fps), figsize=(5.5 * len(fps), 3.8), squeeze=False)
    for ax, fp in zip(axes[0], fps):
        rows = [r for r in table if r["fingerprint"] == fp and r["seed"] != "mean"]
        model = rows[0]["model"]
        rows = [r for r in rows if r["ablation"] == "full"] or rows  # ablations would dwarf the full objective
        targets = list(dict.fromkeys(r["target_kg"] for r in rows))
        seeds = list(dict.fromkeys(r["seed"] for r in rows))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for r in rows:
            layers = sorted(r["density_per_layer"], key=int)
            ls = "-" if r["ablation"] == "full" else ":"
            ax.plot(
                [int(l) for l in layers],
                [100 * r["density_per_layer"][l] for l in layers],
                ls,
                marker="osd^v<>*"[seeds.index(r["seed"]) % 8],
                color=colors[targets.index(r["target_kg"]) % len(colors)],
                alpha=0.8,
                label=f"{short(r['target_kg'])} s{r['seed']}" + ("" if r["ablation"] == "full" else f" ({r['ablation']})"),
            )
            ax.set_xticks([int(l) for l in layers])
        ax.set_title(f"{short(model)} ({fp[:8]}): density per layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("density (% of masked weights)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return tables.png_bytes(fig, dpi=120)


def write_report_files(base: Path, table: list[dict[str, Any]], infos: list[RunInfo]) -> None:
    md, csv_file, png = (with_added_suffix(base, s) for s in REPORT_SUFFIXES)
    atomic_write_bytes(md, markdown(table, infos).encode())
    atomic_write_bytes(csv_file, csv_text(table).encode())
    atomic_write_bytes(png, density_png(table))
