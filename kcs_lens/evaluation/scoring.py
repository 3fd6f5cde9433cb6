"""Scoring a model on triplets and text: tail log-probabilities, perplexities, ranks.

All functions take logits or a callable model; they never touch masks, so the same code scores
the original, the remaining model and the subnetwork alone (set the mask's mode around the call).

One definition of a triplet set's perplexity, used everywhere (``discover``, ``evaluate``, ``kg
show``; docs/method.md): PPL = exp(mean over triplets of each triplet's mean NLL over its scored
tail tokens). For one-token tails this is exp(mean NLL of the tails). Beside it every table
reports the top-1 accuracy and mean rank of the tail's first token (:meth:`TailScores.headline`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kcs_lens.data.triplets import TripletBatch

ModelFn = Callable[[Int[Tensor, "batch seq"]], Float[Tensor, "batch seq vocab"]]


def scored_rows(batch: TripletBatch) -> Int[Tensor, " n_scored"]:
    """For each scored position (row-major order of ``score_mask``), the index of its triplet."""
    return batch.score_mask.nonzero()[:, 0]


def per_triplet_mean(values: Float[Tensor, " n_scored"], batch: TripletBatch) -> Float[Tensor, " batch"]:
    """Average per-position values over each triplet's scored tail positions."""
    rows = scored_rows(batch).to(values.device)
    sums = torch.zeros(len(batch), dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    counts = batch.score_mask.sum(1).to(values.device, values.dtype)
    return sums / counts


@dataclass
class TailScores:
    """Per-triplet tail statistics under one model."""

    nll: Float[Tensor, " batch"]  # mean NLL over the scored tail tokens
    n_scored: Int[Tensor, " batch"]  # number of scored tail tokens
    first_logprob: Float[Tensor, " batch"]  # log-prob of the first scored tail token
    first_rank: Int[Tensor, " batch"]  # rank of the first scored tail token (0 = the model's top prediction)
    first_top: Int[Tensor, " batch"]  # the model's top token at that position (its answer)

    @property
    def ppl(self) -> float:
        """The set's perplexity: exp(mean over triplets of the per-triplet mean NLL)."""
        return math.exp(float(self.nll.mean()))

    def topk(self, k: int) -> float:
        """Share of triplets whose first scored tail token is among the model's top k (an exact
        fraction: 6 of 30 is 0.2, so bounds such as top-1 <= 0.2 hold at the boundary)."""
        return int((self.first_rank < k).sum()) / self.first_rank.numel()

    @property
    def rank_mean(self) -> float:
        return float(self.first_rank.float().mean())

    def headline(self) -> dict[str, float]:
        """What every table shows of a triplet set: ``ppl`` (the paper's measure), ``top1`` (share of
        triplets whose first tail token is the model's argmax: the answer) and ``rank`` (mean rank
        of the first tail token, 0 = top). PPL can rise many-fold while the argmax stays the tail
        (docs/method.md, "Perplexity suppressed vs answer changed")."""
        return {"ppl": self.ppl, "top1": self.topk(1), "rank": self.rank_mean}

    def summary(self) -> dict[str, float]:
        return {"n": int(self.nll.numel()), "tail_ppl": self.ppl, "top1_acc": self.topk(1), "mean_rank": self.rank_mean}


@torch.no_grad()
def tail_scores(model: ModelFn, batch: TripletBatch, batch_size: int = 64) -> TailScores:
    nll, n, first_lp, first_rank, first_top = [], [], [], [], []
    for i in range(0, len(batch), batch_size):
        sub = batch.select(range(i, min(i + batch_size, len(batch))))
        logits = model(sub.tokens)
        logp = torch.log_softmax(logits[sub.score_mask].float(), dim=-1)
        tgt = sub.targets[sub.score_mask].to(logp.device)
        tok_lp = logp.gather(-1, tgt[:, None])[:, 0]
        nll.append(per_triplet_mean(-tok_lp, sub))
        n.append(sub.score_mask.sum(1))
        # first scored position of each triplet
        rows = scored_rows(sub).to(logp.device)
        first = torch.ones_like(rows, dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        first_lp.append(tok_lp[first])
        first_rank.append((logp[first] > tok_lp[first][:, None]).sum(-1))
        first_top.append(logp[first].argmax(-1))
    cat = lambda xs: torch.cat(xs).cpu()
    return TailScores(cat(nll), cat(n), cat(first_lp), cat(first_rank), cat(first_top))


@torch.no_grad()
def lm_nll(model: ModelFn, blocks: Int[Tensor, "n block"], batch_size: int = 8) -> float:
    """Mean next-token NLL over all positions of the text blocks."""
    total, count = 0.0, 0
    for i in range(0, blocks.shape[0], batch_size):
        toks = blocks[i : i + batch_size]
        logits = model(toks)[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), toks[:, 1:].reshape(-1).to(logits.device), reduction="sum"
        )
        total += float(nll)
        count += toks[:, 1:].numel()
    return total / max(count, 1)
