"""Scoring a model on triplets and text: tail log-probabilities, perplexities, ranks.

All functions take logits or a callable model; they never touch masks, so the same code scores
the original, the remaining model and the subnetwork alone (set the mask's mode around the call).
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


def scored_rows(batch: TripletBatch) -> Int[Tensor, "n_scored"]:
    """For each scored position (row-major order of ``score_mask``), the index of its triplet."""
    return batch.score_mask.nonzero()[:, 0]


def per_triplet_mean(values: Float[Tensor, "n_scored"], batch: TripletBatch) -> Float[Tensor, "batch"]:
    """Average per-position values over each triplet's scored tail positions."""
    rows = scored_rows(batch).to(values.device)
    sums = torch.zeros(len(batch), dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    counts = batch.score_mask.sum(1).to(values.device, values.dtype)
    return sums / counts


@dataclass
class TailScores:
    """Per-triplet tail statistics under one model."""

    nll: Float[Tensor, "batch"]  # mean NLL over scored tail tokens
    first_logprob: Float[Tensor, "batch"]  # log-prob of the first scored tail token
    first_rank: Int[Tensor, "batch"]  # rank of the first scored tail token (0 = top)

    @property
    def ppl(self) -> float:
        """exp(mean NLL) over the set (method.md, Evaluation)."""
        return math.exp(float(self.nll.mean()))

    def topk(self, k: int) -> float:
        return float((self.first_rank < k).float().mean())


@torch.no_grad()
def tail_scores(model: ModelFn, batch: TripletBatch, batch_size: int = 64) -> TailScores:
    nll, first_lp, first_rank = [], [], []
    for i in range(0, len(batch), batch_size):
        sub = batch.select(range(i, min(i + batch_size, len(batch))))
        logits = model(sub.tokens)
        logp = torch.log_softmax(logits[sub.score_mask].float(), dim=-1)
        tgt = sub.targets[sub.score_mask].to(logp.device)
        tok_lp = logp.gather(-1, tgt[:, None])[:, 0]
        nll.append(per_triplet_mean(-tok_lp, sub))
        # first scored position of each triplet
        rows = scored_rows(sub).to(logp.device)
        first = torch.ones_like(rows, dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        first_lp.append(tok_lp[first])
        first_rank.append((logp[first] > tok_lp[first][:, None]).sum(-1))
    return TailScores(torch.cat(nll).cpu(), torch.cat(first_lp).cpu(), torch.cat(first_rank).cpu())


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


def lm_ppl(model: ModelFn, blocks: Int[Tensor, "n block"], batch_size: int = 8) -> float:
    return math.exp(lm_nll(model, blocks, batch_size))
