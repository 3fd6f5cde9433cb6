"""Differentiable weight masks attached to a model's unprocessed weights (method.md, "Masks").

One real logit per weight (``weight`` granularity) or per input row of each masked matrix
(``neuron``), stored in the canonical TransformerLens layout and broadcast over the rest. Masks
attach through ``torch.nn.utils.parametrize`` at the :class:`~kcs_lens.models.WeightSite` of each
matrix, so the model's hooks keep working and detaching restores the weights exactly.

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
from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kcs_lens.backends import LensModel
from kcs_lens.canonical import MATRICES, ModelShape, canonical_shape, parse_weight_name, weight_name
from kcs_lens.errors import MaskError

Granularity = Literal["weight", "neuron", "head"]
Mode = Literal["off", "sample", "eval"]
Keep = Literal["remaining", "subnetwork"]
GRANULARITIES = ("weight", "neuron")


def resolve_layers(layers: "str | list[int] | tuple[int, ...] | None", n_layers: int) -> tuple[int, ...]:
    """``top-half`` (default: blocks n/2 .. n-1, as in the paper), ``all``, ``A-B`` or ``A:B``
    (inclusive / python-style), a comma list, or a list of ints. Out of range -> MaskError."""
    if layers is None or layers == "top-half":
        out = tuple(range(n_layers // 2, n_layers))
    elif layers == "all":
        out = tuple(range(n_layers))
    elif isinstance(layers, str):
        s = layers.replace(" ", "")
        try:
            if "-" in s:
                a, b = s.split("-")
                out = tuple(range(int(a), int(b) + 1))
            elif ":" in s:
                a, b = s.split(":")
                out = tuple(range(int(a), int(b)))
            else:
                out = tuple(int(x) for x in s.split(",") if x)
        except ValueError as e:
            raise MaskError(
                f"--layers {layers!r}: expected 'top-half', 'all', a range like '6-11', or a list like '6,7,8'"
            ) from e
    else:
        out = tuple(int(x) for x in layers)
    if not out:
        raise MaskError(f"--layers {layers!r} selects no block")
    bad = [l for l in out if not 0 <= l < n_layers]
    if bad:
        raise MaskError(
            f"--layers {layers!r}: blocks {bad} are out of range for a model with {n_layers} blocks (0-{n_layers - 1})"
        )
    return tuple(sorted(set(out)))


def mask_shape(shape: ModelShape, matrix: str, granularity: str) -> tuple[int, ...]:
    """Shape of one matrix's logits: canonical shape, or 1 along the output dims for neurons."""
    full = canonical_shape(shape, matrix)
    if granularity == "weight":
        return full
    if granularity == "neuron":  # one logit per input row, broadcast over the outputs
        return {
            "W_Q": (1, full[1], 1),
            "W_K": (1, full[1], 1),
            "W_V": (1, full[1], 1),
            "W_O": (full[0], full[1], 1),
            "W_in": (full[0], 1),
            "W_gate": (full[0], 1),
            "W_out": (full[0], 1),
        }[matrix]
    if granularity == "head":
        raise MaskError("granularity 'head' is reserved for a later release; use 'weight' or 'neuron'")
    raise MaskError(f"unknown granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")


@dataclass(frozen=True)
class MaskConfig:
    layers: tuple[int, ...]
    matrices: tuple[str, ...] = MATRICES
    granularity: str = "weight"  # validated below: it comes from configs and files
    init_prob: float = 0.45
    tau: float = 1.0

    def __post_init__(self) -> None:
        bad = [m for m in self.matrices if m not in MATRICES]
        if bad:
            raise MaskError(f"unknown matrices {bad}; expected a subset of {', '.join(MATRICES)}")
        if self.granularity not in GRANULARITIES:
            mask_shape(ModelShape(1, 1, 1, 1, 1, 1, 1), "W_Q", self.granularity)  # raises the right message
        if not 0.0 < self.init_prob < 1.0:
            raise MaskError(f"init_prob must be in (0, 1), got {self.init_prob}")

    @property
    def names(self) -> list[str]:
        return [weight_name(l, m) for l in self.layers for m in self.matrices]

    def names_for(self, shape: ModelShape) -> list[str]:
        """:attr:`names` of the matrices a model of ``shape`` has (W_gate only with a gated MLP)."""
        return [n for n in self.names if parse_weight_name(n)[1] in shape.matrices]

    def to_dict(self) -> dict:
        return {**asdict(self), "layers": list(self.layers), "matrices": list(self.matrices)}

    @classmethod
    def from_dict(cls, d: dict) -> "MaskConfig":
        return cls(
            layers=tuple(d["layers"]),
            matrices=tuple(d.get("matrices", MATRICES)),
            granularity=d.get("granularity", "weight"),
            init_prob=d.get("init_prob", 0.45),
            tau=d.get("tau", 1.0),
        )


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
        # the matrices this model has (W_gate only in gated MLPs)
        self._names = config.names_for(shape)
        if not self._names:
            raise MaskError(
                f"none of the matrices {', '.join(config.matrices)} exists in this model (it has {', '.join(shape.matrices)})"
            )
        init = math.log(config.init_prob / (1.0 - config.init_prob))
        self.logits = nn.ParameterDict(
            {
                _key(n): nn.Parameter(
                    torch.full(mask_shape(shape, parse_weight_name(n)[1], config.granularity), init, device=device)
                )
                for n in self._names
            }
        )
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.mode: Mode = "eval"
        self.keep: Keep = "remaining"
        self.hold_sample = False  # set by using(..., hold=True): one sample for every pass inside
        self._current: dict[str, Tensor | None] = {}
        self._attached: list[tuple[nn.Module, str]] = []
        self._hook = None

    # --- access ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return self._names

    def logit(self, name: str) -> Tensor:
        return self.logits[_key(name)]

    def items(self) -> Iterator[tuple[str, nn.Parameter]]:
        for n in self.names:
            yield n, self.logits[_key(n)]

    def all_logits(self) -> Float[Tensor, " n_logits"]:
        return torch.cat([p.flatten() for _, p in self.items()])

    def expected_density(self) -> Tensor:
        """Sparsity loss (method.md L4): mean of sigmoid(l) over all mask logits."""
        return torch.sigmoid(self.all_logits()).mean()

    def binary(self) -> dict[str, Tensor]:
        """The deterministic subnetwork {l > 0} per matrix, at logit shape (bool)."""
        return {n: (p.detach() > 0) for n, p in self.items()}

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
        out: dict[str, Tensor | None] = {}
        for n, l in self.items():
            if self.mode == "sample":
                out[n] = gumbel_sigmoid_ste(l, self.config.tau, self.keep, self.generator)
            else:
                sub = (l > 0).to(l.dtype)
                out[n] = sub if self.keep == "subnetwork" else 1.0 - sub
        self._current = out

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
        """Temporarily run with a sample drawn elsewhere (one mask per matrix) as the current one."""
        with self.using("sample", keep):
            self._current = dict(sample)
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
