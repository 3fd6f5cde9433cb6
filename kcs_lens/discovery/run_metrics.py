"""What every evaluation of a discovery run records (``metrics.jsonl``; the deterministic mask,
or the masks off for the original model): tail PPL, answers, multiple choice and the logit lens on
each triplet set, LM PPL on held-out text (:func:`evaluate_split`), with deltas and ratios against
the original (:func:`with_ratios`); and which of those numbers ``summary.json`` keeps."""

from __future__ import annotations

import math

from kcs_lens.data.triplets import TripletBatch
from kcs_lens.discovery.run_data import RunData
from kcs_lens.discovery.shared import SharedInputs, digest
from kcs_lens.evaluation.choice import ChoiceSet, choice_scores
from kcs_lens.evaluation.lens import LENS_TOPK, lens_metrics, lens_ranks
from kcs_lens.evaluation.scoring import lm_nll, tail_scores
from kcs_lens.model.lens import LensModel


def eval_batches(data: RunData) -> dict[str, TripletBatch]:
    """The triplet sets every evaluation scores: TargetKG, ControlKG validation and, where the run
    has them, the ControlKG test part and the unseen wordings (``paraphrases``; no selection
    criterion reads these two)."""
    out = {"target": data.target_batch, "control": data.control_val_batch}
    if data.control_test_batch is not None:
        out["control_test"] = data.control_test_batch
    if data.paraphrases_batch is not None:
        out["paraphrases"] = data.paraphrases_batch
    return out


def evaluate_split(
    lm: LensModel, data: RunData, choices: dict[str, ChoiceSet] | None = None, shared: SharedInputs | None = None
) -> dict[str, float]:
    """Tail PPL, top-1 accuracy and mean rank of the tail's first token
    (:class:`~kcs_lens.evaluation.scoring.TailScores`) and, with ``choices``, multiple-choice accuracy
    (:mod:`kcs_lens.evaluation.choice`) on every set of :func:`eval_batches`, the TargetKG's
    logit-lens share (:mod:`kcs_lens.evaluation.lens`); LM PPL on held-out text; for what ``lm`` is now.
    ``shared``: the original model's values of earlier runs on the same tokens (masks off only)."""
    out: dict[str, float] = {}
    for name, batch in eval_batches(data).items():
        cs = choices.get(name) if choices else None

        def part(name: str = name, batch: TripletBatch = batch, cs: ChoiceSet | None = cs) -> dict[str, float]:
            res = {f"{name}_{k}": v for k, v in tail_scores(lm, batch).headline().items()}
            if cs is not None:
                mc = choice_scores(lm, cs).headline()
                res.update({f"{name}_{k}": v for k, v in mc.items() if k != "mc_chance"})
            if name == "target":
                res[f"target_lens_top{LENS_TOPK}_any"] = lens_metrics(lens_ranks(lm, batch))[f"lens_top{LENS_TOPK}_any"]
            return res

        out.update(shared.original((name, digest(batch), digest(cs)), part) if shared else part())
    lm_part = lambda: {"lm_ppl": math.exp(lm_nll(lm, data.lm_heldout))}
    out.update(shared.original(("lm", digest(data.lm_heldout)), lm_part) if shared else lm_part())
    return out


# What summary.json keeps of the selected evaluation (older runs' records lack the ranks, the
# multiple choice and the ControlKG test part).
REMAINING_KEYS = tuple(
    f"{s}_{m}"
    for s in ("target", "control", "control_test", "paraphrases")
    for m in ("ppl", "top1", "rank", "mc", "mc_norm", "mc_prob")
) + ("lm_ppl", f"target_lens_top{LENS_TOPK}_any")


RATIO_SETS = ("target", "control", "lm", "control_test", "paraphrases")


def with_ratios(rem: dict[str, float], orig: dict[str, float]) -> dict[str, float]:
    """The record plus PPL deltas and ratios (remaining / original) of every set it has."""
    out = dict(rem)
    for k in RATIO_SETS:
        if f"{k}_ppl" in rem and f"{k}_ppl" in orig:
            out[f"{k}_dppl"] = rem[f"{k}_ppl"] - orig[f"{k}_ppl"]
            out[f"{k}_ratio"] = rem[f"{k}_ppl"] / orig[f"{k}_ppl"]
    return out
