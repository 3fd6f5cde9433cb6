"""Terminal tables of evaluation results (``evaluate``, ``baseline``, ``report``): metrics per set,
multiple-choice notes, relearning, the subnetwork's density; fitted to 80 columns."""

from typing import Any

# two lines where long, so that the tables fit 80 columns
SET_LABELS = {
    "target": "TargetKG",
    "control": "ControlKG\n(val)",
    "control_test": "ControlKG\n(test, held\nout)",
    "lm": "ControlLM\n(held-out)",
    "paraphrases": "unseen\nwordings",
}


def console():
    from kcs_lens.progress import terminal

    return terminal()


def set_label(name: str) -> str:
    return SET_LABELS.get(name, name)


def cell(x: Any, spec: str = ".3f") -> str:
    """A table cell; '-' for a value the run's files lack (older runs, or no original to compare)."""
    return "-" if x is None else format(x, spec)


def metrics_tables(res: dict[str, Any], title: str) -> list[Any]:
    """Two tables per evaluation, each fitting 80 columns: PPL, top-k and rank; then the multiple
    choice and the per-triplet rank and log-prob changes (mean [min, max])."""
    from kcs_lens.progress import table

    main = table(title, ["set", "model", "PPL", "dPPL", "ratio", "top-1", "top-5", "top-10", "rank"], left=2)
    more = table(
        "multiple choice (MC; chance) and per-triplet change vs the original: mean [min,max]",
        ["set", "model", "MC (chance)", "MC norm", "d rank", "d logprob"],
        left=2,
    )
    m = res["metrics"]
    for s in m["original"]:
        for v in m:
            x = m[v][s]
            rng = lambda k, f, g, x=x: (
                "" if f"{k}_mean" not in x else f"{x[k + '_mean']:+.{f}f} [{x[k + '_min']:+.{g}f},{x[k + '_max']:+.{g}f}]"
            )
            label = set_label(s) if v == "original" else ""
            kg = s != "lm"
            main.add_row(
                label,
                v,
                cell(x["ppl"]),
                cell(x.get("dppl"), "+.3f") if v != "original" else "",
                cell(x.get("ppl_ratio")) if v != "original" else "",
                *((cell(x.get(f"top{k}"), ".2f") if kg else "") for k in (1, 5, 10)),
                cell(x.get("rank_mean"), ".1f") if kg else "",
            )
            if kg:
                more.add_row(
                    label,
                    v,
                    f"{x['mc']:.2f} ({x['mc_chance']:.2f})" if "mc" in x else "",
                    cell(x.get("mc_norm"), ".2f") if "mc" in x else "",
                    rng("drank", 1, 0),
                    rng("dlogprob", 2, 2),
                )
    return [main, more]


def relearn_table(r: dict[str, Any]):
    """Before -> after relearning, original and remaining model, per set."""
    from kcs_lens.progress import table

    rec = r["recovered"]
    share = lambda x: "-" if x is None else f"{100 * x:.0f}%"
    t = table(
        f"relearning ({r['steps']} steps): TargetKG drop recovered: top-1 {share(rec['top1'])}, MC {share(rec['mc'])}",
        ["set", "model", "top-1", "MC", "PPL"],
        left=2,
    )
    t.caption = (
        f"before → after finetuning on the {r['data']} (lr {r['lr']:g}, batch {r['batch_size']}, seed {r['seed']}); "
        "removed weights held at zero"
    )
    for s in r["remaining"]["before"]:
        for v in ("original", "remaining"):
            b, a = r[v]["before"].get(s, {}), r[v]["after"].get(s, {})
            ba = lambda k, spec=".2f", b=b, a=a: f"{cell(b.get(k), spec)} → {cell(a.get(k), spec)}" if k in b else ""
            t.add_row(set_label(s) if v == "original" else "", v, ba("top1"), ba("mc"), ba("ppl", ".3f"))
    return t


def print_choice_notes(c, sets: dict[str, Any]) -> None:
    """How the multiple choice was drawn, and the sets whose relations had too few tails for k choices."""
    mcs = {k: v["multiple_choice"] for k, v in sets.items() if "multiple_choice" in v}
    if not mcs:
        return
    k = next(iter(mcs.values()))["k"]
    c.print(
        f"multiple choice (MC): the true tail against up to {k - 1} other tails of its relation (fixed seed); MC = share "
        "where it has the highest summed log-prob, MC norm = the same per token; chance in brackets"
    )
    for name, d in mcs.items():
        if d["n_short"] or d["n_skipped"]:
            c.print(
                f"  {set_label(name)}: {d['n_short']} triplet(s) had fewer than {d['k']} choices (too few other tails of their "
                f"relation), {d['n_skipped']} none (left out)"
            )


def print_subnetwork(c, st: dict[str, Any]) -> None:
    from kcs_lens.progress import table

    d = st["density"]
    mats = list(d["per_matrix"])
    t = table("density (% of weights in the subnetwork)", ["layer", *mats, "all"])
    for l, row in d["per_layer_matrix"].items():
        t.add_row(l, *[f"{100 * row[m]:.2f}" for m in mats], f"{100 * d['per_layer'][l]:.2f}")
    t.add_row("all", *[f"{100 * d['per_matrix'][m]:.2f}" for m in mats], f"{100 * (1 - st['sparsity']):.2f}")
    c.print(t)
    for l, heads in d["per_head"].items():
        c.print(
            f"layer {l} density per head (heads 0-{len(heads['all']) - 1}, Q,K,V,O together) %: "
            + " ".join(f"{100 * x:.2f}" for x in heads["all"])
        )
    lg = st["logits"]
    c.print(
        f"sparsity {100 * st['sparsity']:.3f}% of masked weights, {100 * st['sparsity_all_linear']:.3f}% of all linear weights "
        f"({st['n_in_subnetwork']} of {st['n_masked']} masked weights in the subnetwork); mask probabilities near 0: "
        f"{100 * lg['near_0']:.1f}%, near 1: {100 * lg['near_1']:.1f}% (within {lg['near_threshold']})"
    )
