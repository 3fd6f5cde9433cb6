"""Differentiable weight masks attached to a model's unprocessed weights (method.md, "Masks").

The granularities (weight, row, head) and the unit expansion are :mod:`kcs_lens.masks.granularity`;
what a mask covers is :class:`~kcs_lens.masks.mask_config.MaskConfig`. Masks attach through ``torch.nn.utils.parametrize`` at the
:class:`~kcs_lens.model.loading.WeightSite` of each matrix, so the model's hooks keep working and
detaching restores the weights exactly.

What the model sees is set by :attr:`WeightMask.mode` and :attr:`WeightMask.keep`:

- ``mode="off"``: the original model (masks are not applied at all);
- ``mode="sample"``: a fresh Gumbel-sigmoid sample per forward pass, hard-thresholded with a
  straight-through estimator (training);
- ``mode="eval"``: the deterministic mask, subnetwork = {logit > 0};
- ``keep="remaining"``: the model without the subnetwork, theta * (1 - m); ``keep="subnetwork"``:
  the subnetwork alone, theta * m.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kcs_lens.errors import MaskError
from kcs_lens.masks.granularity import Keep, expand_units, param_shape
from kcs_lens.masks.mask_config import MaskConfig, param_names_of
from kcs_lens.model.canonical import ModelShape, canonical_shape, parse_weight_name
from kcs_lens.model.lens import LensModel

Mode = Literal["off", "sample", "eval"]


def _key(name: str) -> str:
    return name.replace(".", "__")


class _MaskParametrization(nn.Module):
    """``W -> W * mask`` in the weight's native layout; the mask comes from the owning WeightMask."""

    _owner: "WeightMask"

    def __init__(self, owner: "WeightMask", name: str, to_native) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: keeps logits out of model.parameters()
        self.name = name
        self.to_native = to_native

    def forward(self, W: Tensor) -> Tensor:
        m = self._owner.current(self.name)
        return W if m is None else W * self.to_native(m).to(W.dtype)


def gumbel_sigmoid_ste(logits: Tensor, tau: float, keep: Keep, generator: torch.Generator | None = None) -> Tensor:
    """Straight-through Gumbel-sigmoid (hard concrete, no stretch) sample: forward is binary,
    backward is d sigmoid.

    s = sigmoid((l + g) / tau), g = log u - log(1 - u) (logistic noise). ``keep="subnetwork"``
    returns 1[s > 0.5]; ``keep="remaining"`` the complement taken before thresholding,
    1[(1 - s) > 0.5], whose gradient is that of (1 - s).
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp_(1e-6, 1.0 - 1e-6)
    s = torch.sigmoid((logits + (torch.log(u) - torch.log1p(-u))) / tau)
    soft = s if keep == "subnetwork" else 1.0 - s
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly binary forward, d soft backward


class WeightMask(nn.Module):
    """Mask logits over a set of canonical matrices of one model, and the way they are applied."""

    def __init__(self, shape: ModelShape, config: MaskConfig, seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__()
        self.shape = shape
        self.config = config
        self._names = config.model_names(shape)  # the matrices this model has (W_gate only in gated MLPs)
        self._param_names = param_names_of(config, self._names)
        init = math.log(config.init_prob / (1.0 - config.init_prob))
        self.logits = nn.ParameterDict(
            {
                _key(n): nn.Parameter(torch.full(param_shape(shape, n, config.granularity), init, device=device))
                for n in self._param_names
            }
        )
        self.n_kv = shape.kv_heads
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.mode: Mode = "eval"
        self.keep: Keep = "remaining"
        self.hold_sample = False  # set by using(..., hold=True): one sample for every pass inside
        self._current: dict[str, Tensor] = {}
        self._attached: list[tuple[nn.Module, str]] = []
        self._hook = None

    # --- access ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The masked matrices (what :meth:`attach` parametrizes)."""
        return self._names

    @property
    def param_names(self) -> list[str]:
        """The trainable logit tensors (:meth:`items`): matrices, or units at head granularity."""
        return self._param_names

    @property
    def by_unit(self) -> bool:
        return self.config.granularity == "head"

    def logit(self, name: str) -> Tensor:
        return self.logits[_key(name)]

    def items(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, logits) of every trainable tensor, in a fixed order (noise is drawn in it)."""
        for n in self.param_names:
            yield n, self.logits[_key(n)]

    def all_logits(self) -> Float[Tensor, " n_logits"]:
        return torch.cat([p.flatten() for _, p in self.items()])

    def expand(self, masks: dict[str, Tensor], keep: Keep) -> dict[str, Tensor]:
        """Per-matrix masks from per-parameter masks (identity except at head granularity)."""
        return expand_units(masks, self.names, self.n_kv, keep) if self.by_unit else masks

    def _for_sites(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Masks as the weight sites take them. A head mask ``[n, 1, 1]`` is spread (a view) over
        d_head, the axis that native layouts merge with the head axis (``(h d) m``), so that it
        still broadcasts after :attr:`WeightSite.to_native`."""
        if not self.by_unit:
            return dict(masks)
        d = self.shape.d_head
        out = {}
        for n, m in masks.items():
            matrix = parse_weight_name(n)[1]
            out[n] = (
                m.expand(m.shape[0], 1, d)
                if matrix in ("W_Q", "W_K", "W_V")
                else m.expand(m.shape[0], d, 1)
                if matrix == "W_O"
                else m
            )
        return out

    @property
    def plain_density(self) -> bool:
        """Whether :meth:`expected_density` is the plain mean of sigmoid(l) over the logits
        (weight and row granularity) rather than a weighted one (head)."""
        return not self.by_unit

    def expected_density(self) -> Tensor:
        """Sparsity loss (method.md L4): mean of sigmoid(l) over all mask logits.

        At head granularity the expected share of the masked *weights* in the subnetwork: each
        unit's probability weighted by the weights it gates (a shared K/V head counts with the
        probability that all its query heads are in), i.e. the weight-granularity loss of the
        same tied mask."""
        if self.plain_density:
            return torch.sigmoid(self.all_logits()).mean()
        probs = self.expand({n: torch.sigmoid(p) for n, p in self.items()}, "subnetwork")
        total, n_all = None, 0
        for n, pm in probs.items():
            full = math.prod(canonical_shape(self.shape, parse_weight_name(n)[1]))
            t = pm.sum() * (full // pm.numel())
            total = t if total is None else total + t
            n_all += full
        assert total is not None
        return total / n_all

    def binary(self) -> dict[str, Tensor]:
        """The deterministic subnetwork {l > 0} per matrix, at (broadcastable) logit shape (bool)."""
        units = {n: (p.detach() > 0).float() for n, p in self.items()}
        return {n: m > 0.5 for n, m in self.expand(units, "subnetwork").items()}

    # --- what the model sees ---------------------------------------------------------------
    def current(self, name: str) -> Tensor | None:
        if self.mode == "off":
            return None
        if name not in self._current:
            self.refresh()
        return self._current[name]

    def refresh(self) -> None:
        """Recompute every matrix's mask for the current mode (a fresh sample in 'sample' mode)."""
        if self.mode == "off":
            self._current = {}
            return
        if self.mode == "sample" and self.hold_sample and self._current:
            return
        out: dict[str, Tensor] = {}
        for n, l in self.items():
            if self.mode == "sample":
                out[n] = gumbel_sigmoid_ste(l, self.config.tau, self.keep, self.generator)
            else:
                sub = (l > 0).to(l.dtype)
                out[n] = sub if self.keep == "subnetwork" else 1.0 - sub
        self._current = self._for_sites(self.expand(out, self.keep))

    @contextlib.contextmanager
    def using(self, mode: Mode, keep: Keep | None = None, *, hold: bool = False):
        """Temporarily run the attached model in another mode (e.g. ``off`` for the original p).

        ``hold=True`` (sample mode): the first forward pass inside draws a sample and every later
        pass reuses it (the ``share_sample`` option; the paper draws fresh noise per pass)."""
        old = (self.mode, self.keep, self._current, self.hold_sample)
        self.mode, self.keep, self.hold_sample = mode, keep or self.keep, hold
        self._current = {}
        try:
            yield self
        finally:
            self.mode, self.keep, self._current, self.hold_sample = old

    @contextlib.contextmanager
    def using_sample(self, sample: dict[str, Tensor], keep: Keep = "remaining"):
        """Temporarily run with a sample drawn elsewhere (one mask per :meth:`items` tensor, in
        the ``keep`` form) as the current one, also through full forward passes of the model
        (held: the forward pre-hook does not draw over it)."""
        with self.using("sample", keep, hold=True):
            self._current = self._for_sites(self.expand(sample, keep))
            yield self

    # --- attaching -------------------------------------------------------------------------
    def attach(self, lm: LensModel) -> "WeightMask":
        """Parametrize the model's weights with this mask; a forward pre-hook refreshes the mask
        (so every forward pass, including run_with_hooks / run_with_cache, sees a fresh sample)."""
        if self._attached:
            raise MaskError("this mask is already attached to a model; detach() it first")
        if lm.shape != self.shape:
            raise MaskError(f"mask was built for model shape {self.shape}, the model has {lm.shape}")
        for n in self.names:
            site = lm.site(n)
            if parametrize.is_parametrized(site.module, site.attr):
                self.detach()
                raise MaskError(f"{n} already carries a parametrization (another mask attached?)")
            parametrize.register_parametrization(
                site.module, site.attr, _MaskParametrization(self, n, site.to_native), unsafe=True
            )
            self._attached.append((site.module, site.attr))
        self._hook = lm.model.register_forward_pre_hook(lambda *_: self.refresh())
        self._current = {}
        return self

    def detach(self) -> None:
        """Remove the parametrizations; the original weights come back exactly."""
        for module, attr in self._attached:
            if parametrize.is_parametrized(module, attr):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        self._attached = []
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._current = {}

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    @contextlib.contextmanager
    def applied(self, lm: LensModel, mode: Mode = "eval", keep: Keep = "remaining"):
        """``with mask.applied(model): ...`` runs the model with the mask, then detaches."""
        self.attach(lm)
        try:
            with self.using(mode, keep):
                yield lm
        finally:
            self.detach()


@dataclass
class MaskStats:
    """Counts of one binary mask: how many of the masked weights are in the subnetwork."""

    per_matrix: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (in subnetwork, total)

    @property
    def n_sub(self) -> int:
        return sum(a for a, _ in self.per_matrix.values())

    @property
    def n_total(self) -> int:
        return sum(b for _, b in self.per_matrix.values())

    @property
    def sparsity(self) -> float:
        """1 - |m| / N over the masked weights (method.md)."""
        return 1.0 - self.n_sub / max(self.n_total, 1)


def mask_stats(binary: dict[str, Tensor], shape: ModelShape) -> MaskStats:
    st = MaskStats()
    for n, m in binary.items():
        full = canonical_shape(shape, parse_weight_name(n)[1])
        st.per_matrix[n] = (int(m.expand(full).sum()), math.prod(full))
    return st
