"""Differentiable weight masks attached to a model's unprocessed weights (method.md, "Masks").

Granularities (docs/method.md, "Granularities"):

- ``weight``: one real logit per weight, in the canonical TransformerLens layout;
- ``row`` (formerly ``neuron``, still accepted): one logit per input row of each masked matrix,
  broadcast over the row: a residual dimension for ``W_Q``/``W_K``/``W_V``/``W_in``/``W_gate``,
  a (head, d_head) row for ``W_O``, an MLP neuron only for ``W_out``;
- ``head``: one logit per attention head (``blocks.{l}.attn.heads`` ``[n_heads]``: the head's
  slices of ``W_Q``, ``W_K``, ``W_V`` and ``W_O``) and one per MLP neuron (``blocks.{l}.mlp.neurons``
  ``[d_mlp]``: its column of ``W_in`` / ``W_gate`` and its row of ``W_out``). With grouped-query
  attention a shared K/V head is in the subnetwork only when all its query heads are.

The trainable logits are the *parameters* (per matrix at ``weight``/``row``, per unit at ``head``);
:func:`expand_units` turns unit masks into per-matrix masks with pure tensor functions of the
canonical shapes. Masks attach through ``torch.nn.utils.parametrize`` at the
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
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kcs_lens.errors import MaskError
from kcs_lens.model.backends import LensModel
from kcs_lens.model.canonical import ATTN_MATRICES, MATRICES, ModelShape, canonical_shape, parse_weight_name, weight_name

Granularity = Literal["weight", "row", "head"]
Mode = Literal["off", "sample", "eval"]
Keep = Literal["remaining", "subnetwork"]
GRANULARITIES = ("weight", "row", "head")
DEPRECATED_GRANULARITIES = {"neuron": "row"}  # old name -> current name (old run directories say "neuron")
HEAD_UNITS, NEURON_UNITS = "heads", "neurons"


def normalize_granularity(granularity: str, *, warn: bool = False) -> str:
    """The current name of a granularity: ``neuron`` -> ``row`` (``warn``: a FutureWarning saying
    so, for user input; saved runs are read silently). Unknown names -> MaskError."""
    new = DEPRECATED_GRANULARITIES.get(granularity)
    if new is not None:
        if warn:
            warnings.warn(
                f"granularity {granularity!r} is deprecated: it means one logit per input row of each matrix "
                f"(an MLP neuron only for W_out); use {new!r} (same masks), or 'head' for one logit per attention "
                "head and per MLP neuron",
                FutureWarning,
                stacklevel=2,
            )
        return new
    if granularity not in GRANULARITIES:
        raise MaskError(
            f"unknown granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)} "
            f"('neuron' is the deprecated name of 'row')"
        )
    return granularity


# --- unit masks (head granularity) as pure tensor functions of canonical shapes ------------------
def unit_name(layer: int, kind: str) -> str:
    """``blocks.{l}.attn.heads`` (one logit per query head) or ``blocks.{l}.mlp.neurons``."""
    return f"blocks.{layer}.attn.{HEAD_UNITS}" if kind == HEAD_UNITS else f"blocks.{layer}.mlp.{NEURON_UNITS}"


def parse_unit_name(name: str) -> tuple[int, str]:
    """``blocks.6.attn.heads`` -> ``(6, "heads")``."""
    parts = name.split(".")
    if (
        len(parts) != 4
        or parts[0] != "blocks"
        or not parts[1].isdigit()
        or (parts[2], parts[3])
        not in (
            ("attn", HEAD_UNITS),
            ("mlp", NEURON_UNITS),
        )
    ):
        raise MaskError(f"not a head/neuron unit name: {name!r}")
    return int(parts[1]), parts[3]


def unit_kind(matrix: str) -> str:
    """Which unit a matrix's head-granularity mask comes from: heads (attention) or neurons (MLP)."""
    return HEAD_UNITS if matrix in ATTN_MATRICES else NEURON_UNITS


def n_kv_heads(shape: ModelShape) -> int:
    """K/V heads of the model (grouped-query attention), n_heads without GQA."""
    return shape.kv_heads


def head_mask_shape(matrix: str, n_heads: int, n_kv: int, d_mlp: int) -> tuple[int, ...]:
    """Broadcastable per-matrix mask shape at head granularity (canonical TL layouts):
    ``W_Q``/``W_O`` ``[n_heads, 1, 1]``, ``W_K``/``W_V`` ``[n_kv_heads, 1, 1]`` (``_W_K`` layout),
    ``W_in``/``W_gate`` ``[1, d_mlp]`` (columns), ``W_out`` ``[d_mlp, 1]`` (rows)."""
    if matrix in ("W_Q", "W_O"):
        return (n_heads, 1, 1)
    if matrix in ("W_K", "W_V"):
        return (n_kv, 1, 1)
    if matrix in ("W_in", "W_gate"):
        return (1, d_mlp)
    if matrix == "W_out":
        return (d_mlp, 1)
    raise MaskError(f"no head-granularity mask for matrix {matrix!r}")


def kv_group(heads: Float[Tensor, " n_heads"], n_kv: int, keep: Keep) -> Float[Tensor, " n_kv"]:
    """The mask of each shared K/V head from its query heads' masks (query head h uses K/V head
    ``h // (n_heads // n_kv)``): in the subnetwork only when ALL its query heads are.

    ``keep="subnetwork"``: product of the members' masks (AND); ``keep="remaining"``: the
    complement of that, ``1 - prod(1 - r)`` (OR of the remaining masks). Exact for binary masks,
    differentiable (straight-through samples keep their gradients), and for probabilities it is
    the probability of the event when heads are independent."""
    n = heads.shape[0]
    if n_kv <= 0 or n % n_kv:
        raise MaskError(f"n_heads={n} is not a multiple of n_kv_heads={n_kv}")
    if n_kv == n:
        return heads
    g = heads.view(n_kv, n // n_kv)
    return g.prod(-1) if keep == "subnetwork" else 1.0 - (1.0 - g).prod(-1)


def expand_unit(unit: Float[Tensor, " n"], matrix: str, n_kv: int, keep: Keep) -> Tensor:
    """One matrix's broadcastable mask from its unit mask (heads ``[n_heads]`` or neurons ``[d_mlp]``)."""
    if matrix in ("W_Q", "W_O"):
        return unit.view(-1, 1, 1)
    if matrix in ("W_K", "W_V"):
        return kv_group(unit, n_kv, keep).view(-1, 1, 1)
    if matrix in ("W_in", "W_gate"):
        return unit.view(1, -1)
    if matrix == "W_out":
        return unit.view(-1, 1)
    raise MaskError(f"no head-granularity mask for matrix {matrix!r}")


def expand_units(units: dict[str, Tensor], names: "list[str] | tuple[str, ...]", n_kv: int, keep: Keep) -> dict[str, Tensor]:
    """Per-matrix masks (canonical names ``names``) from unit masks keyed by :func:`unit_name`."""
    out = {}
    for n in names:
        layer, matrix = parse_weight_name(n)
        out[n] = expand_unit(units[unit_name(layer, unit_kind(matrix))], matrix, n_kv, keep)
    return out


def expand_unit_logits(units: dict[str, Tensor], names: "list[str] | tuple[str, ...]", n_kv: int) -> dict[str, Tensor]:
    """Per-matrix *logits* of a head-granularity subnetwork (for files and per-matrix tools): the
    unit's logit, and for a shared K/V head the minimum over its query heads, so that
    ``logit > 0`` is exactly the membership rule of :func:`kv_group`."""
    out = {}
    for n in names:
        layer, matrix = parse_weight_name(n)
        u = units[unit_name(layer, unit_kind(matrix))]
        if matrix in ("W_K", "W_V") and n_kv != u.shape[0]:
            u = u.view(n_kv, -1).amin(-1)
        out[n] = expand_unit(u, matrix, u.shape[0], "subnetwork").clone()  # own storage (files refuse shared tensors)
    return out


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
    """Shape of one matrix's (broadcastable) logits and mask: the canonical shape (``weight``),
    1 along the output dims (``row``), or one entry per head / neuron (``head``)."""
    granularity = normalize_granularity(granularity)
    full = canonical_shape(shape, matrix)
    if granularity == "weight":
        return full
    if granularity == "row":  # one logit per input row, broadcast over the outputs
        if matrix in ("W_Q", "W_K", "W_V"):
            return (1, full[1], 1)
        if matrix == "W_O":
            return (full[0], full[1], 1)
        return (full[0], 1)  # W_in / W_gate: a residual dimension; W_out: an MLP neuron
    return head_mask_shape(matrix, shape.n_heads, n_kv_heads(shape), shape.d_mlp)


def param_shape(shape: ModelShape, name: str, granularity: str) -> tuple[int, ...]:
    """Shape of one trainable logit tensor: a matrix's :func:`mask_shape`, or a unit's
    ``[n_heads]`` / ``[d_mlp]`` at head granularity."""
    if normalize_granularity(granularity) != "head":
        return mask_shape(shape, parse_weight_name(name)[1], granularity)
    return (shape.n_heads,) if parse_unit_name(name)[1] == HEAD_UNITS else (shape.d_mlp,)


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
        object.__setattr__(self, "granularity", normalize_granularity(self.granularity))  # 'neuron' -> 'row'
        if not 0.0 < self.init_prob < 1.0:
            raise MaskError(f"init_prob must be in (0, 1), got {self.init_prob}")

    @property
    def names(self) -> list[str]:
        """The masked matrices' canonical names."""
        return [weight_name(l, m) for l in self.layers for m in self.matrices]

    @property
    def param_names(self) -> list[str]:
        """Names of the trainable logit tensors: the matrices, or at head granularity the units
        (``blocks.{l}.attn.heads`` where an attention matrix is masked, ``blocks.{l}.mlp.neurons``
        where an MLP matrix is)."""
        return param_names_of(self, self.names)

    def model_names(self, shape: ModelShape) -> list[str]:
        """:attr:`names` that the model of ``shape`` has (``W_gate`` only in gated MLPs)."""
        have = shape.matrices
        names = [n for n in self.names if parse_weight_name(n)[1] in have]
        if not names:
            raise MaskError(f"none of the matrices {', '.join(self.matrices)} exists in this model (it has {', '.join(have)})")
        return names

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


def param_names_of(config: MaskConfig, names: "list[str]") -> list[str]:
    """The trainable logit tensors that mask the matrices ``names`` under ``config``."""
    if config.granularity != "head":
        return list(names)
    kinds = {unit_kind(parse_weight_name(n)[1]) for n in names}
    return [unit_name(l, k) for l in config.layers for k in (HEAD_UNITS, NEURON_UNITS) if k in kinds]


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
        self.n_kv = n_kv_heads(shape)
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
