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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kcs_lens.discovery.run_data import load_run_data
from kcs_lens.discovery.run_model import ModelOverrides
from kcs_lens.discovery.rundir import RunInfo, load_run
from kcs_lens.downstream.config import DownstreamConfig
from kcs_lens.downstream.finetune import FinetuneSettings, Split, before_finetuning, encode, finetune, hidden_features, removed
from kcs_lens.downstream.groups import GROUPS, assign, check_groups, kg_links
from kcs_lens.downstream.summary import before_finetuning_block, summarize
from kcs_lens.downstream.tasks import Question, link, load_links, load_questions
from kcs_lens.errors import ConfigError, TaskError
from kcs_lens.files import atomic_write_bytes, atomic_write_json, check_output_dir
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.lens import LensModel
from kcs_lens.settings import build
from kcs_lens.tables import md_row, md_table

Log = Callable[[str], None]
JSON_NAME, MD_NAME = "downstream.json", "downstream.md"
VAL_SEED = 0  # the validation split of the train file is the same for every run, model and seed


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


@dataclass
class Prepared:
    """Everything read and checked before any finetuning: the model, the encoded questions, and per
    run its linked test questions and their groups."""

    lm: LensModel
    settings: FinetuneSettings
    split: Split
    sizes: dict[str, int]
    plans: list[tuple[RunInfo, list[Question], list[str], dict[str, int]]]


def downstream(
    runs: Sequence[str | os.PathLike[str]],
    config: DownstreamConfig | None = None,
    *,
    subnetwork: str | os.PathLike[str] | None = None,
    overrides: ModelOverrides | None = None,
    lens_model: LensModel | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: bool = False,
    log: Log = print,
    **options: Any,
) -> dict[str, Any]:
    """Run the experiment on one or more discovery runs (see the module docstring); ``options``:
    :class:`~kcs_lens.downstream.config.DownstreamConfig` fields (or pass ``config``).

    Every option is checked, every run, question file and link file read, and the groups formed,
    before any finetuning. Returns the result of the single run, or ``{"runs": [...]}``."""
    if config is not None and options:
        raise ConfigError("pass either a DownstreamConfig or keyword options, not both")
    cfg = (config or build(DownstreamConfig, options)).validate()
    if not runs:
        raise TaskError("give at least one run directory")
    if len(runs) > 1 and out is None:
        raise TaskError("several runs: give --out DIR (one folder per run is written inside)")
    if len(runs) > 1 and subnetwork is not None:
        raise TaskError("--subnetwork replaces the subnetwork of one run; give a single run")
    infos = [load_run(r, subnetwork) for r in runs]
    out_dirs = _out_dirs(infos, out)
    for d in out_dirs:  # writable now, not after the finetuning
        check_output_dir(d, "--out" if out is not None else "RUN")
    prep = prepare(cfg, infos, overrides, lens_model, log)
    results = measure(cfg, prep, progress)
    return write_results(results, out_dirs, out)


def prepare(
    cfg: DownstreamConfig, infos: list[RunInfo], overrides: ModelOverrides | None, lens_model: LensModel | None, log: Log
) -> Prepared:
    """Read the questions and links, load the model, link and group every run's test questions."""
    from kcs_lens.discovery.run_model import check_run_model, load_run_model
    from kcs_lens.model.loading import BUNDLED_NAMES

    train_spec, test_spec = cfg.question_files
    extra = load_links(cfg.links)
    train_all = link(load_questions(train_spec), extra)
    test_qs = link(load_questions(test_spec), extra)
    train_qs, val_qs = split_val(train_all, cfg.val_fraction)
    lm = load_run_model(infos[0], overrides, lens_model=lens_model)
    s = cfg.finetune_settings(bundled=lm.spec in BUNDLED_NAMES)
    plans: list[tuple[RunInfo, list[Question], list[str], dict[str, int]]] = []
    for info in infos:
        check_run_model(info, lm)
        data = load_run_data(info.config, lm, log, text=False)
        qs = link(test_qs, kg_links(data.target, data.control, data.control_val))
        groups = assign(qs, data.target.keys(), data.control.keys() | data.control_val.keys())
        counts = check_groups(groups, qs, test_spec, str(info.config.target_kg), str(info.dir))
        plans.append((info, qs, groups, counts))
    split = Split(encode(train_qs, lm, s.prompt), encode(val_qs, lm, s.prompt), encode(test_qs, lm, s.prompt))
    log(
        f"{len(train_qs)} train / {len(val_qs)} validation / {len(test_qs)} test questions; "
        + "; ".join(f"{p[0].dir.name}: " + ", ".join(f"{g} {n}" for g, n in p[3].items()) for p in plans)
    )
    return Prepared(lm, s, split, {"train": len(train_qs), "val": len(val_qs), "test": len(test_qs)}, plans)


def measure(cfg: DownstreamConfig, prep: Prepared, progress: bool) -> list[dict[str, Any]]:
    """Finetune the original model, then per run the remaining model and the random removals; one
    summarized result per run."""
    from kcs_lens.masks.subnetwork import random_like
    from kcs_lens.progress import Progress

    lm, s, seed_list = prep.lm, prep.settings, cfg.seed_list
    n_steps = s.epochs * math.ceil(prep.sizes["train"] / s.batch_size)
    total = n_steps * len(seed_list) * (1 + len(prep.plans) * (1 + cfg.baseline_draws))
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
                feats = {k: hidden_features(lm, getattr(prep.split, k), s.eval_batch) for k in ("train", "val", "test")}
        if s.mode == "lm":  # one pass, the same for every seed
            before = before_finetuning(lm, prep.split.test, s, removal)
        res = []
        for seed in seed_list:
            r = finetune(lm, prep.split, s, seed, removal, features=feats, on_step=on_step)
            bar.message(f"{what}, seed {seed}: best epoch {r['best_epoch']}, test accuracy {float(r['correct'].mean()):.3f}")
            res.append({"seed": seed, **r})
        return res, before

    t0 = time.time()
    results = []
    try:
        original, original_before = run_model(None, "original")
        for info, qs, groups, _ in prep.plans:
            rem, rem_before = run_model(info.subnetwork, f"{info.dir.name}: remaining")
            draws = [
                run_model(
                    random_like(info.subnetwork, torch.Generator().manual_seed(cfg.baseline_seed + i)),
                    f"{info.dir.name}: random draw {i}",
                )
                for i in range(cfg.baseline_draws)
            ]
            meta = {"settings": saved_settings(cfg, prep), "data": prep.sizes}
            if original_before is not None and rem_before is not None:
                meta["before_finetuning"] = before_finetuning_block(
                    groups, original_before, rem_before, [b for _, b in draws if b is not None]
                )
            res = summarize(info, qs, groups, original, rem, [d[0] for d in draws], cfg.bootstrap, cfg.bootstrap_seed, meta)
            res["seconds"] = round(time.time() - t0, 1)
            results.append(res)
    finally:
        bar.close()
    return results


def saved_settings(cfg: DownstreamConfig, prep: Prepared) -> dict[str, Any]:
    """What ``downstream.json`` records of the settings: the whole config with the finetuning
    values as used (defaults resolved), the seeds as a list, and the model as loaded."""
    train, test = cfg.question_files
    return {
        **cfg.to_dict(),
        **asdict(prep.settings),
        "seeds": cfg.seed_list,
        "val_seed": VAL_SEED,
        "ci_level": 0.95,
        "train": train,
        "test": test,
        "model": prep.lm.spec,
        "backend": prep.lm.backend,
        "device": str(prep.lm.device),
    }


def write_results(results: list[dict[str, Any]], out_dirs: list[Path], out: str | os.PathLike[str] | None) -> dict[str, Any]:
    """``downstream.json`` and ``downstream.md`` per run, and an index of them for several runs."""
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


def _acc(m: dict[str, Any]) -> str:
    return f"{m['accuracy']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"


def _diff(d: dict[str, Any]) -> str:
    return f"{d['difference']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"


def markdown(res: dict[str, Any]) -> str:
    """One run's table: accuracy per group and model, differences with McNemar p per seed."""
    st = res["settings"]
    groups = [g for g in GROUPS if res["groups"][g]]
    lines = [
        f"# downstream: {res['run']} (TargetKG {res['target_kg']}, seed {res['seed']})",
        "",
        f"finetune {st['mode']}, {st['epochs']} epoch{'s' if st['epochs'] != 1 else ''}, lr {st['lr']:g}, batch {st['batch_size']}, seeds "
        f"{','.join(map(str, st['seeds']))}, {st['baseline_draws']} random draws; train {st['train']} "
        f"({res['data']['train']} + {res['data']['val']} validation), test {st['test']}. Accuracy: mean over seeds "
        "[95% bootstrap interval over questions]; McNemar p per seed (random: per seed and draw, smallest).",
        "",
        *md_table(["model", *(f"{g} (n={res['groups'][g]})" for g in groups)]),
    ]
    for m in ("original", "remaining", "random"):
        lines.append(md_row([m, *(_acc(res["models"][m][g]) for g in groups)]))
    before = res.get("before_finetuning")
    if before:
        for m in ("original", "remaining", "random"):
            lines.append(md_row([f"{m}, before finetuning", *(f"{before[m][g]:.3f}" for g in groups)]))
    for m in ("remaining", "random"):
        cells = []
        for g in groups:
            d = res["differences"][m][g]
            ps = [e["mcnemar"]["p"] if "mcnemar" in e else min(x["p"] for x in e["mcnemar_per_draw"]) for e in d["per_seed"]]
            cells.append(_diff(d) + " p " + "/".join(f"{p:.2g}" for p in ps))
        lines.append(md_row([f"{m} - original", *cells]))
    lines += ["", res["headline"]["statement"], ""]
    return "\n".join(lines)


def combined_markdown(results: list[dict[str, Any]]) -> str:
    """One row per run: accuracy drops per group, the random baseline's, and the verdict."""
    head = ["run", "TargetKG", "removed, before finetuning: original -> remaining", "removed: original -> remaining"]
    head += ["remaining - original: removed", "kept", "unlinked", "random - original: removed", "kept", "held"]
    lines = ["# downstream: every run", "", *md_table(head)]
    for r in results:
        d, x = r["differences"]["remaining"], r["differences"]["random"]
        cell = lambda dd, g: _diff(dd[g]) if g in dd else ""
        o, m = r["models"]["original"]["removed"]["accuracy"], r["models"]["remaining"]["removed"]["accuracy"]
        bf = r.get("before_finetuning")
        zs = f"{bf['original']['removed']:.3f} -> {bf['remaining']['removed']:.3f}" if bf else "-"
        cells = [Path(r["run"]).name, r["target_kg"], zs, f"{o:.3f} -> {m:.3f}", cell(d, "removed"), cell(d, "kept")]
        cells += [cell(d, "unlinked"), cell(x, "removed"), cell(x, "kept"), "yes" if r["headline"]["held"] else "no"]
        lines.append(md_row(cells))
    n = sum(r["headline"]["held"] for r in results)
    lines += ["", f"The prediction held in {n} of {len(results)} runs.", ""]
    return "\n".join(lines)
