"""The multi-objective loss of Bayazit et al. (EMNLP 2024), method.md "Loss".

Minimized over mask logits only (model frozen, dropout off). With p the original model's
next-token distribution and q the remaining model's:

1. suppression, TargetKG:  mean over triplets of KL(U || q) at the tail positions;
2. ControlKG maintenance:  mean over triplets of KL(p || q) at the tail positions;
3. ControlLM maintenance:  mean over all token positions of KL(p || q);
4. sparsity:               mean sigmoid(logits), weighted by lambda(t) (2 -> 3 schedule).

Not in the paper, off by default (``tail`` weight 0): 5. the tail term, the mean over TargetKG
triplets of ``margin``: max(0, z(tail) - max_{v != tail} z(v) + 1), i.e. the tail's logit above the
best other token's (minus a 1-nat margin): positive exactly while the tail is, or nearly is, the
model's answer; or ``uniform``: max(0, log q(tail) + log V), the tail's log-probability above the
uniform share that term 1 aims at (docs/method.md, "Perplexity suppressed vs answer changed").

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
from kcs_lens.evaluation.scoring import per_triplet_mean
from kcs_lens.masks.mask import WeightMask
from kcs_lens.model.backends import LensModel

TailPosition = Literal["correct", "released"]
TailKind = Literal["margin", "uniform"]
TAIL_MARGIN = 1.0  # nats: the tail's logit must end this far below the best other token's
TERMS = ("suppression", "control_kg", "control_lm", "tail", "sparsity")


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

    def enabled_terms(self, **losses: Callable[[], Tensor]) -> list[tuple[str, float, Callable[[], Tensor]]]:
        """(name, weight, loss function) of the enabled masked terms, in method.md's order; ``losses``
        maps each of ``suppression``, ``control_kg``, ``control_lm``, ``tail`` to a function computing
        it. The tail term runs only with a positive weight, and goes with the suppression ablation."""
        on = {
            "suppression": self.use_suppression,
            "control_kg": self.use_control_kg,
            "control_lm": self.use_control_lm,
            "tail": self.use_suppression and self.tail > 0,
        }
        return [(t, getattr(self, t), losses[t]) for t in TERMS[:4] if on[t]]


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


def kl_p_to_q(logp: Float[Tensor, "n vocab"], logits_q: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), per row, p given as log-probabilities."""
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


class Objective:
    """The loss of one discovery step, back-propagated into the mask logits.

    Two implementations share this interface and its :meth:`step` loop: :class:`ReferenceObjective`
    (every pass a full forward of the masked model) and
    :class:`~kcs_lens.objective.fast.FastObjective` (same losses and gradients, cheaper). Each
    implements the three masked terms (one forward pass of the remaining model under its own mask
    sample each, unless ``share_sample``) and :meth:`sampling`, the context those passes run in.
    """

    def __init__(self, lm: LensModel, masks: WeightMask, config: LossConfig, *, share_sample: bool = False):
        self.lm = lm
        self.masks = masks
        self.config = config
        self.share_sample = share_sample  # one sample for the step's passes (NOT the paper's default)

    def prepare(self, target: TripletBatch | None = None, control: TripletBatch | None = None) -> None:
        """Precompute what stays fixed for the run (nothing here; see FastObjective)."""

    def suppression(self, target: TripletBatch) -> Tensor:
        """Term 1: mean over triplets of KL(U || q) at the tail positions."""
        raise NotImplementedError

    def control_kg(self, control: TripletBatch) -> Tensor:
        """Term 2: mean over triplets of KL(p || q) at the tail positions."""
        raise NotImplementedError

    def control_lm(self, blocks: Int[Tensor, "n seq"]) -> Tensor:
        """Term 3: mean over all positions of KL(p || q) on ControlLM blocks."""
        raise NotImplementedError

    def tail(self, target: TripletBatch) -> Tensor:
        """Term 5 (not in the paper): mean over triplets of :func:`tail_excess` (``config.tail_kind``)."""
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
        with self.sampling():
            for term, w, fn in c.enabled_terms(
                suppression=lambda: self.suppression(target),
                control_kg=lambda: self.control_kg(control),
                control_lm=lambda: self.control_lm(blocks),
                tail=lambda: self.tail(target),
            ):
                with record_function(f"kcs.{term}.forward"):  # labels for bench/profile_step.py
                    loss = fn()
                if self.share_sample:
                    pending.append(w * loss)
                else:
                    with record_function(f"kcs.{term}.backward"):
                        (w * loss).backward()
                out[term] = float(loss.detach())
                total += w * out[term]
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

    def suppression(self, target: TripletBatch) -> Tensor:
        b = scored(target, self.config.tail_position)
        logits = self.lm(b.tokens)
        return per_triplet_mean(kl_uniform_to_q(logits[b.score_mask]), b).mean()

    def tail(self, target: TripletBatch) -> Tensor:
        logits = self.lm(target.tokens)
        rows = tail_excess(logits[target.score_mask], target.targets[target.score_mask], self.config.tail_kind)
        return per_triplet_mean(rows, target).mean()

    def control_kg(self, control: TripletBatch) -> Tensor:
        b = scored(control, self.config.tail_position)
        logp = self.original_tail_logprobs(control)
        logits = self.lm(b.tokens)
        return per_triplet_mean(kl_p_to_q(logp, logits[b.score_mask]), b).mean()

    def control_lm(self, blocks: Int[Tensor, "n seq"]) -> Tensor:
        logp = self.original_lm_logprobs(blocks)
        logits = self.lm(blocks)
        return kl_p_to_q(logp.flatten(0, 1), logits.flatten(0, 1)).mean()
