"""docs/families.md's acceptance tables from studies of the two bundled models: per model
and TargetKG, mean ± std over seeds of sparsity, the PPL ratios and the random baseline (from each
study's ``study.json``, written by ``kcs-lens report DIR``), and the subnetworks' density per
masked block and matrix (mean over every run of the study).

    kcs-lens sweep study.toml --out studies/gpt2 && kcs-lens report studies/gpt2
    python scripts/acceptance_tables.py studies/gpt2 studies/llama [--target-kgs building,location,change]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kcs_lens.discovery.rundir import load_run  # noqa: E402
from kcs_lens.model.canonical import MATRICES  # noqa: E402


def pm(g: dict, key: str, fmt: str) -> str:
    return f"{g[key]:{fmt}} ± {g[key + '_seed_std']:{fmt}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="+", type=Path)
    ap.add_argument("--target-kgs", default="", help="comma list (default: every group)")
    a = ap.parse_args()
    keep = set(filter(None, a.target_kgs.split(",")))
    print(
        "| model | TargetKG | seeds | sparsity % | target PPL ratio | ControlKG ratio | LM ratio | TargetKG top-1 after | criteria met | random dPPL TargetKG / ControlKG / ControlLM |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    density: dict[str, dict[int, dict[str, list[float]]]] = {}
    for study in a.studies:
        data = json.loads((study / "study.json").read_text())
        for g in data["groups"]:
            if keep and g["target_kg"] not in keep:
                continue
            runs = [r for r in data["runs"] if r["group"] == g["group"]]
            met = sum(bool(r["meets_criteria"]) for r in runs)
            sp = f"{100 * g['sparsity']:.2f} ± {100 * g['sparsity_seed_std']:.2f}"
            rnd = " / ".join(f"{g['random_dppl_' + k]:+.3g}" for k in ("target", "control", "lm"))
            print(
                f"| {g['model']} | {g['target_kg']} | {g['n_seeds']} | {sp} | {pm(g, 'ratio_target', '.1f')} | "
                f"{pm(g, 'ratio_control', '.3f')} | {pm(g, 'ratio_lm', '.3f')} | {pm(g, 'top1_remaining_target', '.2f')} | "
                f"{met}/{len(runs)} | {rnd} |"
            )
            for r in runs:
                st = load_run(r["run"]).subnetwork.density_stats()
                for layer, mats in st["density"]["per_layer_matrix"].items():
                    for m, v in mats.items():
                        density.setdefault(g["model"], {}).setdefault(int(layer), {}).setdefault(m, []).append(100 * v)
    print()
    print("| model | block | " + " | ".join(MATRICES) + " |")
    print("|---|---|" + "---|" * len(MATRICES))
    for model, layers in density.items():
        for layer, mats in sorted(layers.items()):
            cells = [f"{sum(mats[m]) / len(mats[m]):.2f}" if m in mats else "–" for m in MATRICES]
            print(f"| {model} | {layer} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
