"""Evaluating found subnetworks (method.md, "Evaluation"): the remaining model and the subnetwork
alone against the original, and random baselines of the same per-matrix size. ``kcs-lens
evaluate`` is :func:`evaluate_run`, ``kcs-lens baseline`` :func:`baseline_run`; seed overlap is
:mod:`kcs_lens.evaluation.overlap`, the paper-shaped tables :mod:`kcs_lens.evaluation.paper_table`.

Metrics are nested dicts ``{variant: {set: {metric: value}}}`` with variants ``original``,
``remaining`` (theta * (1 - m)) and ``subnetwork`` (theta * m), sets ``target`` (TargetKG),
``control`` (ControlKG validation), ``lm`` (held-out ControlLM text), ``paraphrases`` and any extra
KG given by its spec. Deltas are against the original model, per triplet where they are per triplet.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence, TypedDict

import torch
from jaxtyping import Int
from torch import Tensor
from typing_extensions import Unpack

from kcs_lens.data.triplets import Triplet, TripletBatch, TripletSet, concat, tokenize_triplets
from kcs_lens.discovery.run_data import load_run_data
from kcs_lens.discovery.run_model import ModelOverrides, load_run_model
from kcs_lens.discovery.rundir import RunInfo, load_run
from kcs_lens.errors import RunError
from kcs_lens.evaluation.choice import ChoiceScores, ChoiceSet, DistractorPool, choice_scores, choice_sets
from kcs_lens.evaluation.lens import lens_metrics, lens_ranks
from kcs_lens.evaluation.scoring import TailScores, lm_nll, tail_scores
from kcs_lens.files import atomic_write_json
from kcs_lens.masks.granularity import Keep
from kcs_lens.masks.subnetwork import Subnetwork, random_like
from kcs_lens.model.lens import LensModel
from kcs_lens.stats import spread

VARIANTS: dict[str, Keep | None] = {"original": None, "remaining": "remaining", "subnetwork": "subnetwork"}
Metrics = dict[str, dict[str, dict[str, float]]]  # variant -> set -> metric -> value
LENS_SETS = ("target", "paraphrases")  # the removed facts, whose tail the logit lens looks for at every layer
Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------
# Scoring the three variants
# ------------------------------------------------------------------------------------------
def set_metrics(
    s: TailScores,
    o: TailScores | None,
    c: ChoiceScores | None = None,
    oc: ChoiceScores | None = None,
    lens: Tensor | None = None,
) -> dict[str, float]:
    """PPL, mean tail rank / log-prob, top-k and, with ``c``, multiple choice (``mc``, ``mc_norm``,
    ``mc_prob``, ``mc_chance``), with ``lens`` (ranks per layer) the logit-lens shares; with ``o`` /
    ``oc`` (original) also deltas (per-triplet mean/min/max)."""
    m = {
        "ppl": s.ppl,
        "rank_mean": s.rank_mean,
        "logprob_mean": float(s.first_logprob.mean()),
        **{f"top{k}": s.topk(k) for k in (1, 5, 10)},
    }
    if o is not None:
        dr, dl = (s.first_rank - o.first_rank).float(), s.first_logprob - o.first_logprob
        m.update(dppl=s.ppl - o.ppl, ppl_ratio=s.ppl / o.ppl)
        for name, d in (("drank", dr), ("dlogprob", dl)):
            m.update({f"{name}_mean": float(d.mean()), f"{name}_min": float(d.min()), f"{name}_max": float(d.max())})
        m.update({f"dtop{k}": s.topk(k) - o.topk(k) for k in (1, 5, 10)})
    if c is not None:
        m.update(c.headline())
        if oc is not None:
            m.update(dmc=c.accuracy() - oc.accuracy(), dmc_norm=c.accuracy(norm=True) - oc.accuracy(norm=True))
    if lens is not None:
        m.update(lens_metrics(lens))
    return m


class Evaluator:
    """A model plus the evaluation sets of one run; the original model's scores are computed once.

    ``kgs``: extra KG specs evaluated against the same subnetwork. ``paraphrases``: KG specs of
    other verbalizations of the TargetKG (merged into the set ``paraphrases``); ``None``: the run's
    own unseen wordings (its ``paraphrases`` setting, the bundled ``<target>-paraphrases``, or the
    rows ``train_templates`` held out). ``distractors``: KG specs whose tails join the
    multiple-choice pool (beside the run's own ``distractors``). Every triplet set is also scored
    as multiple choice (:mod:`kcs_lens.evaluation.choice`) unless the run's ``mc_choices`` is 0.
    """

    def __init__(
        self,
        run: RunInfo,
        *,
        kgs: Sequence[str] = (),
        paraphrases: Sequence[str] | None = None,
        distractors: Sequence[str] = (),
        lens_model: LensModel | None = None,
        overrides: ModelOverrides | None = None,
        log: Log = print,
    ):
        from kcs_lens.data.loaders import load_kg

        cfg = self.config = run.config
        self.lm = load_run_model(run, overrides, lens_model=lens_model)
        data = self.data = load_run_data(cfg, self.lm, log)
        self.batches: dict[str, TripletBatch] = {"target": data.target_batch, "control": data.control_val_batch}
        triplets: dict[str, TripletSet] = {"target": data.target, "control": data.control_val}
        val_spec = cfg.control_val_source or f"{cfg.control_kg} (first {cfg.control_val_size})"
        self.sets: dict[str, dict[str, Any]] = {
            "target": {"spec": cfg.target_kg, "n": len(data.target)},
            "control": {
                "spec": val_spec + ("" if data.control_test is None else " (validation part)"),
                "n": len(data.control_val),
            },
        }
        if data.control_test is not None and data.control_test_batch is not None:
            self.batches["control_test"] = data.control_test_batch
            triplets["control_test"] = data.control_test
            self.sets["control_test"] = {
                "spec": f"{val_spec} (last {len(data.control_test)}, held out)",
                "n": len(data.control_test),
            }
        tok = lambda ts, src: tokenize_triplets(
            ts,
            self.lm.tokenizer,
            prepend_bos=cfg.prepend_bos,
            tail_scoring=cfg.tail_scoring,
            d_vocab=self.lm.shape.d_vocab,
            source=src,
            n_ctx=self.lm.shape.n_ctx,
        ).to(self.lm.device)
        extra: dict[str, TripletSet] = {}  # sets beside the run's: their multiple choice adds their own tails
        if paraphrases is None and data.paraphrases is not None and data.paraphrases_batch is not None:
            # the run's own unseen wordings (its --paraphrases, the bundled set, or the --train-templates split)
            self.batches["paraphrases"] = data.paraphrases_batch
            extra["paraphrases"] = data.paraphrases
            self.sets["paraphrases"] = {"spec": data.paraphrases.source or str(cfg.paraphrases), "n": len(data.paraphrases)}
        elif paraphrases:
            ts = concat([load_kg(p, model_name=self.lm.spec) for p in paraphrases], name="paraphrases")
            self.batches["paraphrases"] = tok(ts, "paraphrases")
            extra["paraphrases"] = ts
            self.sets["paraphrases"] = {"spec": ", ".join(paraphrases), "n": len(ts)}
        for spec in kgs:
            name = str(spec) if str(spec) not in self.batches else f"kg:{spec}"
            ts = extra[name] = load_kg(spec, model_name=self.lm.spec)
            self.batches[name] = tok(ts, str(spec))
            self.sets[name] = {"spec": str(spec), "n": len(ts)}
        self.choices: dict[str, ChoiceSet] = {}
        if cfg.mc_choices:
            # the run's own pool (as in discovery, so the run's sets get the same choices), plus --distractors;
            # a paraphrase or --kg set draws from that pool and its own tails
            pool = DistractorPool([data.target, data.control, data.control_val, *triplets.values()])
            for spec in [*([cfg.distractors] if cfg.distractors else []), *distractors]:
                pool.add(load_kg(spec, model_name=self.lm.spec, templates=cfg.templates))
            kw: dict[str, Any] = dict(k=cfg.mc_choices, prepend_bos=cfg.prepend_bos, d_vocab=self.lm.shape.d_vocab)
            self.choices = choice_sets(triplets, pool, self.lm.tokenizer, **kw)
            for name, ts in extra.items():
                self.choices |= choice_sets({name: ts}, pool.extended(ts), self.lm.tokenizer, **kw)
            for name, cs in self.choices.items():
                self.sets[name]["multiple_choice"] = cs.describe()
        # the triplets of every triplet set, in their batches' order (per-fact answers)
        self.triplets: dict[str, list[Triplet]] = {k: ts.triplets for k, ts in {**triplets, **extra}.items()}
        self.lm_blocks = data.lm_heldout
        self.sets["lm"] = {
            "spec": f"{cfg.lm_source} (held-out)",
            "n_blocks": int(self.lm_blocks.shape[0]),
            "block_len": int(self.lm_blocks.shape[1]),
        }
        self.original = self.scores(None)

    def scores(self, sub: Subnetwork | None, keep: Keep = "remaining") -> dict[str, Any]:
        """Raw scores of every set: TailScores per triplet set, mean NLL for ``lm``."""
        with nullcontext() if sub is None else sub.applied(self.lm, keep=keep):
            return self._scores_now()

    def metrics_now(self) -> dict[str, dict[str, float]]:
        """Every set's metrics for the model as it is now (no deltas): after relearning."""
        s = self._scores_now()
        m = {k: set_metrics(s[k], None, s["mc"].get(k), None, s["lens"].get(k)) for k in self.batches}
        m["lm"] = {"ppl": math.exp(s["lm"])}
        return m

    def _scores_now(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: tail_scores(self.lm, b) for k, b in self.batches.items()}
        out["mc"] = {k: choice_scores(self.lm, c) for k, c in self.choices.items()}
        out["lens"] = {k: lens_ranks(self.lm, self.batches[k]) for k in LENS_SETS if k in self.batches}
        out["lm"] = lm_nll(self.lm, self.lm_blocks)
        return out

    def metrics(self, sub: Subnetwork, variants: Sequence[str] = tuple(VARIANTS)) -> Metrics:
        out: Metrics = {}
        for v in variants:
            keep = VARIANTS[v]
            s = self.original if keep is None else self.scores(sub, keep)
            o = None if keep is None else self.original
            mc, omc = s["mc"], None if o is None else o["mc"]
            m = {
                k: set_metrics(
                    s[k], None if o is None else o[k], mc.get(k), None if omc is None else omc.get(k), s["lens"].get(k)
                )
                for k in self.batches
            }
            ppl = math.exp(s["lm"])
            m["lm"] = (
                {"ppl": ppl} if o is None else {"ppl": ppl, "dppl": ppl - math.exp(o["lm"]), "ppl_ratio": ppl / math.exp(o["lm"])}
            )
            out[v] = m
        return out


def fact_answers(ev: Evaluator, sub: Subnetwork) -> dict[str, list[dict[str, Any]]]:
    """Per triplet of every triplet set: the model's answer (top token at the tail's first scored
    position) and the tail's rank and log-prob there, original -> remaining model. What the run
    page's per-fact table shows: which facts lost their answer and what the model says instead."""
    with sub.applied(ev.lm, keep="remaining"):
        rem = {k: tail_scores(ev.lm, b) for k, b in ev.batches.items()}
        rem_mc = {k: choice_scores(ev.lm, c) for k, c in ev.choices.items()}
    word = lambda i: ev.lm.tokenizer.decode([int(i)])
    out: dict[str, list[dict[str, Any]]] = {}
    for k, triplets in ev.triplets.items():
        o, r = ev.original[k], rem[k]
        mc: dict[int, dict[str, str]] = {}
        if k in ev.choices:  # multiple choice: the tail each model picks among the set's choices
            cs = ev.choices[k]
            scored = [i for i in range(cs.n_triplets) if i not in set(cs.skipped)]
            picks = {v: _picked(sc) for v, sc in (("original", ev.original["mc"][k]), ("remaining", rem_mc[k]))}
            mc = {i: {f"mc_{v}": cs.choices[j][int(p[j])] for v, p in picks.items()} for j, i in enumerate(scored)}
        out[k] = [
            {
                "head": t.head,
                "relation": t.relation,
                "tail": t.tail,
                "text": t.text,
                "answer_original": word(o.first_top[i]),
                "answer_remaining": word(r.first_top[i]),
                "rank_original": int(o.first_rank[i]),
                "rank_remaining": int(r.first_rank[i]),
                "logprob_original": float(o.first_logprob[i]),
                "logprob_remaining": float(r.first_logprob[i]),
                **mc.get(i, {}),
            }
            for i, t in enumerate(triplets)
        ]
    return out


def _picked(sc: ChoiceScores) -> Int[Tensor, " items"]:
    """Per scored triplet: the position, among its choices (true tail first), of the best-scored one."""
    best = torch.full((sc.n_items,), float("-inf"), dtype=sc.sum_logprob.dtype)
    best = best.scatter_reduce(0, sc.item, sc.sum_logprob, "amax")
    counts = torch.bincount(sc.item, minlength=sc.n_items)
    starts = counts.cumsum(0) - counts  # an item's rows are contiguous, its true tail first
    pos = torch.arange(len(sc.item)) - starts[sc.item]
    hit = sc.sum_logprob >= best[sc.item]
    return torch.full((sc.n_items,), 10**9, dtype=torch.long).scatter_reduce(0, sc.item[hit], pos[hit], "amin")


# ------------------------------------------------------------------------------------------
# evaluate / baseline
# ------------------------------------------------------------------------------------------
class EvalInputs(TypedDict, total=False):
    """What :func:`evaluate_run` and :func:`baseline_run` score a run on and with (every key
    optional): ``kgs`` more KG specs, one set each; ``paraphrases`` other wordings of the TargetKG
    (None: the run's own); ``distractors`` KG specs whose tails join the multiple-choice pool;
    ``subnetwork`` a subnetwork file instead of the run's; ``evaluator`` one already built (it then
    holds the sets and the model); ``save`` True (default) writes the JSON into the run directory, a
    path writes there, False nothing; ``log``; ``overrides`` / ``lens_model`` the run's model
    (:func:`~kcs_lens.discovery.run_model.load_run_model`)."""

    kgs: Sequence[str]
    paraphrases: Sequence[str] | None
    distractors: Sequence[str]
    subnetwork: str | os.PathLike | None
    evaluator: Evaluator | None
    save: str | os.PathLike | bool
    log: Log
    overrides: ModelOverrides | None
    lens_model: LensModel | None


def _evaluator(run: str | os.PathLike | RunInfo, inputs: EvalInputs) -> tuple[RunInfo, Evaluator]:
    """The run (its subnetwork possibly replaced) and the evaluator of ``inputs``."""
    info = run if isinstance(run, RunInfo) else load_run(run, inputs.get("subnetwork"))
    ev = inputs.get("evaluator") or Evaluator(
        info,
        kgs=inputs.get("kgs", ()),
        paraphrases=inputs.get("paraphrases"),
        distractors=inputs.get("distractors", ()),
        log=inputs.get("log", print),
        overrides=inputs.get("overrides"),
        lens_model=inputs.get("lens_model"),
    )
    return info, ev


def evaluate_run(
    run: str | os.PathLike | RunInfo, *, relearn_steps: int = 0, relearn_lr: float | None = None, **inputs: Unpack[EvalInputs]
) -> dict[str, Any]:
    """Everything ``kcs-lens evaluate`` shows (``RUN/evaluation.json``), on the sets of ``inputs``
    (:class:`EvalInputs`). ``relearn_steps``: also finetune the original and the remaining model
    that many steps on the ControlKG training sentences and score them again
    (:mod:`kcs_lens.evaluation.relearn`)."""
    info, ev = _evaluator(run, inputs)
    out = {
        **info.header(),
        "sets": ev.sets,
        "subnetwork": info.subnetwork.density_stats(),
        "metrics": ev.metrics(info.subnetwork),
        "facts": fact_answers(ev, info.subnetwork),
    }
    if relearn_steps:
        from kcs_lens.evaluation.relearn import relearn

        inputs.get("log", print)(f"relearning: {relearn_steps} finetuning steps of the original and of the remaining model")
        out["relearn"] = relearn(ev, info.subnetwork, relearn_steps, lr=relearn_lr, before=out["metrics"])
    _save(out, inputs.get("save", True), info.files.evaluation)
    return out


def baseline_run(
    run: str | os.PathLike | RunInfo, *, draws: int = 5, seed: int = 0, **inputs: Unpack[EvalInputs]
) -> dict[str, Any]:
    """Random subnetworks of the run's per-matrix sizes (``draws`` of them, seeds ``seed``, ``seed+1``...):
    mean and spread of every metric, next to the run's own (``run_metrics``), on the sets of
    ``inputs`` (:class:`EvalInputs`; saved as ``RUN/baseline.json``)."""
    if draws < 1:
        raise RunError(f"--draws must be at least 1, got {draws}")
    info, ev = _evaluator(run, inputs)
    per_draw = []
    for i in range(draws):
        rnd = random_like(info.subnetwork, torch.Generator().manual_seed(seed + i))
        per_draw.append({"metrics": ev.metrics(rnd, ("remaining", "subnetwork")), "density": rnd.density_stats()["density"]})
    out = {
        **info.header(),
        "draws": draws,
        "draw_seeds": [seed + i for i in range(draws)],
        "sets": ev.sets,
        "subnetwork": info.subnetwork.density_stats(),
        "run_metrics": ev.metrics(info.subnetwork),
        "baseline": spread(per_draw),
        "per_draw": [p["metrics"] for p in per_draw],
    }
    _save(out, inputs.get("save", True), info.files.baseline)
    return out


def _save(obj: dict[str, Any], save: str | os.PathLike | bool, default: Path) -> None:
    if save:
        atomic_write_json(default if save is True else Path(save), obj)
