"""Canonical names and shapes of the maskable matrices (TransformerLens conventions).

A leaf module: masks, subnetwork files and analyses speak these names whatever backend or model
family holds the weights. ``blocks.{l}.attn.W_Q`` ``[n_heads, d_model, d_head]`` (also ``W_K``
and ``W_V``), ``blocks.{l}.attn.W_O`` ``[n_heads, d_head, d_model]``, ``blocks.{l}.mlp.W_in``
``[d_model, d_mlp]`` and ``blocks.{l}.mlp.W_out`` ``[d_mlp, d_model]``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from kcs_lens.errors import MaskError

MATRICES: tuple[str, ...] = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out")
ATTN_MATRICES: tuple[str, ...] = ("W_Q", "W_K", "W_V", "W_O")
MLP_MATRICES: tuple[str, ...] = ("W_in", "W_out")
_NAME = re.compile(r"blocks\.(\d+)\.(attn|mlp)\.(\w+)")


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int


def weight_name(layer: int, matrix: str) -> str:
    """Canonical TransformerLens name of a maskable matrix, e.g. ``blocks.6.attn.W_Q``."""
    if matrix not in MATRICES:
        raise MaskError(f"unknown matrix {matrix!r}; expected one of {', '.join(MATRICES)}")
    return f"blocks.{layer}.{'attn' if matrix in ATTN_MATRICES else 'mlp'}.{matrix}"


def parse_weight_name(name: str) -> tuple[int, str]:
    """``blocks.6.attn.W_Q`` -> ``(6, "W_Q")``."""
    m = _NAME.fullmatch(name)
    if not m or m.group(3) not in MATRICES or (m.group(2) == "attn") != (m.group(3) in ATTN_MATRICES):
        raise MaskError(f"not a canonical maskable weight name: {name!r}")
    return int(m.group(1)), m.group(3)


def canonical_shape(shape: ModelShape, matrix: str) -> tuple[int, ...]:
    h, m, d, f = shape.n_heads, shape.d_model, shape.d_head, shape.d_mlp
    shapes = {"W_Q": (h, m, d), "W_K": (h, m, d), "W_V": (h, m, d), "W_O": (h, d, m), "W_in": (m, f), "W_out": (f, m)}
    return shapes[matrix]


def total_linear_weights(shape: ModelShape) -> int:
    """Number of weights in all blocks' maskable matrices (the 'all linear weights' base)."""
    return shape.n_layers * sum(math.prod(canonical_shape(shape, m)) for m in MATRICES)
