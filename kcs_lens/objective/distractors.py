"""Same-relation distractor tails for the distractor term (docs/method.md, "The distractor term").

For every TargetKG row the pool is the first token of every tail of the same relation in the
TargetKG and the ControlKG the run trains on that is false of the row's head
(:meth:`kcs_lens.data.tail_pool.DistractorPool.candidates`, the rule the multiple-choice measure
uses: no hypernym of the head), as that tail would follow the row's own prefix (the tail's text
swapped into the sentence; the article before it stays the row's own, since the term compares
logits at one position). Tails whose first token is the row's own first tail token are left out
(they would contrast the tail with itself). Each step draws ``k`` of them per
row without replacement, from a generator seeded by (seed, step): a pure function of the step, so
a resumed run draws what the uninterrupted one drew, and the reference and the fast objective see
the same draw.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from jaxtyping import Int
from torch import Tensor

from kcs_lens.data.tail_pool import DistractorPool
from kcs_lens.data.triplets import Triplet, TripletBatch
from kcs_lens.errors import ConfigError


def row_key(batch: TripletBatch, i: int) -> bytes:
    """A row's identity in a batch: its tokens (the same row in another batch has the same key)."""
    return batch.tokens[i, : int(batch.lengths[i])].cpu().numpy().tobytes()


class DistractorPools:
    """Per TargetKG row, the first tokens of the same relation's other tails; ``draw`` picks ``k``."""

    def __init__(self, pools: dict[bytes, Tensor], k: int, seed: int):
        self.pools = pools
        self.k = k
        self.seed = seed

    @classmethod
    def build(
        cls,
        target: list[Triplet],
        target_batch: TripletBatch,
        pool_from: Iterable[Triplet],
        tokenizer: Any,
        *,
        k: int,
        seed: int,
    ) -> "DistractorPools":
        """Pools for the rows of ``target_batch`` (tokenized from ``target``, in order) from the
        tails of ``target`` and ``pool_from``. ConfigError where a row has no other tail of its
        relation; ``k`` is lowered to the smallest pool (the caller reports ``k`` as used)."""
        tails = DistractorPool([target, pool_from])
        pools: dict[bytes, Tensor] = {}
        for i, t in enumerate(target):
            n_pre = len(tokenizer.encode(t.prefix, add_special_tokens=False))
            lead = t.tail_str[: len(t.tail_str) - len(t.tail)]  # the space (or nothing) before the tail
            first_own = int(target_batch.targets[i][target_batch.score_mask[i]][0])
            ids: set[int] = set()
            for tail in tails.candidates(t):
                toks = tokenizer.encode(t.prefix + lead + tails.spelling(t, tail), add_special_tokens=False)[n_pre:]
                if toks and toks[0] != first_own:
                    ids.add(int(toks[0]))
            if not ids:
                raise ConfigError(
                    f"--distractor-weight: TargetKG triplet {t.text!r} has no other tail of relation {t.relation!r} in the "
                    "TargetKG and ControlKG that is false of its head (the distractor term needs at least one)"
                )
            pools[row_key(target_batch, i)] = torch.tensor(sorted(ids), dtype=torch.long)
        k = min(k, min(len(p) for p in pools.values()))
        return cls(pools, k, seed)

    def draw(self, batch: TripletBatch, step: int) -> Int[Tensor, "batch k"]:
        """``k`` distractor token ids per row of ``batch`` for step ``step`` (without replacement)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2**63)
        out = torch.empty((len(batch), self.k), dtype=torch.long)
        for i in range(len(batch)):
            pool = self.pools.get(row_key(batch, i))
            if pool is None:
                raise KeyError("internal: a TargetKG row without a distractor pool")
            out[i] = pool[torch.randperm(len(pool), generator=g)[: self.k]]
        return out.to(batch.tokens.device)

    def sizes(self) -> dict[str, int]:
        n = [len(p) for p in self.pools.values()]
        return {"distractor_k": self.k, "distractor_pool_min": min(n), "distractor_pool_max": max(n)}
