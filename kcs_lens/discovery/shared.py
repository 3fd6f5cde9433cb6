"""What several discovery runs of one loaded model in one process share (a *pack*: the cells of a
study that a sweep worker runs one after another, ``kcs-lens sweep --pack N``).

:class:`SharedInputs` holds, for one :class:`~kcs_lens.model.lens.LensModel`:

- the loaded KGs and tokenized ControlLM text blocks (keyed by their spec and the settings that
  shape them; tokenizing the bundled text is most of a run's data loading);
- the original model's evaluation (TargetKG, ControlKG validation, held-out ControlLM), keyed by
  the exact tokens evaluated: it does not depend on the masks or the seed;
- the fast objective's per-row caches (frozen-prefix residuals of the KG rows and the original
  model's ControlKG log-probabilities), shared by runs whose TargetKG and ControlKG batches are
  the same tokens (the seeds of one TargetKG), the objective's switches and its first masked block.

Each shared value is computed exactly as a run alone computes it (same function, same inputs, same
chunking), so a run in a pack ends with bit for bit the masks of the same run alone
(tests/test_sweep.py: packed cells against discover() alone). What is not shared: the masks, their optimizer and noise state, and every
masked computation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from kcs_lens.data.triplets import TripletBatch
from kcs_lens.discovery.config import DiscoveryConfig
from kcs_lens.discovery.run_data import RunData, load_run_data
from kcs_lens.model.lens import LensModel

T = TypeVar("T")


def digest(*parts: Any) -> str:
    """A content key for tensors, triplet batches (tokens, score mask, targets), other dataclasses
    (field by field), None and anything JSON can write."""
    h = hashlib.sha256()
    for p in parts:
        if dataclasses.is_dataclass(p) and not isinstance(p, (type, TripletBatch)):
            h.update(digest(type(p).__name__, *(getattr(p, f.name) for f in dataclasses.fields(p))).encode())
        elif isinstance(p, TripletBatch):
            for t in (p.tokens, p.score_mask, p.targets, p.lengths):
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(p, Tensor):
            h.update(str((tuple(p.shape), str(p.dtype))).encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()


class SharedInputs:
    """The inputs runs of ``lm`` in one process share; :meth:`get` memoizes by key."""

    def __init__(self, lm: LensModel):
        self.lm = lm
        self._memo: dict[tuple[Any, ...], Any] = {}
        self._loaded: dict[Any, Any] = {}  # KGs and text blocks by spec (load_run_data's cache)
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    def get(self, kind: str, key: Any, compute: Callable[[], T]) -> T:
        k = (kind, key)
        if k in self._memo:
            self.hits[kind] = self.hits.get(kind, 0) + 1
            return self._memo[k]
        self.misses[kind] = self.misses.get(kind, 0) + 1
        value = compute()
        self._memo[k] = value
        return value

    def run_data(self, cfg: DiscoveryConfig, lm: LensModel, log: Callable[[str], None] = print) -> RunData:
        """:func:`~kcs_lens.discovery.run_data.load_run_data` with the KGs and text blocks loaded once."""
        self.check_model(lm)
        return load_run_data(cfg, lm, log, cache=self._loaded)

    def check_model(self, lm: LensModel) -> None:
        if lm is not self.lm:
            raise ValueError("SharedInputs belong to another loaded model")

    def objective_caches(self, objective: Any, target: TripletBatch, control: TripletBatch) -> None:
        """Give a fast objective the per-row caches of the runs before it with the same TargetKG
        and ControlKG batches, switches and first masked block (else it keeps its own, which the
        next such run gets). Other objectives have no per-run caches."""
        if not all(hasattr(objective, a) for a in ("kg_cache", "p_cache", "effective_switches", "layer")):
            return
        key = (
            objective.layer,
            json.dumps(objective.effective_switches(), sort_keys=True, default=str),
            json.dumps(objective.config.__dict__, sort_keys=True, default=str) if hasattr(objective, "config") else "",
            digest(target, control),
        )
        if ("objective_caches", key) not in self._memo:  # one set at a time: a pack holds a TargetKG's seeds in a row
            self._memo = {k: v for k, v in self._memo.items() if k[0] != "objective_caches"}
        caches = self.get("objective_caches", key, lambda: (objective.kg_cache, objective.p_cache))
        objective.kg_cache, objective.p_cache = caches

    @torch.no_grad()
    def original(self, key: tuple[str, ...], compute: Callable[[], T]) -> T:
        """The original model's evaluation of one part (``key``: its name and content digests)."""
        return self.get("original", key, compute)
