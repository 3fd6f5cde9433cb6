"""Layer x head heatmaps (last column: the MLP layer) as PNG files, for papers and the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from jaxtyping import Float

from kcs_lens.tables import pyplot, save_png

METHODS = ("density", "knockout", "patching", "attribution", "dla")
METHOD_TITLES = {
    "density": "subnetwork density",
    "knockout": "knock-out (logp drop)",
    "patching": "activation patching (logp drop)",
    "attribution": "attribution patching (est. logp drop)",
    "dla": "direct logit attribution",
}


def unit_grid(heads: Float[np.ndarray, "L H"], mlp: Float[np.ndarray, " L"]) -> Float[np.ndarray, "L Hp1"]:
    return np.concatenate([np.asarray(heads, float), np.asarray(mlp, float)[:, None]], axis=1)


def _draw(ax, grid: np.ndarray, title: str, signed: bool, annotate: bool):
    plt = pyplot()
    L, W = grid.shape
    cmap = plt.get_cmap("RdBu_r" if signed else "viridis").with_extremes(bad="#d9d9d9")
    finite = grid[np.isfinite(grid)]
    if signed:
        m = float(np.abs(finite).max()) if finite.size else 1.0
        vmin, vmax = -(m or 1.0), (m or 1.0)
    else:
        vmin, vmax = 0.0, (float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.axvline(W - 1.5, color="black", lw=1.5)
    ax.set_xticks(range(W), [f"H{h}" for h in range(W - 1)] + ["MLP"], fontsize=8)
    ax.set_yticks(range(L), [f"L{l}" for l in range(L)], fontsize=8)
    ax.set_title(title, fontsize=10)
    if annotate:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                dark = abs(v - (vmin + vmax) / 2) > 0.3 * (vmax - vmin) if signed else v < 0.6 * vmax
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
    return im


def heatmap_png(grid: np.ndarray, title: str, path: str | Path, *, signed: bool) -> Path:
    """One heatmap; NaN cells (not masked / not defined) are grey."""
    plt = pyplot()
    L, W = grid.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * W, 1.2 + 0.42 * L), dpi=110)
    im = _draw(ax, grid, title, signed, annotate=L * W <= 160)
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
    fig.tight_layout()
    return save_png(fig, path)


def heatmap_row_png(
    grids: Sequence[np.ndarray], titles: Sequence[str], signed: Sequence[bool], path: str | Path, suptitle: str = ""
) -> Path:
    """Several heatmaps side by side in one figure."""
    plt = pyplot()
    L, W = grids[0].shape
    n = len(grids)
    fig, axes = plt.subplots(1, n, figsize=(n * (1.9 + 0.55 * W), 1.5 + 0.42 * L), dpi=110, squeeze=False)
    for ax, g, t, s in zip(axes[0], grids, titles, signed):
        im = _draw(ax, g, t, s, annotate=L * W <= 160)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    return save_png(fig, path)


def structure_png(st: dict, path: str | Path) -> Path:
    """Density of the subnetwork per head in W_Q, W_K, W_V, W_O, per MLP matrix, and per MLP
    neuron (input column of W_in + output row of W_out) of each masked layer."""
    plt = pyplot()
    heads = [np.asarray(st["head_by_matrix"][m], float) for m in ("W_Q", "W_K", "W_V", "W_O")]
    mlp: Float[np.ndarray, "L 2"] = np.stack([np.asarray(st["mlp_by_matrix"][m], float) for m in ("W_in", "W_out")], axis=1)
    L, H = heads[0].shape
    neurons = st.get("mlp_neuron") or {}
    n_panels = 5 + bool(neurons)
    widths = [1.0 + 0.5 * H] * 4 + [1.0 + 0.5 * 2] + ([4.0] if neurons else [])
    fig, axes = plt.subplots(
        1, n_panels, figsize=(sum(widths) + 1.5 * n_panels, 1.6 + 0.42 * L), dpi=110, gridspec_kw={"width_ratios": widths}
    )
    finite = np.concatenate([g[np.isfinite(g)] for g in heads + [mlp]] + [np.zeros(1)])
    vmax = float(finite.max()) or 1.0
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    for ax, g, t in zip(axes, heads + [mlp], ("W_Q", "W_K", "W_V", "W_O", "MLP")):
        im = ax.imshow(np.ma.masked_invalid(g), cmap=cmap, vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(f"{t} density", fontsize=10)
        ax.set_yticks(range(L), [f"L{l}" for l in range(L)], fontsize=8)
        ax.set_xticks(range(g.shape[1]), ["W_in", "W_out"] if t == "MLP" else [f"H{h}" for h in range(H)], fontsize=8)
    fig.colorbar(im, ax=axes[4], fraction=0.08, pad=0.04)
    if neurons:
        ax = axes[5]
        layers = sorted(neurons, key=int)
        grid = np.asarray([neurons[l] for l in layers], float)
        im = ax.imshow(grid, cmap=cmap, vmin=0, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers], fontsize=8)
        ax.set_xlabel("MLP neuron", fontsize=8)
        ax.set_title("density per MLP neuron", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.08, pad=0.04)
    fig.tight_layout()
    return save_png(fig, path)


def write_figures(data: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """PNG heatmaps per prompt set: one per method and one row with all of them."""
    files: dict[str, Any] = {
        "heatmaps": {},
        "heatmap_rows": {},
        "structure": str(structure_png(data["structure"], out_dir / "structure.png")),
    }
    for name, res in data["sets"].items():
        grids = [unit_grid(res["unit_mean"][m]["heads"], res["unit_mean"][m]["mlp"]) for m in METHODS]
        signed = [m != "density" for m in METHODS]
        files["heatmaps"][name] = {}
        for m, g, s in zip(METHODS, grids, signed):
            p = heatmap_png(g, f"{name}: {METHOD_TITLES[m]}", out_dir / f"heatmap_{name}_{m}.png", signed=s)
            files["heatmaps"][name][m] = str(p)
        files["heatmap_rows"][name] = str(
            heatmap_row_png(
                grids,
                [METHOD_TITLES[m] for m in METHODS],
                signed,
                out_dir / f"heatmaps_{name}.png",
                suptitle=f"{name} prompts (n={res['n_prompts']}); last column: MLP layer",
            )
        )
    return files
