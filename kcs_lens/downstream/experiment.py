"""``kcs-lens downstream``: finetune the original, the remaining and randomly pruned models on a
multiple-choice task and compare their accuracy on questions that need the removed knowledge.

Per run: the original model (shared by all runs of the same model), the remaining model (the
run's subnetwork removed as ``evaluate`` removes it) and ``baseline_draws`` random removals of the
same size per matrix (``evaluation.random_like``, seeds ``baseline_seed + i`` as in ``baseline``),
each finetuned once per seed on the same batches. Writes ``downstream.json`` and
``downstream.md`` (see :func:`summarize` for the JSON's shape).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kcs_lens.discovery.rundir import RunInfo, load_run, load_run_data
from kcs_lens.downstream.finetune import FinetuneSettings, Split, before_finetuning, encode, finetune, hidden_features, removed
from kcs_lens.downstream.groups import GROUPS, assign, check_groups, kg_links
from kcs_lens.downstream.stats import bootstrap_ci, bootstrap_indices, mcnemar
from kcs_lens.downstream.tasks import Question, link, load_links, load_questions
from kcs_lens.errors import TaskError
from kcs_lens.files import atomic_write_bytes, atomic_write_json, check_output_dir
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.backends import LensModel

Log = Callable[[str], None]
TASKS = {"bundled": ("bundled:train", "bundled:test")}
JSON_NAME, MD_NAME = "downstream.json", "downstream.md"
VAL_SEED = 0  # the validation split of the train file is the same for every run, model and seed


def parse_seeds(text: str | Sequence[int]) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3] (distinct integers, at least one)."""
    if isinstance(text, str):
        try:
            seeds = [int(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise TaskError(f"--seeds {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    else:
        seeds = [int(x) for x in text]
    if not seeds or len(set(seeds)) != len(seeds):
        raise TaskError(f"--seeds {text!r}: expected one or more distinct integers")
    bad = [x for x in seeds if not 0 <= x < 2**63]
    if bad:
        raise TaskError(f"--seeds {text!r}: seed {bad[0]} is out of range; seeds are integers in [0, 2^63)")
    return seeds


def resolve_task(task: str | None, train: str | None, test: str | None) -> tuple[str, str]:
    if task is not None:
        if task not in TASKS:
            raise TaskError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
        if train or test:
            raise TaskError("--task and --train/--test: give either a task or the two files")
        return TASKS[task]
    if not train or not test:
        raise TaskError("give --train and --test question files (or --task bundled)")
    return train, test


def split_val(questions: list[Question], fraction: float) -> tuple[list[Question], list[Question]]:
    """(train, validation): a fixed random ``fraction`` of the train file is held out."""
    n_val = int(round(fraction * len(questions)))
    perm = torch.randperm(len(questions), generator=torch.Generator().manual_seed(VAL_SEED)).tolist()
    val = set(perm[:n_val])
    tr = [q for i, q in enumerate(questions) if i not in val]
    if not tr:
        raise TaskError(f"--val-fraction {fraction}: leaves no training question of {len(questions)}")
    if not val:
        raise TaskError(f"--val-fraction {fraction}: holds out no question of {len(questions)}; raise it")
    return tr, [q for i, q in enumerate(questions) if i in val]


def downstream(
    runs: Sequence[str | os.PathLike[str]],
    *,
    train: str | None = None,
    test: str | None = None,
    task: str | None = None,
    links: Sequence[str] = (),
    settings: FinetuneSettings | None = None,
    seeds: str | Sequence[int] = (1, 2, 3),
    baseline_draws: int = 3,
    baseline_seed: int = 0,
    val_fraction: float = 0.1,
    bootstrap: int = 1000,
    bootstrap_seed: int = 0,
    subnetwork: str | os.PathLike[str] | None = None,
    model: str | None = None,
    backend: str | None = None,
    device: str | None = None,
    lens_model: LensModel | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Run the experiment on one or more discovery runs (see the module docstring).

    Every option is checked, every run, question file and link file read, and the groups formed,
    before any finetuning. Returns the result of the single run, or ``{"runs": [...]}``."""
    from kcs_lens.evaluation.evaluate import check_model, random_like
    from kcs_lens.model.loading import BUNDLED_NAMES, load_model

    settings = settings or FinetuneSettings()
    settings.resolved()  # the checks, before anything is read
    seed_list = parse_seeds(seeds)
    train_spec, test_spec = resolve_task(task, train, test)
    if not runs:
        raise TaskError("give at least one run directory")
    if baseline_draws < 1:
        raise TaskError(f"--baseline-draws must be at least 1, got {baseline_draws}")
    if not 0.0 < val_fraction < 1.0:
        raise TaskError(f"--val-fraction must be in (0, 1) (the held-out share picks the best epoch), got {val_fraction}")
    if bootstrap < 100:
        raise TaskError(f"--bootstrap must be at least 100 resamples, got {bootstrap}")
    if len(runs) > 1 and out is None:
        raise TaskError("several runs: give --out DIR (one folder per run is written inside)")
    if len(runs) > 1 and subnetwork is not None:
        raise TaskError("--subnetwork replaces the subnetwork of one run; give a single run")
    infos = [load_run(r, subnetwork) for r in runs]
    for d in _out_dirs(infos, out):  # writable now, not after the finetuning
        check_output_dir(d, "--out" if out is not None else "RUN")

    extra = load_links(links)
    train_all = link(load_questions(train_spec), extra)
    test_qs = link(load_questions(test_spec), extra)
    train_qs, val_qs = split_val(train_all, val_fraction)

    cfg0 = infos[0].config
    lm = lens_model or load_model(model or cfg0.model, backend=backend or cfg0.backend, device=device or cfg0.device)
    s = settings.resolved(bundled=lm.spec in BUNDLED_NAMES)
    plans: list[tuple[RunInfo, list[Question], list[str], dict[str, int]]] = []
    for info in infos:
        check_model(info, lm)
        data = load_run_data(info.config, lm, log, text=False)
        ids = kg_links(data.target, data.control, data.control_val)
        qs = link(test_qs, ids)
        target = data.target.keys()
        control = data.control.keys() | data.control_val.keys()
        groups = assign(qs, target, control)
        counts = check_groups(groups, qs, test_spec, str(info.config.target_kg), str(info.dir))
        plans.append((info, qs, groups, counts))
    split = Split(encode(train_qs, lm, s.prompt), encode(val_qs, lm, s.prompt), encode(test_qs, lm, s.prompt))
    out_dirs = _out_dirs(infos, out)
    log(
        f"{len(train_qs)} train / {len(val_qs)} validation / {len(test_qs)} test questions; "
        + "; ".join(f"{p[0].dir.name}: " + ", ".join(f"{g} {n}" for g, n in p[3].items()) for p in plans)
    )

    n_steps = s.epochs * math.ceil(len(train_qs) / s.batch_size)
    total = n_steps * len(seed_list) * (1 + len(infos) * (1 + baseline_draws))
    from kcs_lens.progress import Progress

    bar = Progress(total, 0, enabled=progress, label=f"downstream ({s.mode})")
    done = [0]

    def on_step(loss: float) -> None:
        done[0] += 1
        bar.update(done[0], {"loss": loss})

    def run_model(removal: Subnetwork | None, what: str) -> tuple[list[dict[str, Any]], np.ndarray | None]:
        """Per seed, the finetuned result; and (``lm`` only) the test correctness before finetuning."""
        feats, before = None, None
        if s.mode == "head":  # the frozen model's features, once for every seed
            with removed(lm, removal):
                feats = {k: hidden_features(lm, getattr(split, k), s.eval_batch) for k in ("train", "val", "test")}
        if s.mode == "lm":  # one pass, the same for every seed
            before = before_finetuning(lm, split.test, s, removal)
        res = []
        for seed in seed_list:
            r = finetune(lm, split, s, seed, removal, features=feats, on_step=on_step)
            bar.message(f"{what}, seed {seed}: best epoch {r['best_epoch']}, test accuracy {float(r['correct'].mean()):.3f}")
            res.append({"seed": seed, **r})
        return res, before

    t0 = time.time()
    results = []
    try:
        original, original_before = run_model(None, "original")
        for info, qs, groups, _ in plans:
            rem, rem_before = run_model(info.subnetwork, f"{info.dir.name}: remaining")
            draws = [
                run_model(
                    random_like(info.subnetwork, torch.Generator().manual_seed(baseline_seed + i)),
                    f"{info.dir.name}: random draw {i}",
                )
                for i in range(baseline_draws)
            ]
            rnd = [d[0] for d in draws]
            meta = {
                "settings": {
                    **asdict(s),
                    "seeds": seed_list,
                    "baseline_draws": baseline_draws,
                    "baseline_seed": baseline_seed,
                    "val_fraction": val_fraction,
                    "val_seed": VAL_SEED,
                    "bootstrap": bootstrap,
                    "bootstrap_seed": bootstrap_seed,
                    "ci_level": 0.95,
                    "train": train_spec,
                    "test": test_spec,
                    "links": list(links),
                    "model": lm.spec,
                    "backend": lm.backend,
                    "device": str(lm.device),
                },
                "data": {"train": len(train_qs), "val": len(val_qs), "test": len(test_qs)},
            }
            if original_before is not None and rem_before is not None:
                meta["before_finetuning"] = before_finetuning_block(
                    groups, original_before, rem_before, [b for _, b in draws if b is not None]
                )
            res = summarize(info, qs, groups, original, rem, rnd, bootstrap, bootstrap_seed, meta)
            res["seconds"] = round(time.time() - t0, 1)
            results.append(res)
    finally:
        bar.close()

    for res, d in zip(results, out_dirs):
        atomic_write_json(d / JSON_NAME, res)
        atomic_write_bytes(d / MD_NAME, markdown(res).encode())
    if len(results) == 1:
        results[0]["files"] = [str(out_dirs[0] / JSON_NAME), str(out_dirs[0] / MD_NAME)]
        return results[0]
    root = Path(out)  # type: ignore[arg-type]
    index = {
        "runs": [{"run": r["run"], "file": str(d / JSON_NAME), "headline": r["headline"]} for r, d in zip(results, out_dirs)],
        "settings": results[0]["settings"],
    }
    atomic_write_json(root / JSON_NAME, index)
    atomic_write_bytes(root / MD_NAME, combined_markdown(results).encode())
    return {"runs": results, "files": [str(root / JSON_NAME), str(root / MD_NAME)]}


def _out_dirs(infos: list[RunInfo], out: str | os.PathLike[str] | None) -> list[Path]:
    if out is None:
        return [infos[0].dir]
    root = Path(out)
    if len(infos) == 1:
        return [root]
    names: list[str] = []
    for info in infos:
        n = info.dir.name
        names.append(n if n not in names else f"{n}-{len(names)}")
    return [root / n for n in names]


# ------------------------------------------------------------------------------------------
# Statistics and the output's shape
# ------------------------------------------------------------------------------------------
def summarize(
    info: RunInfo,
    questions: list[Question],
    groups: list[str],
    original: list[dict[str, Any]],
    remaining: list[dict[str, Any]],
    random: list[list[dict[str, Any]]],
    n_boot: int,
    boot_seed: int,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The result of one run::

        {"run": ..., "groups": {"removed": N, "kept": N, "unlinked": N},
         "models": {"original": M, "remaining": M, "random": M},
         "differences": {"remaining": D, "random": D}, "headline": {...}, "settings": ..., ...}

    ``M[group]`` = {"accuracy": mean over seeds (and draws), "ci": 95% bootstrap interval over
    questions, "per_seed": [{"seed", "accuracy", "ci"(, "per_draw")}]}; ``D[group]`` = {"difference":
    mean over seeds of (model - original), "ci", "per_seed": [{"seed", "difference", "mcnemar":
    {"b", "c", "p"}}]}. A group with no questions is left out."""
    from kcs_lens.evaluation.evaluate import run_header

    orig = np.stack([r["correct"] for r in original]).astype(np.float64)  # [seed, q]
    rem = np.stack([r["correct"] for r in remaining]).astype(np.float64)
    rnd = np.stack([np.stack([r["correct"] for r in draw]) for draw in random]).astype(np.float64)  # [draw, seed, q]
    g = np.array(groups)
    seeds = [r["seed"] for r in original]
    models: dict[str, dict[str, Any]] = {"original": {}, "remaining": {}, "random": {}}
    diffs: dict[str, dict[str, Any]] = {"remaining": {}, "random": {}}
    for gi, group in enumerate(GROUPS):
        sel = g == group
        if not sel.any():
            continue
        idx = bootstrap_indices(int(sel.sum()), n_boot, boot_seed + gi)
        o, r, x = orig[:, sel], rem[:, sel], rnd[:, :, sel]

        models["original"][group] = _block(o, idx, seeds)
        models["remaining"][group] = _block(r, idx, seeds)
        models["random"][group] = _block(x.mean(0), idx, seeds, per_draw=x)
        diffs["remaining"][group] = {
            "difference": float(r.mean() - o.mean()),
            "ci": bootstrap_ci(r.mean(0) - o.mean(0), idx),
            "per_seed": [
                {"seed": seed, "difference": float(r[k].mean() - o[k].mean()), "mcnemar": mcnemar(o[k], r[k])}
                for k, seed in enumerate(seeds)
            ],
        }
        diffs["random"][group] = {
            "difference": float(x.mean() - o.mean()),
            "ci": bootstrap_ci(x.mean((0, 1)) - o.mean(0), idx),
            "per_seed": [
                {
                    "seed": seed,
                    "difference": float(x[:, k].mean() - o[k].mean()),
                    "mcnemar_per_draw": [mcnemar(o[k], x[d, k]) for d in range(x.shape[0])],
                }
                for k, seed in enumerate(seeds)
            ],
        }
    same = all(
        len({m["order_sha"] for m in [original[k], remaining[k], *[d[k] for d in random]]}) == 1 for k in range(len(seeds))
    )
    if not same:  # a bug: every model must see the same batches
        raise RuntimeError("the compared models were not finetuned on the same batches")
    train = lambda rs: [{k: v for k, v in r.items() if k != "correct"} for r in rs]
    return {
        **run_header(info),
        "groups": {k: groups.count(k) for k in GROUPS},
        "models": models,
        "differences": diffs,
        "headline": headline(diffs),
        **meta,
        "same_batches": same,
        "training": {"original": train(original), "remaining": train(remaining), "random": [train(d) for d in random]},
        "questions": [{"id": q.id, "group": grp} for q, grp in zip(questions, groups)],
        "correct": {
            "original": {str(r["seed"]): r["correct"].tolist() for r in original},
            "remaining": {str(r["seed"]): r["correct"].tolist() for r in remaining},
            "random": [{str(r["seed"]): r["correct"].tolist() for r in d} for d in random],
        },
    }


def before_finetuning_block(
    groups: list[str], original: np.ndarray, remaining: np.ndarray, random: list[np.ndarray]
) -> dict[str, dict[str, float]]:
    """``lm`` style: accuracy per model and group of the models as they are, before finetuning
    (random: the mean over draws); one deterministic pass, so no seeds."""
    g = np.array(groups)
    rnd = np.stack(random).astype(np.float64)
    out: dict[str, dict[str, float]] = {"original": {}, "remaining": {}, "random": {}}
    for group in GROUPS:
        sel = g == group
        if sel.any():
            out["original"][group] = float(original[sel].mean())
            out["remaining"][group] = float(remaining[sel].mean())
            out["random"][group] = float(rnd[:, sel].mean())
    return out


def _block(a: np.ndarray, idx: np.ndarray, seeds: list[int], per_draw: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy (mean over seeds), its interval and the per-seed values of correctness ``a[seed, q]``
    (for random draws: ``a`` = the mean over draws, ``per_draw[draw, seed, q]``)."""
    per = []
    for k, seed in enumerate(seeds):
        e: dict[str, Any] = {"seed": seed, "accuracy": float(a[k].mean()), "ci": bootstrap_ci(a[k], idx)}
        if per_draw is not None:
            e["per_draw"] = [float(v) for v in per_draw[:, k].mean(1)]
        per.append(e)
    flat = a.mean(0)
    return {"accuracy": float(flat.mean()), "ci": bootstrap_ci(flat, idx), "per_seed": per}


def headline(diffs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether the paper's prediction held, by three stated criteria on the 95% intervals."""
    rem, rnd = diffs["remaining"], diffs["random"]
    d_removed = rem["removed"]["difference"]
    c1 = rem["removed"]["ci"][1] < 0
    c2 = None if "kept" not in rem else rem["kept"]["difference"] > d_removed / 2
    c3 = all(rnd[g]["ci"][1] >= 0 for g in ("removed", "kept") if g in rnd)
    criteria = {
        "remaining drops on removed (interval of the difference below 0)": c1,
        "remaining drops on kept by less than half its drop on removed": c2,
        "random removal drops neither removed nor kept (intervals reach 0)": c3,
    }
    held = c1 and c3 and c2 is not False
    f = lambda d: f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
    parts = [f"remaining - original: removed {f(rem['removed'])}"]
    if "kept" in rem:
        parts.append(f"kept {f(rem['kept'])}")
    parts.append(f"random - original: removed {f(rnd['removed'])}" + (f", kept {f(rnd['kept'])}" if "kept" in rnd else ""))
    failed = [k for k, v in criteria.items() if v is False]
    text = ("HELD: " if held else "NOT HELD: ") + "; ".join(parts) + ("" if held else " (failed: " + "; ".join(failed) + ")")
    return {"held": held, "criteria": criteria, "statement": text}


# ------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------
def _acc(m: dict[str, Any]) -> str:
    return f"{m['accuracy']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"


def _diff(d: dict[str, Any]) -> str:
    return f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def markdown(res: dict[str, Any]) -> str:
    """One run's table: accuracy per group and model, differences with McNemar p per seed."""
    st = res["settings"]
    groups = [g for g in GROUPS if res["groups"][g]]
    head = "| model | " + " | ".join(f"{g} (n={res['groups'][g]})" for g in groups) + " |"
    lines = [
        f"# downstream: {res['run']} (TargetKG {res['target_kg']}, seed {res['seed']})",
        "",
        f"finetune {st['mode']}, {st['epochs']} epoch{'s' if st['epochs'] != 1 else ''}, lr {st['lr']:g}, batch {st['batch_size']}, seeds "
        f"{','.join(map(str, st['seeds']))}, {st['baseline_draws']} random draws; train {st['train']} "
        f"({res['data']['train']} + {res['data']['val']} validation), test {st['test']}. Accuracy: mean over seeds "
        "[95% bootstrap interval over questions]; McNemar p per seed (random: per seed and draw, smallest).",
        "",
        head,
        "|" + "---|" * (len(groups) + 1),
    ]
    for m in ("original", "remaining", "random"):
        lines.append(f"| {m} | " + " | ".join(_acc(res["models"][m][g]) for g in groups) + " |")
    before = res.get("before_finetuning")
    if before:
        for m in ("original", "remaining", "random"):
            lines.append(f"| {m}, before finetuning | " + " | ".join(f"{before[m][g]:.3f}" for g in groups) + " |")
    for m in ("remaining", "random"):
        cells = []
        for g in groups:
            d = res["differences"][m][g]
            ps = [e["mcnemar"]["p"] if "mcnemar" in e else min(x["p"] for x in e["mcnemar_per_draw"]) for e in d["per_seed"]]
            cells.append(_diff(d) + " p " + "/".join(f"{p:.2g}" for p in ps))
        lines.append(f"| {m} - original | " + " | ".join(cells) + " |")
    lines += ["", res["headline"]["statement"], ""]
    return "\n".join(lines)


def combined_markdown(results: list[dict[str, Any]]) -> str:
    """One row per run: accuracy drops per group, the random baseline's, and the verdict."""
    lines = [
        "# downstream: every run",
        "",
        "| run | TargetKG | removed, before finetuning: original -> remaining | removed: original -> remaining | "
        "remaining - original: removed | kept | unlinked | random - original: removed | kept | held |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d, x = r["differences"]["remaining"], r["differences"]["random"]
        cell = lambda dd, g: _diff(dd[g]) if g in dd else ""
        o, m = r["models"]["original"]["removed"]["accuracy"], r["models"]["remaining"]["removed"]["accuracy"]
        bf = r.get("before_finetuning")
        zs = f"{bf['original']['removed']:.3f} -> {bf['remaining']['removed']:.3f}" if bf else "-"
        lines.append(
            f"| {Path(r['run']).name} | {r['target_kg']} | {zs} | {o:.3f} -> {m:.3f} | {cell(d, 'removed')} | {cell(d, 'kept')} | "
            f"{cell(d, 'unlinked')} | {cell(x, 'removed')} | {cell(x, 'kept')} | {'yes' if r['headline']['held'] else 'no'} |"
        )
    n = sum(r["headline"]["held"] for r in results)
    lines += ["", f"The prediction held in {n} of {len(results)} runs.", ""]
    return "\n".join(lines)
