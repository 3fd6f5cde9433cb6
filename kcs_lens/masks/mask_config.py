"""What a mask covers: :class:`MaskConfig` (blocks, matrices, granularity, initial probability,
temperature) and :func:`resolve_layers` (the ``--layers`` forms)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kcs_lens.errors import MaskError
from kcs_lens.masks.granularity import HEAD_UNITS, NEURON_UNITS, normalize_granularity, unit_kind, unit_name
from kcs_lens.model.canonical import MATRICES, ModelShape, parse_weight_name, weight_name


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
