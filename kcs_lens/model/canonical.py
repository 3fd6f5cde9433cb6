"""Canonical names and shapes of the maskable matrices (TransformerLens conventions).

A leaf module: masks, subnetwork files and analyses speak these names whatever backend or model
family holds the weights. ``blocks.{l}.attn.W_Q`` ``[n_heads, d_model, d_head]``,
``blocks.{l}.attn.W_K`` and ``W_V`` ``[n_kv_heads, d_model, d_head]`` (TransformerLens' ``_W_K`` /
``_W_V``: with grouped-query attention one entry per weight of the HF ``k_proj`` / ``v_proj``, query
head ``h`` reading key/value head ``h // (n_heads // n_kv_heads)``; ``n_kv_heads = n_heads``
otherwise), ``blocks.{l}.attn.W_O`` ``[n_heads, d_head, d_model]``, ``blocks.{l}.mlp.W_in``
``[d_model, d_mlp]``, ``blocks.{l}.mlp.W_gate`` ``[d_model, d_mlp]`` (gated MLPs only:
``W_out(act(x W_gate) * (x W_in))``) and ``blocks.{l}.mlp.W_out`` ``[d_mlp, d_model]``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from kcs_lens.errors import MaskError

MATRICES: tuple[str, ...] = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out")
ATTN_MATRICES: tuple[str, ...] = ("W_Q", "W_K", "W_V", "W_O")
MLP_MATRICES: tuple[str, ...] = ("W_in", "W_gate", "W_out")
KV_MATRICES: tuple[str, ...] = ("W_K", "W_V")
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
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (files from before have none)
    gated_mlp: bool = False  # the MLP has W_gate

    def __post_init__(self) -> None:
        if self.n_kv_heads == self.n_heads:  # one spelling per shape: equal shapes compare equal
            object.__setattr__(self, "n_kv_heads", None)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``n_heads`` without grouped-query attention)."""
        return self.n_kv_heads or self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head: query head ``h`` reads key/value head ``h // group_size``."""
        return self.n_heads // self.kv_heads

    @property
    def matrices(self) -> tuple[str, ...]:
        """The maskable matrices this model has (``W_gate`` only with a gated MLP)."""
        return tuple(m for m in MATRICES if m != "W_gate" or self.gated_mlp)


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
    h, kv, m, d, f = shape.n_heads, shape.kv_heads, shape.d_model, shape.d_head, shape.d_mlp
    shapes = {
        "W_Q": (h, m, d),
        "W_K": (kv, m, d),
        "W_V": (kv, m, d),
        "W_O": (h, d, m),
        "W_in": (m, f),
        "W_gate": (m, f),
        "W_out": (f, m),
    }
    if matrix == "W_gate" and not shape.gated_mlp:
        raise MaskError("W_gate: this model's MLP has no gate (only gated MLPs, e.g. Llama's, have W_gate)")
    return shapes[matrix]


def total_linear_weights(shape: ModelShape) -> int:
    """Number of weights in all blocks' maskable matrices (the 'all linear weights' base)."""
    return shape.n_layers * sum(math.prod(canonical_shape(shape, m)) for m in shape.matrices)
