"""Relearning (docs/method.md, "Removal in other formats"): does the knowledge come back when the
remaining model is finetuned on facts that are not the removed ones?

``kcs-lens evaluate RUN --relearn STEPS`` finetunes every weight of the remaining model and of the
original alike (same batches, seed, learning rate and steps) with a causal-LM loss on the
sentences of the run's ControlKG training part: no TargetKG fact (the ControlKG is disjoint from
it). The removal stays attached while training through the downstream finetuning code
(:func:`kcs_lens.downstream.finetune.trainable`, :func:`~kcs_lens.downstream.finetune.removed`), so a
removed weight's effective value stays 0 after every step. Afterwards every set of the
evaluation is scored again; ``recovered`` is the share of the removal's drop that came back,
(after - before) / (original before - before), for the TargetKG's top-1 and multiple choice.
Deeb & Roger (arXiv 2410.08827) found that such finetuning brings back most of the unlearned
accuracy on facts it never shows.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from jaxtyping import Int
from torch import Tensor

from kcs_lens.data.triplets import TripletBatch
from kcs_lens.downstream.finetune import removed, trainable
from kcs_lens.errors import RunError
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.loading import BUNDLED_NAMES

if TYPE_CHECKING:
    from kcs_lens.evaluation.evaluate import Evaluator

DEFAULT_LR = 5e-5  # GPT-2 finetuning convention (as downstream's ``lm``)
# The small bundled models (trained at 2e-3). Measured on the default bundled run (building, seed 84),
# 100 steps: at 1e-3 the original itself forgets the TargetKG (top-1 1.00 -> 0.13, LM PPL x1.66),
# so nothing can "come back"; at 1e-4 the original keeps its answers (TargetKG PPL 1.32 -> 1.84) and
# the remaining model's top-1 goes 0.17 -> 0.50; at 3e-5 the original barely moves (PPL 1.32 -> 1.50)
# and the remaining model's top-1 goes 0.17 -> 0.87: the gentler rate is the stronger attack.
BUNDLED_LR = 3e-5
HEADLINE = ("top1", "rank_mean", "mc", "mc_norm", "ppl")


def sentence_loss(lm: Any, tokens: Int[Tensor, "b seq"], lengths: Int[Tensor, " b"]) -> Tensor:
    """Mean next-token cross-entropy over every token after BOS of the right-padded sentences."""
    n = int(lengths.max())
    tokens = tokens[:, :n].to(lm.device)
    logits = lm(tokens)[:, :-1].float()
    valid = torch.arange(n - 1, device=lm.device)[None] < lengths[:, None].to(lm.device) - 1
    return torch.nn.functional.cross_entropy(logits[valid], tokens[:, 1:][valid])


def relearn_batches(data: TripletBatch, steps: int, batch_size: int, seed: int) -> list[Tensor]:
    """The row indices of each step: reshuffled passes over ``data``, from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    perm = torch.randperm(len(data), generator=g)
    i = 0
    for _ in range(steps):
        if i + batch_size > len(perm):
            perm, i = torch.randperm(len(data), generator=g), 0
        out.append(perm[i : i + batch_size])
        i += batch_size
    return out


def relearn_model(
    ev: "Evaluator",
    sub: Subnetwork | None,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    inspect: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Finetune ``ev``'s model (``sub`` removed; None: the original) on the ControlKG training
    sentences and return every set's metrics afterwards and the training losses. The model is
    restored afterwards; ``inspect`` sees the finetuned model before that (tests)."""
    data = ev.data.control_batch
    batches = relearn_batches(data, steps, min(batch_size, len(data)), seed)
    lm = ev.lm
    losses: list[float] = []
    with trainable(lm), removed(lm, sub):
        opt = torch.optim.AdamW([p for p in lm.model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        for idx in batches:
            loss = sentence_loss(lm, data.tokens[idx], data.lengths[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        lm.model.eval()
        with torch.no_grad():
            after = ev.metrics_now()
        if inspect is not None:
            inspect(lm)
    return {"after": after, "loss_first": losses[0], "loss_last": losses[-1]}


def relearn(
    ev: "Evaluator",
    sub: Subnetwork,
    steps: int,
    *,
    lr: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    before: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Relearning of the original and the remaining model (module docstring). ``before``: the
    evaluation's metrics (``{variant: {set: {...}}}``), else computed."""
    if steps < 1:
        raise RunError(f"--relearn must be at least 1 step, got {steps}")
    lr = lr if lr is not None else (BUNDLED_LR if ev.lm.spec in BUNDLED_NAMES else DEFAULT_LR)
    if not (math.isfinite(lr) and lr > 0):
        raise RunError(f"--relearn-lr must be a finite number > 0, got {lr}")
    before = before or ev.metrics(sub, ("original", "remaining"))
    out: dict[str, Any] = {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "data": f"ControlKG training part ({len(ev.data.control)} sentences, no TargetKG fact)",
    }
    for variant, s in (("original", None), ("remaining", sub)):
        r = relearn_model(ev, s, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
        out[variant] = {
            "before": {k: _pick(v) for k, v in before[variant].items()},
            "after": {k: _pick(v) for k, v in r["after"].items()},
            "loss_first": r["loss_first"],
            "loss_last": r["loss_last"],
        }
    o, rem = out["original"]["before"]["target"], out["remaining"]
    out["recovered"] = {
        m: _share(rem["after"]["target"].get(m), rem["before"]["target"].get(m), o.get(m)) for m in ("top1", "mc")
    }
    return out


def _pick(m: dict[str, float]) -> dict[str, float]:
    return {k: m[k] for k in HEADLINE if k in m}


def _share(after: float | None, before: float | None, original: float | None) -> float | None:
    """(after - before) / (original - before): the share of the removal's drop that came back."""
    if after is None or before is None or original is None or abs(original - before) < 1e-12:
        return None
    return (after - before) / (original - before)
