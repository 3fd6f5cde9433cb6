"""Knock-out localisation: remove the subnetwork only inside one head or one MLP layer.

For head h of layer l the restricted subnetwork keeps the subnetwork's weights in the head's
slices of W_Q, W_K, W_V ([h, :, :]) and W_O ([h, :, :]); for an MLP layer, its W_in and W_out
entries. Neuron masks are expanded to weight shape first, so a restricted mask is a
weight-granularity mask. One weight mask is attached once; its logits are rewritten per unit.
A head-granularity subnetwork is knocked out through its own head / neuron logits.

Effect = ``logp_original(tail) - logp_knocked_out(tail)``: positive where removing that part of
the subnetwork lowers the tail's log-probability (where the subnetwork acts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float

from kcs_lens.analyses.prompts import Prompts, tail_logprob
from kcs_lens.masks.granularity import HEAD_UNITS, NEURON_UNITS, unit_name
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.canonical import ATTN_MATRICES as HEAD_MATRICES
from kcs_lens.model.canonical import KV_MATRICES, MLP_MATRICES, weight_name
from kcs_lens.model.lens import LensModel


@dataclass
class KnockoutResult:
    heads: Float[np.ndarray, "prompt layer head"]  # NaN in layers without masked head matrices
    mlp: Float[np.ndarray, "prompt layer"]
    original_logprob: Float[np.ndarray, " prompt"]
    remaining_logprob: Float[np.ndarray, " prompt"]  # the whole subnetwork removed


@torch.no_grad()
def knockout(lm: LensModel, sub: Subnetwork, prompts: Prompts, *, strict_fingerprint: bool = True) -> KnockoutResult:
    L, H = lm.shape.n_layers, lm.shape.n_heads
    sub.check_model(lm, strict_fingerprint=strict_fingerprint)
    full = sub.full_binary()
    heads = np.full((len(prompts), L, H), np.nan)
    mlp = np.full((len(prompts), L), np.nan)
    orig = tail_logprob(lm(prompts.tokens), prompts).cpu()
    if sub.units is not None:
        return _knockout_units(lm, sub, prompts, orig)
    wm = sub.at_weight_granularity().to_mask(device=lm.device)

    def set_units(keep: dict[str, torch.Tensor]) -> None:
        for n, p in wm.items():
            sel = keep.get(n)
            p.copy_(torch.where(sel.to(p.device), 1.0, -1.0) if sel is not None else torch.full_like(p, -1.0))

    with wm.applied(lm, mode="eval", keep="remaining"):
        set_units(full)
        remaining = tail_logprob(lm(prompts.tokens), prompts).cpu()
        for l in sorted(sub.mask_config.layers):
            names = [weight_name(l, m) for m in HEAD_MATRICES if weight_name(l, m) in full]
            for h in range(H) if names else []:
                keep = {}
                for n in names:
                    # GQA: query head h's keys and values are those of key/value head h // group,
                    # shared with the other query heads of its group
                    i = h // sub.shape.group_size if n.endswith(KV_MATRICES) else h
                    sel = torch.zeros_like(full[n])
                    sel[i] = full[n][i]
                    keep[n] = sel
                set_units(keep)
                heads[:, l, h] = (orig - tail_logprob(lm(prompts.tokens), prompts).cpu()).numpy()
            names = [weight_name(l, m) for m in MLP_MATRICES if weight_name(l, m) in full]
            if names:
                set_units({n: full[n] for n in names})
                mlp[:, l] = (orig - tail_logprob(lm(prompts.tokens), prompts).cpu()).numpy()
    return KnockoutResult(heads, mlp, orig.double().numpy(), remaining.double().numpy())


def _knockout_units(lm: LensModel, sub: Subnetwork, prompts: Prompts, orig: torch.Tensor) -> KnockoutResult:
    """Head granularity: knock out one head (its logit alone) or one MLP layer's neurons. A head
    outside the subnetwork has effect 0 (nothing of the subnetwork is there). Under grouped-query
    attention a shared K/V head is removed only with its whole group (the head rule), so a single
    head's knock-out removes its Q and O slices."""
    L, H = lm.shape.n_layers, lm.shape.n_heads
    units = sub.unit_binary()
    assert units is not None
    heads = np.full((len(prompts), L, H), np.nan)
    mlp = np.full((len(prompts), L), np.nan)
    wm = sub.to_mask(device=lm.device)

    def set_units(keep: dict[str, torch.Tensor]) -> None:
        for n, p in wm.items():
            sel = keep.get(n)
            p.copy_(torch.where(sel.to(p.device), 1.0, -1.0) if sel is not None else torch.full_like(p, -1.0))

    effect = lambda: (orig - tail_logprob(lm(prompts.tokens), prompts).cpu()).numpy()
    with wm.applied(lm, mode="eval", keep="remaining"):
        set_units(units)
        remaining = tail_logprob(lm(prompts.tokens), prompts).cpu()
        for l in sorted(sub.mask_config.layers):
            hn, nn_ = unit_name(l, HEAD_UNITS), unit_name(l, NEURON_UNITS)
            for h in range(H) if hn in units else []:
                if not units[hn][h]:
                    heads[:, l, h] = 0.0
                    continue
                one = torch.zeros_like(units[hn])
                one[h] = True
                set_units({hn: one})
                heads[:, l, h] = effect()
            if nn_ in units:
                set_units({nn_: units[nn_]})
                mlp[:, l] = effect()
    return KnockoutResult(heads, mlp, orig.double().numpy(), remaining.double().numpy())
