"""The granularities of a mask (method.md, "Masks"; docs/method.md, "Granularities") as pure
functions of the canonical shapes.

- ``weight``: one real logit per weight, in the canonical TransformerLens layout;
- ``row`` (formerly ``neuron``, still accepted): one logit per input row of each masked matrix,
  broadcast over the row: a residual dimension for ``W_Q``/``W_K``/``W_V``/``W_in``/``W_gate``,
  a (head, d_head) row for ``W_O``, an MLP neuron only for ``W_out``;
- ``head``: one logit per attention head (``blocks.{l}.attn.heads`` ``[n_heads]``: the head's
  slices of ``W_Q``, ``W_K``, ``W_V`` and ``W_O``) and one per MLP neuron (``blocks.{l}.mlp.neurons``
  ``[d_mlp]``: its column of ``W_in`` / ``W_gate`` and its row of ``W_out``). With grouped-query
  attention a shared K/V head is in the subnetwork only when all its query heads are.

The trainable logits are per matrix at ``weight``/``row`` and per unit at ``head``;
:func:`expand_units` turns unit masks into per-matrix masks.
"""

from __future__ import annotations

import warnings
from typing import Literal

from jaxtyping import Float
from torch import Tensor

from kcs_lens.errors import MaskError
from kcs_lens.model.canonical import ATTN_MATRICES, ModelShape, canonical_shape, parse_weight_name

Granularity = Literal["weight", "row", "head"]
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
    return head_mask_shape(matrix, shape.n_heads, shape.kv_heads, shape.d_mlp)


def param_shape(shape: ModelShape, name: str, granularity: str) -> tuple[int, ...]:
    """Shape of one trainable logit tensor: a matrix's :func:`mask_shape`, or a unit's
    ``[n_heads]`` / ``[d_mlp]`` at head granularity."""
    if normalize_granularity(granularity) != "head":
        return mask_shape(shape, parse_weight_name(name)[1], granularity)
    return (shape.n_heads,) if parse_unit_name(name)[1] == HEAD_UNITS else (shape.d_mlp,)
