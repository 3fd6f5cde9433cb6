"""Where the subnetwork's weights are: density per layer, per head (Q, K, V, O and combined),
per MLP layer and per MLP neuron.

Density = share of a component's *masked* weights that belong to the subnetwork. Neuron masks
(one logit per input row) are expanded to the canonical weight shape first, so every number
counts weights. Components in layers or matrices that were not masked get NaN (nothing could be
removed there); :func:`unit_density` maps them to 0 for the all-units comparison.

A ``head``-granularity subnetwork is read from its decisions directly: a head's density is 1 when
the head is in the subnetwork and 0 otherwise (also under grouped-query attention, where its
shared K/V weights follow the all-query-heads rule), an MLP neuron's likewise, an MLP layer's is
the share of its neurons; ``head_prob`` / ``mlp_prob`` are the mask probabilities sigmoid(logit)
per head and (mean) per MLP layer, and ``head_decisions`` lists the heads in the subnetwork.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from kcs_lens.masks.granularity import HEAD_UNITS, parse_unit_name
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.canonical import ATTN_MATRICES as HEAD_MATRICES
from kcs_lens.model.canonical import KV_MATRICES, MLP_MATRICES, ModelShape, weight_name


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def structure(sub: Subnetwork) -> dict[str, Any]:
    """Densities of the subnetwork; arrays are [n_layers, n_heads] / [n_layers] with NaN where
    nothing was masked."""
    s: ModelShape = sub.shape
    L, H = s.n_layers, s.n_heads
    full = sub.full_binary()
    head = {m: np.full((L, H), np.nan) for m in HEAD_MATRICES}
    head_num, head_den = np.zeros((L, H)), np.zeros((L, H))
    attn_num, attn_den = np.zeros(L), np.zeros(L)
    mlp = {m: np.full(L, np.nan) for m in MLP_MATRICES}
    mlp_num, mlp_den = np.zeros(L), np.zeros(L)
    layer_num, layer_den = np.zeros(L), np.zeros(L)
    neurons: dict[str, list[float]] = {}
    for l in range(L):
        for m in HEAD_MATRICES:
            b = full.get(weight_name(l, m))
            if b is None:
                continue
            per_head = b.flatten(1).float()  # [H, ...]: head is dim 0 for Q, K, V and O
            attn_num[l] += float(b.sum())
            attn_den[l] += b.numel()
            share = 1.0
            if m in KV_MATRICES and per_head.shape[0] != H:  # GQA: query head h reads key/value head h // group
                g = H // per_head.shape[0]
                per_head, share = per_head.repeat_interleave(g, 0), 1.0 / g
            head[m][l] = per_head.mean(1).numpy()
            head_num[l] += per_head.sum(1).numpy() * share  # shared K/V weights counted once per layer
            head_den[l] += per_head.shape[1] * share
        for m in MLP_MATRICES:
            b = full.get(weight_name(l, m))
            if b is None:
                continue
            mlp[m][l] = float(b.float().mean())
            mlp_num[l] += float(b.sum())
            mlp_den[l] += b.numel()
        layer_num[l] = attn_num[l] + mlp_num[l]  # each weight once (shared K/V heads too)
        layer_den[l] = attn_den[l] + mlp_den[l]
        dens = _neuron_density(full, s, l)
        if dens is not None:
            neurons[str(l)] = dens
    with np.errstate(invalid="ignore", divide="ignore"):
        combined = np.where(head_den > 0, head_num / np.maximum(head_den, 1), np.nan)
        mlp_comb = np.where(mlp_den > 0, mlp_num / np.maximum(mlp_den, 1), np.nan)
        layer = np.where(layer_den > 0, layer_num / np.maximum(layer_den, 1), np.nan)
    st = sub.stats
    extra: dict[str, Any] = {}
    units = sub.units
    if units is not None:  # head granularity: one decision per head / neuron, read directly
        extra = _unit_decisions(units, L, H, combined, mlp_comb, neurons)
    return {
        **extra,
        "granularity": sub.mask_config.granularity,
        "masked_layers": list(sub.mask_config.layers),
        "masked_matrices": list(sub.mask_config.matrices),
        "sparsity": st.sparsity,
        "sparsity_all_linear": sub.sparsity_all_linear,
        "density_overall": _ratio(st.n_sub, st.n_total),
        "layer": layer,
        "head": combined,
        "head_by_matrix": head,
        "mlp": mlp_comb,
        "mlp_by_matrix": mlp,
        "mlp_neuron": neurons,
    }


def _neuron_density(full: dict[str, Tensor], s: ModelShape, l: int) -> list[float] | None:
    """Density of each MLP neuron j of block ``l``: its input column of W_in [d_model, d_mlp] and its
    output row of W_out [d_mlp, d_model]; None where neither is masked."""
    w_in, w_out = full.get(weight_name(l, "W_in")), full.get(weight_name(l, "W_out"))
    if w_in is None and w_out is None:
        return None
    num = torch.zeros(s.d_mlp)
    den = 0
    if w_in is not None:
        num += w_in.float().sum(0)
        den += s.d_model
    if w_out is not None:
        num += w_out.float().sum(1)
        den += s.d_model
    return (num / den).tolist()


def _unit_decisions(
    units: dict[str, Tensor], L: int, H: int, combined: np.ndarray, mlp_comb: np.ndarray, neurons: dict[str, list[float]]
) -> dict[str, Any]:
    """Head granularity: each head's and neuron's decision written into ``combined`` / ``mlp_comb`` /
    ``neurons``; returns the mask probabilities and the heads in the subnetwork."""
    head_prob, mlp_prob = np.full((L, H), np.nan), np.full(L, np.nan)
    decisions = []
    for n, u in units.items():
        l, kind = parse_unit_name(n)
        p = torch.sigmoid(u.float())
        if kind == HEAD_UNITS:
            combined[l] = (u > 0).float().numpy()
            head_prob[l] = p.numpy()
            decisions += [f"L{l}H{h}" for h in (u > 0).nonzero().flatten().tolist()]
        else:
            neurons[str(l)] = (u > 0).float().tolist()
            mlp_comb[l] = float((u > 0).float().mean())
            mlp_prob[l] = float(p.mean())
    return {"head_prob": head_prob, "mlp_prob": mlp_prob, "head_decisions": decisions}


def unit_density(st: dict[str, Any]) -> tuple[Float[np.ndarray, "L H"], Float[np.ndarray, " L"]]:
    """Head and MLP densities for ranking, unmasked components set to 0."""
    return np.nan_to_num(st["head"], nan=0.0), np.nan_to_num(st["mlp"], nan=0.0)
