"""Gradient-based and direct attributions of each head and MLP layer to the tail log-probability.

- :func:`attribution_patching`: the first-order (gradient x activation difference) estimate of
  the activation-patching effect, ``-(d logp / d act) . (act_corrupted - act_clean)`` summed over
  positions and features, for ``hook_z`` per head and ``hook_mlp_out`` per layer. Our own small
  hook loop (a zero "delta" added at each hook point and differentiated), because
  ``transformer_lens.tools.analysis.attribution_patch`` exists only in TL 4.x; this runs the same
  on HookedTransformer and the bridge. Same sign convention as
  :mod:`kcs_lens.analyses.patching`: positive = the clean activation supports the tail.
- :func:`direct_logit_attribution`: each head's (and MLP layer's) direct contribution, through
  the final LayerNorm with its scale frozen at the clean run's value, to the tail logit minus the
  mean logit, at the last prefix position. Computed by hand from the cache (``hook_z @ W_O``,
  centred, divided by the LN scale of ``blocks.{L-1}.hook_resid_post``, times ``ln_f.weight`` and
  ``W_U[:, tail] - mean_v W_U[:, v]``) on the unmasked, unprocessed model. This is what TL's
  processed-model DLA computes (fold_ln + centring) without building a processed copy; the masked
  model is never processed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from kcs_lens.analyses.patching import hook_names, run_cache
from kcs_lens.analyses.prompts import Prompts, tail_logprob
from kcs_lens.model.lens import LensModel


@dataclass
class UnitValues:
    """Per-prompt values of every head and MLP layer."""

    heads: Float[np.ndarray, "prompt layer head"]
    mlp: Float[np.ndarray, "prompt layer"]


def _positions_upto(prompts: Prompts) -> Tensor:
    seq = prompts.tokens.shape[1]
    return (torch.arange(seq)[None, :] <= prompts.pos.cpu()[:, None]).float()  # [b, pos]


def attribution_patching(
    lm: LensModel,
    clean: Prompts,
    acts: dict[str, Tensor],
    clean_acts: dict[str, Tensor] | None = None,
    valid: Tensor | None = None,
) -> UnitValues:
    """Estimated ``logp_clean - logp_patched`` of every head and MLP layer (one forward + backward)."""
    L, H = lm.shape.n_layers, lm.shape.n_heads
    names = hook_names(L)
    deltas: dict[str, Tensor] = {}
    saved: dict[str, Tensor] = {}

    def add_delta(name: str):
        def hook(act: Tensor, hook) -> Tensor:  # keyed by our name: bridge aliases report another hook.name
            d = torch.zeros_like(act, requires_grad=True)
            deltas[name] = d
            saved[name] = act.detach()
            return act + d

        return hook

    with torch.enable_grad():
        logits = lm.model.run_with_hooks(clean.tokens, fwd_hooks=[(n, add_delta(n)) for n in names])
        lp = tail_logprob(logits, clean).sum()
        grads = dict(zip(names, torch.autograd.grad(lp, [deltas[n] for n in names])))
    clean_acts = clean_acts or saved
    upto = _positions_upto(clean).to(clean.tokens.device)
    heads = torch.zeros(len(clean), L, H)
    mlp = torch.zeros(len(clean), L)
    for l in range(L):
        z = f"blocks.{l}.attn.hook_z"  # [b, pos, head, d_head]
        diff = (acts[z] - clean_acts[z]) * grads[z]
        heads[:, l] = -(diff.sum(-1) * upto[:, :, None]).sum(1).cpu()
        m = f"blocks.{l}.hook_mlp_out"  # [b, pos, d_model]
        diff = (acts[m] - clean_acts[m]) * grads[m]
        mlp[:, l] = -(diff.sum(-1) * upto).sum(1).cpu()
    out = UnitValues(heads.double().numpy(), mlp.double().numpy())
    if valid is not None:
        bad = ~valid.cpu().numpy()
        out.heads[bad] = np.nan
        out.mlp[bad] = np.nan
    return out


def dla_projector(lm: LensModel, prompts: Prompts, resid_final: Float[Tensor, "batch d_model"]):
    """``f(v [batch, ..., d_model]) -> [batch, ...]``: the direct effect of residual-stream vectors
    at the scored position on ``logit(tail) - mean(logits)``, through the final LayerNorm with the
    scale of ``resid_final`` (the last block's output there). Summed over every component of the
    residual stream (plus ``ln_f.bias``) it gives that logit difference exactly (before a logit
    soft-cap). RMSNorm families (Llama, Qwen, Gemma): no centring, scale = root mean square."""
    w_ln, eps = lm.final_norm_params()
    rms = lm.rms_norm
    if rms:
        scale: Float[Tensor, "b 1"] = (resid_final.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    else:
        scale = (resid_final.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    W_U: Float[Tensor, "d_model d_vocab"] = lm.unembed_params()[0].detach().T
    direction: Float[Tensor, "b d_model"] = (W_U[:, prompts.target.to(W_U.device)].T - W_U.mean(1)[None]) * w_ln[None]

    def project(out: Tensor) -> Tensor:
        if not rms:
            out = out - out.mean(-1, keepdim=True)
        d = direction.view(direction.shape[0], *([1] * (out.dim() - 2)), direction.shape[1])
        sc = scale.view(scale.shape[0], *([1] * (out.dim() - 1)))
        return (out / sc * d).sum(-1)

    return project


@torch.no_grad()
def direct_logit_attribution(lm: LensModel, prompts: Prompts) -> UnitValues:
    """Direct effect of each head / MLP layer on ``logit(tail) - mean(logits)`` at the last prefix
    position, with the final LayerNorm's scale frozen (clean run); a head's output goes through
    :meth:`LensModel.head_outputs` (Gemma 2's norm after attention, frozen the same way)."""
    L, H = lm.shape.n_layers, lm.shape.n_heads
    last = f"blocks.{L - 1}.hook_resid_post"
    _, cache = run_cache(lm, prompts, hook_names(L) + [last])
    rows = torch.arange(len(prompts))
    pos = prompts.pos.to(prompts.tokens.device)
    project = dla_projector(lm, prompts, cache[last][rows, pos])
    heads = torch.zeros(len(prompts), L, H)
    mlp = torch.zeros(len(prompts), L)
    for l in range(L):
        z: Float[Tensor, "b n_heads d_head"] = cache[f"blocks.{l}.attn.hook_z"][rows, pos]
        heads[:, l] = project(lm.head_outputs(l, z)).cpu()
        mlp[:, l] = project(cache[f"blocks.{l}.hook_mlp_out"][rows, pos]).cpu()
    return UnitValues(heads.double().numpy(), mlp.double().numpy())
