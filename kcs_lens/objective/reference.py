"""The multi-objective loss of Bayazit et al. (EMNLP 2024), method.md "Loss".

Minimized over mask logits only (model frozen, dropout off). With p the original model's
next-token distribution and q the remaining model's:

1. suppression, TargetKG:  mean over triplets of KL(U || q) at the tail positions;
2. ControlKG maintenance:  mean over triplets of KL(p || q) at the tail positions;
3. ControlLM maintenance:  mean over all token positions of KL(p || q);
4. sparsity:               mean sigmoid(logits), weighted by lambda(t) (2 -> 3 schedule).

Not in the paper, off by default (weight 0), each read from the same masked TargetKG pass as term 1
(docs/method.md, "Terms beyond the paper"):

5. the tail term, the mean over TargetKG triplets of ``margin``: max(0, z(tail) - max_{v != tail} z(v)
   + 1), i.e. the tail's logit above the best other token's (minus a 1-nat margin): positive exactly
   while the tail is, or nearly is, the model's answer; or ``uniform``: max(0, log q(tail) + log V),
   the tail's log-probability above the uniform share that term 1 aims at;
6. the distractor term: at each triplet's first tail position, the tail against ``k`` other tails of
   its relation drawn afresh each step (:mod:`kcs_lens.objective.distractors`): ``margin``:
   max(0, z(tail) - max_j z(d_j) + 1); ``uniform``: KL(U || softmax over {tail, d_1..d_k});
7. the lens term: the logit lens (final norm and unembedding) of the residual stream after every
   masked block below the last, mean over those layers and the scored positions of max(0, z_l(tail)
   - z_l(the ``lens_topk``-th best other token) + 1): positive while the tail is in that layer's top k.

:class:`Objective` is the interface and the step loop; :class:`ReferenceObjective` is the
straightforward implementation (every pass a full forward of the masked model, p recomputed with
the masks switched off: the same weights, no second model copy, a fresh mask sample per pass).
The fast implementation is :class:`kcs_lens.objective.fast.FastObjective`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.autograd.profiler import record_function

from kcs_lens.data.triplets import TripletBatch
from kcs_lens.errors import ConfigError
from kcs_lens.evaluation.scoring import per_triplet_mean
from kcs_lens.masks.mask import WeightMask
from kcs_lens.model.lens import LensModel
from kcs_lens.objective.distractors import DistractorPools

TailPosition = Literal["correct", "released"]
TailKind = Literal["margin", "uniform"]
TAIL_MARGIN = 1.0  # nats: the tail's logit must end this far below the best other token's
TERMS = ("suppression", "tail", "distractor", "lens", "control_kg", "control_lm", "sparsity")
TARGET_TERMS = ("suppression", "tail", "distractor", "lens")  # read from one masked TargetKG pass


@dataclass
class LossConfig:
    """Weights and switches of the four terms (released defaults: 1.5, 1, 1, lambda 2 -> 3)."""

    suppression: float = 1.5
    control_kg: float = 1.0
    control_lm: float = 1.0
    sparsity_start: float = 2.0
    sparsity_end: float = 3.0
    tail: float = 0.0  # weight of term 5 (not in the paper; 0: off)
    tail_kind: TailKind = "margin"
    distractor: float = 0.0  # weight of term 6 (not in the paper; 0: off)
    distractor_kind: TailKind = "margin"
    distractor_k: int = 4  # distractors drawn per triplet and step
    lens: float = 0.0  # weight of term 7 (not in the paper; 0: off)
    lens_topk: int = 10
    use_suppression: bool = True
    use_control_kg: bool = True
    use_control_lm: bool = True
    use_sparsity: bool = True
    tail_position: TailPosition = "correct"

    def sparsity_weight(self, step: int, total_steps: int) -> float:
        """lambda_reg(t): constant until the middle of training, then linear to the end value."""
        half = total_steps / 2
        if step < half or total_steps <= 1:
            return self.sparsity_start
        frac = min(1.0, (step - half) / max(total_steps - 1 - half, 1))
        return self.sparsity_start + (self.sparsity_end - self.sparsity_start) * frac

    def to_dict(self) -> dict:
        return asdict(self)

    def ablated(self, ablation: str) -> "LossConfig":
        """This config with one term switched off, as in the paper's ablations (``full``: none)."""
        return replace(self, **ABLATIONS[ablation])

    def target_terms(self) -> dict[str, float]:
        """The enabled TargetKG terms and their weights, all read from one masked pass: term 1, and
        terms 5-7 where their weight is positive; the suppression ablation drops them all."""
        if not self.use_suppression:
            return {}
        out = {"suppression": self.suppression}
        out.update({t: getattr(self, t) for t in TARGET_TERMS[1:] if getattr(self, t) > 0})
        return out


Ablation = Literal["full", "no-suppression", "no-control-kg", "no-control-lm", "no-sparsity"]
ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "no-suppression": {"use_suppression": False},
    "no-control-kg": {"use_control_kg": False},
    "no-control-lm": {"use_control_lm": False},
    "no-sparsity": {"use_sparsity": False},
}


def kl_uniform_to_q(logits: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """KL(U || q) = -log V - mean_v log q_v, per row."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return -math.log(logits.shape[-1]) - logq.mean(-1)


def tail_excess(logits: Float[Tensor, "n vocab"], tails: Int[Tensor, " n"], kind: TailKind = "margin") -> Float[Tensor, " n"]:
    """Per row, ``margin``: max(0, z(tail) - max_{v != tail} z(v) + TAIL_MARGIN), the tail's lead over
    the best other token (log q differences equal logit differences); ``uniform``: max(0, log q(tail)
    + log V), how far the tail's log-probability is above 1/V."""
    z = logits.float()
    t = tails[:, None].to(z.device)
    zt = z.gather(-1, t)[:, 0]
    if kind == "uniform":
        return torch.relu(zt - torch.logsumexp(z, -1) + math.log(z.shape[-1]))
    best_other = z.scatter(-1, t, float("-inf")).amax(-1)
    return torch.relu(zt - best_other + TAIL_MARGIN)


def first_scored(batch: TripletBatch) -> Int[Tensor, " batch"]:
    """Index, among the scored positions in row-major order, of each triplet's first one."""
    counts = batch.score_mask.sum(1)
    return torch.cumsum(counts, 0) - counts


def distractor_excess(
    logits: Float[Tensor, "b vocab"], tails: Int[Tensor, " b"], distractors: Int[Tensor, "b k"], kind: TailKind = "margin"
) -> Float[Tensor, " b"]:
    """Per row, the tail against the drawn distractors. ``margin``: max(0, z(tail) - max_j z(d_j) +
    TAIL_MARGIN); ``uniform``: KL(U || softmax over the k + 1 candidates), 0 when all are equal."""
    z = logits.float()
    zt = z.gather(-1, tails[:, None].to(z.device))
    zd = z.gather(-1, distractors.to(z.device))
    if kind == "margin":
        return torch.relu(zt[:, 0] - zd.amax(-1) + TAIL_MARGIN)
    logq = torch.log_softmax(torch.cat([zt, zd], -1), -1)
    return -math.log(logq.shape[-1]) - logq.mean(-1)


def rank_excess(logits: Float[Tensor, "n vocab"], tails: Int[Tensor, " n"], k: int) -> Float[Tensor, " n"]:
    """Per row, max(0, z(tail) - (the k-th largest logit of the other tokens) + TAIL_MARGIN):
    positive while the tail is among the top k, or within the margin of it."""
    z = logits.float()
    t = tails[:, None].to(z.device)
    kth = z.scatter(-1, t, float("-inf")).topk(k, dim=-1).values[:, -1]
    return torch.relu(z.gather(-1, t)[:, 0] - kth + TAIL_MARGIN)


def target_losses_from_logits(
    config: LossConfig,
    batch: TripletBatch,
    logits: Float[Tensor, "n_scored vocab"],
    lens_logits: dict[int, Float[Tensor, "n_scored vocab"]],
    distractors: Int[Tensor, "batch k"] | None,
) -> dict[str, Tensor]:
    """Every enabled TargetKG term (:meth:`LossConfig.target_terms`) from one masked pass: the
    logits at the scored positions (row-major) and, for the lens term, the logit lens of each
    masked layer below the last at the same positions. Shared by both objectives."""
    terms = config.target_terms()
    sm = batch.score_mask
    tails = batch.targets[:, : sm.shape[1]][sm]
    out: dict[str, Tensor] = {"suppression": per_triplet_mean(kl_uniform_to_q(logits), batch).mean()}
    if "tail" in terms:
        out["tail"] = per_triplet_mean(tail_excess(logits, tails, config.tail_kind), batch).mean()
    if "distractor" in terms:
        if distractors is None:
            raise ValueError("the distractor term needs distractors (ObjectiveOptions(distractors=DistractorPools...))")
        first = first_scored(batch).to(logits.device)
        out["distractor"] = distractor_excess(logits[first], tails[first], distractors, config.distractor_kind).mean()
    if "lens" in terms:
        per_layer = [per_triplet_mean(rank_excess(z, tails, config.lens_topk), batch).mean() for z in lens_logits.values()]
        out["lens"] = torch.stack(per_layer).mean()
    return {t: out[t] for t in terms}


def kl_p_to_q(logp: Float[Tensor, "n vocab"], logits_q: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), per row, p given as log-probabilities."""
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@dataclass(frozen=True)
class ObjectiveOptions:
    """What every objective takes beside the model, its masks and the loss weights:
    ``share_sample``, one mask sample per step shared by its passes (CHANGES THE METHOD, not the
    paper's default); ``distractors``, the distractor term's pools (None: the term is off)."""

    share_sample: bool = False
    distractors: DistractorPools | None = None


class Objective:
    """The loss of one discovery step, back-propagated into the mask logits.

    Two implementations share this interface and its :meth:`step` loop: :class:`ReferenceObjective`
    (every pass a full forward of the masked model) and
    :class:`~kcs_lens.objective.fast.FastObjective` (same losses and gradients, cheaper). Each
    implements the three masked terms (one forward pass of the remaining model under its own mask
    sample each, unless ``share_sample``) and :meth:`sampling`, the context those passes run in.
    """

    def __init__(self, lm: LensModel, masks: WeightMask, config: LossConfig, options: ObjectiveOptions = ObjectiveOptions()):
        self.lm = lm
        self.masks = masks
        self.config = config
        self.share_sample = options.share_sample  # one sample for the step's passes (NOT the paper's default)
        self.distractors = options.distractors  # the distractor term's pools (None: the term is off)
        terms = config.target_terms()
        if "distractor" in terms and self.distractors is None:
            raise ValueError("the distractor term (weight > 0) needs ObjectiveOptions(distractors=DistractorPools.build(...))")
        # the lens term's layers: every masked block below the last block (the last one's output is the logits)
        self.lens_layers = tuple(l for l in sorted(masks.config.layers) if l < lm.shape.n_layers - 1) if "lens" in terms else ()
        if "lens" in terms and not self.lens_layers:
            raise ConfigError(
                "--lens-weight > 0 needs a masked block below the last one (--layers): the lens term reads the "
                "residual stream after each masked block except the last"
            )

    def prepare(self, target: TripletBatch | None = None, control: TripletBatch | None = None) -> None:
        """Precompute what stays fixed for the run (nothing here; see FastObjective)."""

    def target_losses(self, target: TripletBatch, step: int = 0) -> dict[str, Tensor]:
        """Every enabled TargetKG term (term 1 and the enabled ones of 5-7) from ONE masked pass
        (one mask sample); ``step`` seeds the distractor draw."""
        raise NotImplementedError

    def suppression(self, target: TripletBatch) -> Tensor:
        """Term 1 alone: mean over triplets of KL(U || q) at the tail positions."""
        return self.target_losses(target)["suppression"]

    def control_kg(self, control: TripletBatch) -> Tensor:
        """Term 2: mean over triplets of KL(p || q) at the tail positions."""
        raise NotImplementedError

    def control_lm(self, blocks: Int[Tensor, "n seq"]) -> Tensor:
        """Term 3: mean over all positions of KL(p || q) on ControlLM blocks."""
        raise NotImplementedError

    def density(self) -> Tensor:
        """Term 4 (unweighted): the expected density, mean sigmoid(logits)."""
        return self.masks.expected_density()

    def cache_mb(self) -> dict[str, float]:
        """Memory held by per-run caches, per cache (none here)."""
        return {}

    def sampling(self) -> contextlib.AbstractContextManager[Any]:
        """The context in which one step's masked passes run."""
        raise NotImplementedError

    def step(
        self, target: TripletBatch, control: TripletBatch, blocks: Int[Tensor, "n seq"], step: int, total_steps: int
    ) -> dict[str, float]:
        """Forward and backward of every enabled term; gradients accumulate in the mask logits (the
        caller steps the optimizer). Returns the unweighted terms, the sparsity weight and the
        weighted total. With ``share_sample`` the passes share one sample and one backward."""
        c = self.config
        out: dict[str, float] = {}
        total = 0.0
        pending: list[Tensor] = []
        groups: list[tuple[str, dict[str, float], Callable[[], dict[str, Tensor]]]] = []
        tw = c.target_terms()
        if tw:  # one masked TargetKG pass for all of them
            groups.append(("suppression" if len(tw) == 1 else "target", tw, lambda: self.target_losses(target, step)))
        if c.use_control_kg:
            groups.append(("control_kg", {"control_kg": c.control_kg}, lambda: {"control_kg": self.control_kg(control)}))
        if c.use_control_lm:
            groups.append(("control_lm", {"control_lm": c.control_lm}, lambda: {"control_lm": self.control_lm(blocks)}))
        with self.sampling():
            for label, weights, fn in groups:
                with record_function(f"kcs.{label}.forward"):  # labels for bench/profile_step.py
                    losses = fn()
                    weighted = [w * losses[t] for t, w in weights.items()]
                    loss = weighted[0] if len(weighted) == 1 else torch.stack(weighted).sum()
                if self.share_sample:
                    pending.append(loss)
                else:
                    with record_function(f"kcs.{label}.backward"):
                        loss.backward()
                for t, w in weights.items():
                    out[t] = float(losses[t].detach())
                    total += w * out[t]
            if pending:
                torch.stack(pending).sum().backward()
        lam = c.sparsity_weight(step, total_steps)
        density = self.density()
        if c.use_sparsity:
            with record_function("kcs.sparsity.backward"):
                (lam * density).backward()
            total += lam * float(density.detach())
        out["sparsity"] = float(density.detach())
        out["lambda"] = lam
        out["total"] = total
        return out


def scored(batch: TripletBatch, tail_position: TailPosition) -> TripletBatch:
    """The batch whose score mask the losses use (``released``: the authors' off-by-one)."""
    return batch.shifted_to_tail_token() if tail_position == "released" else batch


class ReferenceObjective(Objective):
    """The straightforward implementation: every pass a full forward of the masked model, p
    recomputed each time with the masks switched off, a fresh sample per pass."""

    def sampling(self) -> contextlib.AbstractContextManager[Any]:
        return self.masks.using("sample", "remaining", hold=self.share_sample)

    @torch.no_grad()
    def original_tail_logprobs(self, batch: TripletBatch) -> Float[Tensor, "n_scored vocab"]:
        b = scored(batch, self.config.tail_position)
        with self.masks.using("off"), record_function("kcs.original"):
            logits = self.lm(b.tokens)
        return torch.log_softmax(logits[b.score_mask].float(), dim=-1)

    @torch.no_grad()
    def original_lm_logprobs(self, blocks: Int[Tensor, "n seq"]) -> Float[Tensor, "n seq vocab"]:
        with self.masks.using("off"), record_function("kcs.original"):
            return torch.log_softmax(self.lm(blocks).float(), dim=-1)

    def target_losses(self, target: TripletBatch, step: int = 0) -> dict[str, Tensor]:
        b = scored(target, self.config.tail_position)
        logits, resid = self.lm.with_resid_post(b.tokens, self.lens_layers)
        lens = {l: self.lm.unembed(self.lm.final_norm(resid[l]))[b.score_mask] for l in self.lens_layers}
        d = (
            self.distractors.draw(b, step)
            if self.distractors is not None and "distractor" in self.config.target_terms()
            else None
        )
        return target_losses_from_logits(self.config, b, logits[b.score_mask], lens, d)

    def control_kg(self, control: TripletBatch) -> Tensor:
        b = scored(control, self.config.tail_position)
        logp = self.original_tail_logprobs(control)
        logits = self.lm(b.tokens)
        return per_triplet_mean(kl_p_to_q(logp, logits[b.score_mask]), b).mean()

    def control_lm(self, blocks: Int[Tensor, "n seq"]) -> Tensor:
        logp = self.original_lm_logprobs(blocks)
        logits = self.lm(blocks)
        return kl_p_to_q(logp.flatten(0, 1), logits.flatten(0, 1)).mean()
