"""The tail at intermediate layers (logit lens; docs/method.md, "Removal in other formats").

Patil et al. (arXiv 2309.17410) count a deleted fact as recovered when its answer is among the
top-B candidates read from an intermediate layer through the unembedding. Here: the residual
stream after each block (TransformerLens hook ``blocks.{l}.hook_resid_post``, on both backends)
at the position that predicts the tail's first token, through the model's final norm and
unembedding (:meth:`~kcs_lens.model.lens.LensModel.final_norm`,
:meth:`~kcs_lens.model.lens.LensModel.unembed`); the tail's rank there (0 = top). At the last
block this is the model's own output, so the last layer's ranks are the final ranks.

``lens_top10_any``: share of triplets whose tail is in the top 10 at some layer (the last one
included); ``lens_top10_l{l}``: the same at layer ``l``; ``lens_top1_any``: top 1 at some layer.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from kcs_lens.data.triplets import TripletBatch
from kcs_lens.model.lens import LensModel

LENS_TOPK = 10


@torch.no_grad()
def lens_ranks(lm: LensModel, batch: TripletBatch, batch_size: int = 64) -> Int[Tensor, "n_layers batch"]:
    """The rank of each triplet's first scored tail token under the logit lens of every block."""
    n_layers = lm.shape.n_layers
    out = []
    for i in range(0, len(batch), batch_size):
        sub = batch.select(range(i, min(i + batch_size, len(batch))))
        pos = sub.score_mask.int().argmax(1)  # the first scored position of each row
        rows = torch.arange(len(sub), device=pos.device)
        tail = sub.targets[rows, pos]
        got = _resid_at(lm, sub.tokens, rows, pos)
        ranks = []
        for l in range(n_layers):
            z = lm.unembed(lm.final_norm(got[l])).float()
            ranks.append((z > z.gather(-1, tail[:, None].to(z.device))).sum(-1))
        out.append(torch.stack(ranks).cpu())
    return torch.cat(out, dim=1)


def _resid_at(lm: LensModel, tokens: Int[Tensor, "b seq"], rows: Int[Tensor, " b"], pos: Int[Tensor, " b"]) -> dict[int, Tensor]:
    """``blocks.{l}.hook_resid_post`` of every block at position ``pos[i]`` of row ``rows[i]``."""
    got: dict[int, Tensor] = {}

    def keep(layer: int) -> Any:
        def hook(x: Tensor, hook: Any) -> None:  # noqa: ARG001 (TransformerLens passes the hook point)
            got[layer] = x[rows.to(x.device), pos.to(x.device)]

        return hook

    names = [f"blocks.{l}.hook_resid_post" for l in range(lm.shape.n_layers)]
    lm.model.run_with_hooks(tokens, fwd_hooks=[(n, keep(l)) for l, n in enumerate(names)])
    return got


def lens_metrics(ranks: Int[Tensor, "n_layers batch"], k: int = LENS_TOPK) -> dict[str, float]:
    """Shares of triplets whose tail is in the top ``k`` (and top 1) at some layer, and per layer."""
    n = ranks.shape[1]
    out = {f"lens_top{k}_any": int((ranks < k).any(0).sum()) / n, "lens_top1_any": int((ranks < 1).any(0).sum()) / n}
    out.update({f"lens_top{k}_l{l}": int((ranks[l] < k).sum()) / n for l in range(ranks.shape[0])})
    return out
