"""The report's views: attention patterns of the heads where the subnetwork acts most (original vs
remaining model) and per-token log-prob changes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kcs_lens.analyses.prompts import Prompts
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.lens import LensModel


def top_heads(res: dict[str, Any], st: dict[str, Any], k: int) -> list[tuple[int, int]]:
    """The ``k`` heads of the masked layers that the methods rank highest: per method, each head's
    mean |effect| as a share of that method's largest; the heads with the largest mean share over
    knock-out, patching, attribution and DLA (density breaks ties). Heads outside the masked layers
    cannot hold the subnetwork (their original and remaining attention are the same) and are not shown."""
    masked = np.isfinite(st["head"])
    score = np.zeros(masked.shape)
    for m in ("knockout", "patching", "attribution", "dla"):
        eff = np.where(masked, np.nan_to_num(np.abs(np.asarray(res["unit_mean"][m]["heads"], float)), nan=0.0), 0.0)
        top = eff.max()
        if top > 0:
            score += eff / top
    score += 1e-9 * np.nan_to_num(st["head"], nan=0.0)
    score[~masked] = -np.inf
    order = [i for i in np.argsort(-score.ravel(), kind="stable") if masked.ravel()[i]][:k]
    H = score.shape[1]
    return [(int(i) // H, int(i) % H) for i in order]


@torch.no_grad()
def views(lm: LensModel, sub: Subnetwork, clean: Prompts, heads: list[tuple[int, int]], n_attention: int, n_tokens: int):
    """Attention patterns (original vs remaining model) of ``heads`` on the first prompts, and the
    per-token log-prob change (remaining - original) of every prompt token. Where the backend has
    no attention-pattern hook (TransformerLens 3.9's bridge for OPT and GPT-J), no attention views."""
    names = sorted({f"blocks.{l}.attn.hook_pattern" for l, _ in heads})
    n = max(n_attention, n_tokens)
    sel = clean.tokens[:n]

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, cache = lm.model.run_with_cache(sel, names_filter=lambda x: x in names)
        return torch.log_softmax(logits.float(), -1), {k: cache[k] for k in names if k in cache}

    lp_o, pat_o = run()
    with sub.applied(lm, strict_fingerprint=False):
        lp_r, pat_r = run()
    if len(pat_o) < len(names):  # the hook exists but this attention never calls it
        n_attention = 0
    attention, tokens = [], []
    for i in range(min(n, len(clean))):
        n_tok = int(clean.lengths[i])
        toks = clean.str_tokens(lm.tokenizer, i)
        nxt = clean.tokens[i, 1:n_tok]
        delta = (lp_r[i, : n_tok - 1].gather(-1, nxt[:, None]) - lp_o[i, : n_tok - 1].gather(-1, nxt[:, None]))[:, 0]
        if i < n_tokens:
            tokens.append(
                {"prompt": i, "tokens": toks, "delta_logprob": [0.0] + delta.cpu().tolist(), "tail_from": int(clean.pos[i]) + 1}
            )
        if i < n_attention:
            grab = lambda pat, i=i, n_tok=n_tok: [
                pat[f"blocks.{l}.attn.hook_pattern"][i, h, :n_tok, :n_tok].cpu().tolist() for l, h in heads
            ]
            attention.append(
                {
                    "prompt": i,
                    "tokens": toks,
                    "heads": [f"L{l}H{h}" for l, h in heads],
                    "original": grab(pat_o),
                    "remaining": grab(pat_r),
                }
            )
    return attention, tokens
