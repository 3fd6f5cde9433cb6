"""Activation patching of each head's output and each MLP layer, per prompt.

Uses :mod:`transformer_lens.patching` (``get_act_patch_attn_head_out_all_pos`` for
``blocks.{l}.attn.hook_z``, ``generic_activation_patch`` with a whole-activation setter for
``blocks.{l}.hook_mlp_out``), which exists with the same signature on TransformerLens 3.9
(HookedTransformer and bridge) and 4.3 (bridge). TL returns one number per patch; to keep the
per-prompt values on both versions (3.9 has no ``reduce="none"``) the metric records its
``[batch]`` vector on each call, in the order TL iterates its index table, and returns the mean.

Direction: *noising*. The clean prompt runs and one component's output (all positions) is
replaced by its value on the corrupted prompt (default: head entity swapped, see
:mod:`kcs_lens.analyses.prompts`), by zero, or by its mean over the prompts. The effect is
``logp_clean(tail) - logp_patched(tail)``: positive when the component's clean output supports
the tail. Patching with the clean activation itself gives exactly 0.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from kcs_lens.analyses.prompts import Prompts, tail_logprob
from kcs_lens.model.lens import LensModel

CorruptMode = Literal["swap", "zero", "mean"]
CORRUPT_MODES = ("swap", "zero", "mean")


def hook_names(n_layers: int) -> list[str]:
    """Hook points used by every analysis; they exist on HookedTransformer and the bridge."""
    return [f"blocks.{l}.attn.hook_z" for l in range(n_layers)] + [f"blocks.{l}.hook_mlp_out" for l in range(n_layers)]


@torch.no_grad()
def run_cache(lm: LensModel, prompts: Prompts, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    wanted = set(names)
    logits, cache = lm.model.run_with_cache(prompts.tokens, names_filter=lambda n: n in wanted)
    return logits, {n: cache[n].detach() for n in names}


def replacement_acts(lm: LensModel, clean: Prompts, mode: CorruptMode, corrupted: Prompts | None = None) -> dict[str, Tensor]:
    """The activations patched into the clean run: corrupted-run values, zeros, or the
    per-position mean over prompts (positions past a prompt's end excluded from the mean)."""
    names = hook_names(lm.shape.n_layers)
    if mode == "swap":
        if corrupted is None:
            raise ValueError("mode 'swap' needs the corrupted prompts")
        return run_cache(lm, corrupted, names)[1]
    _, acts = run_cache(lm, clean, names)
    if mode == "zero":
        return {n: torch.zeros_like(a) for n, a in acts.items()}
    if mode == "mean":
        seq = clean.tokens.shape[1]
        valid: Float[Tensor, "b pos"] = (torch.arange(seq)[None, :] < clean.lengths[:, None]).float().to(clean.tokens.device)
        out = {}
        for n, a in acts.items():
            w = valid.view(*valid.shape, *([1] * (a.dim() - 2)))
            mean = (a * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp_min(1)
            out[n] = mean.expand_as(a).clone()
        return out
    raise ValueError(f"corruption {mode!r}: expected one of {', '.join(CORRUPT_MODES)}")


@contextlib.contextmanager
def _quiet_tl_progress() -> Iterator[None]:
    """TL's patching loops print a tqdm bar per call; silence it for the duration."""
    import transformer_lens.patching as tlp

    old = getattr(tlp, "tqdm", None)
    tlp.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        if old is not None:
            tlp.tqdm = old


@dataclass
class PatchingResult:
    """Per-prompt effects (clean - patched tail log-prob) of every head and MLP layer."""

    heads: Float[np.ndarray, "prompt layer head"]
    mlp: Float[np.ndarray, "prompt layer"]
    clean_logprob: Float[np.ndarray, " prompt"]


def _cache_like(lm: LensModel, acts: dict[str, Tensor]):
    from transformer_lens import ActivationCache

    return ActivationCache(acts, lm.model)


def activation_patching(lm: LensModel, clean: Prompts, acts: dict[str, Tensor], valid: Tensor | None = None) -> PatchingResult:
    """Patch each head output and each MLP output (all positions) from ``acts`` into the clean run.

    ``valid``: prompts whose corruption is meaningful; the others get NaN.
    """
    import transformer_lens.patching as tlp

    L, H = lm.shape.n_layers, lm.shape.n_heads
    recorded: list[Tensor] = []

    def metric(logits: Tensor) -> Tensor:
        lp = tail_logprob(logits, clean)
        recorded.append(lp.detach().cpu())
        return lp.mean()

    cache = _cache_like(lm, acts)
    with torch.no_grad(), _quiet_tl_progress():
        clean_lp = tail_logprob(lm.model(clean.tokens), clean).cpu()
        tlp.get_act_patch_attn_head_out_all_pos(lm.model, clean.tokens, cache, metric)
        n_head_calls = len(recorded)
        tlp.generic_activation_patch(
            lm.model,
            clean.tokens,
            cache,
            metric,
            patch_setter=lambda corrupted_act, index, new_act: new_act.clone(),  # type: ignore[attr-defined]
            activation_name="mlp_out",
            index_axis_names=("layer",),
        )
    if n_head_calls != L * H or len(recorded) != L * H + L:
        raise RuntimeError(f"unexpected number of TL patching runs ({n_head_calls}, {len(recorded)})")
    # TL iterates its index table row-major: (layer, head) for heads, layer for MLPs.
    per: Float[Tensor, "units batch"] = torch.stack(recorded)  # units: L*H heads, then L MLP layers
    heads = (clean_lp[None] - per[: L * H]).T.reshape(-1, L, H).numpy().astype(np.float64)
    mlp = (clean_lp[None] - per[L * H :]).T.numpy().astype(np.float64)
    if valid is not None:
        bad = ~valid.cpu().numpy()
        heads[bad] = np.nan
        mlp[bad] = np.nan
    return PatchingResult(heads, mlp, clean_lp.numpy().astype(np.float64))
