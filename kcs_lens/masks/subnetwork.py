"""The saved subnetwork: mask logits and binary mask under canonical TL names, with metadata.

``subnetwork.safetensors`` holds, per masked matrix ``blocks.{l}.attn.W_Q`` ...:
``logits/<name>`` (float32, logit shape) and ``mask/<name>`` (uint8, 1 = in the subnetwork),
plus string metadata (model spec and weight fingerprint, model shape, layer range, granularity,
sparsity, seed, step, kcs-lens version). Logit shapes follow the canonical layout, so a
subnetwork found on one TransformerLens backend applies on the other. Masks of ``row`` and
``head`` granularity are stored at a shape that broadcasts to the matrix
(:func:`~kcs_lens.masks.granularity.mask_shape`; :meth:`Subnetwork.full_binary` expands them).

At ``head`` granularity the file also holds ``units/blocks.{l}.attn.heads`` ``[n_heads]`` and
``units/blocks.{l}.mlp.neurons`` ``[d_mlp]``: the trained logits, one per attention head and per
MLP neuron. They are the source of truth; the per-matrix logits are derived from them
(:func:`~kcs_lens.masks.granularity.expand_unit_logits`), so every per-matrix tool reads a head run as it
reads any other.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from jaxtyping import Bool
from safetensors.torch import load_file, safe_open
from torch import Tensor

from kcs_lens.errors import SubnetworkError
from kcs_lens.files import atomic_save_safetensors, canonical_json
from kcs_lens.masks.granularity import HEAD_UNITS, Keep, expand_unit_logits, parse_unit_name
from kcs_lens.masks.mask import MaskStats, WeightMask, mask_stats
from kcs_lens.masks.mask_config import MaskConfig, param_names_of
from kcs_lens.model.canonical import (
    ATTN_MATRICES,
    KV_MATRICES,
    ModelShape,
    canonical_shape,
    parse_weight_name,
    total_linear_weights,
    weight_name,
)
from kcs_lens.model.lens import LensModel

BINARY_LOGIT = 20.0  # logits of a purely binary subnetwork (a combination, a random draw): sigmoid = 1 - 2e-9
NEAR = 0.05  # a mask probability sigmoid(l) <= NEAR is "near 0", >= 1 - NEAR "near 1"


@dataclass
class Subnetwork:
    """Mask logits of a knowledge-critical subnetwork, and where they came from."""

    logits: dict[str, Tensor]
    mask_config: MaskConfig
    shape: ModelShape
    meta: dict[str, Any] = field(default_factory=dict)
    units: dict[str, Tensor] | None = None  # head granularity: logits per head / neuron (else None)

    def __post_init__(self) -> None:
        if self.mask_config.granularity != "head":
            self.units = None
            return
        names = self.mask_config.model_names(self.shape)
        if self.units is None:
            self.units = units_from_matrix_logits(self.logits, self.mask_config, self.shape)
        missing = [n for n in param_names_of(self.mask_config, names) if n not in self.units]
        if missing:
            raise SubnetworkError(f"head-granularity subnetwork without logits for {missing[:3]}")
        self.logits = expand_unit_logits(self.units, names, self.shape.kv_heads)

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_mask(cls, mask: WeightMask, lm: LensModel | None = None, **meta: Any) -> "Subnetwork":
        params = {n: p.detach().float().cpu().clone() for n, p in mask.items()}
        if lm is not None:
            meta.setdefault("model_spec", lm.spec)
            meta.setdefault("model_fingerprint", lm.fingerprint())
            meta.setdefault("backend", lm.backend)
        if mask.by_unit:
            return cls({}, mask.config, mask.shape, meta, units=params)
        return cls(params, mask.config, mask.shape, meta)

    def to_mask(self, seed: int = 0, device: str | torch.device = "cpu") -> WeightMask:
        wm = WeightMask(self.shape, self.mask_config, seed=seed, device=device)
        src = self.units if self.units is not None else self.logits
        with torch.no_grad():
            for n, p in wm.items():
                p.copy_(src[n].to(device))
        return wm

    def unit_binary(self) -> dict[str, Tensor] | None:
        """Head granularity: {logit > 0} per head (``blocks.{l}.attn.heads``) and per MLP neuron
        (``blocks.{l}.mlp.neurons``); None at other granularities."""
        return None if self.units is None else {n: u > 0 for n, u in self.units.items()}

    def with_unit_binary(self, units: dict[str, Tensor], **meta: Any) -> "Subnetwork":
        """Head granularity: a subnetwork with the given heads and neurons (logits +-BINARY_LOGIT)."""
        if self.units is None:
            raise SubnetworkError("with_unit_binary needs a head-granularity subnetwork")
        return Subnetwork(
            {}, self.mask_config, self.shape, {**self.meta, **meta}, units={n: _binary_logits(b) for n, b in units.items()}
        )

    # --- the subnetwork itself -------------------------------------------------------------
    def binary(self) -> dict[str, Tensor]:
        """{logit > 0}: True where the weight (or row) belongs to the subnetwork, at logit shape."""
        return {n: l > 0 for n, l in self.logits.items()}

    def full_binary(self) -> dict[str, Bool[Tensor, "..."]]:
        """Membership per weight at canonical shape (neuron masks broadcast over their rows)."""
        return {n: b.expand(canonical_shape(self.shape, parse_weight_name(n)[1])) for n, b in self.binary().items()}

    def at_weight_granularity(self) -> "Subnetwork":
        """The same membership as a weight-granularity subnetwork (neuron masks broadcast)."""
        full = {n: b.clone() for n, b in self.full_binary().items()}
        return Subnetwork(
            {n: _binary_logits(b) for n, b in full.items()},
            replace(self.mask_config, granularity="weight"),
            self.shape,
            dict(self.meta),
        )

    def membership_sha(self) -> str:
        """Identity of the membership (binary mask), independent of logits and file metadata."""
        h = hashlib.sha256()
        for n, b in sorted(self.binary().items()):
            h.update(n.encode())
            h.update(b.to(torch.uint8).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def stats(self) -> MaskStats:
        return mask_stats(self.binary(), self.shape)

    @property
    def sparsity(self) -> float:
        """Share of the masked weights NOT in the subnetwork."""
        return self.stats.sparsity

    @property
    def sparsity_all_linear(self) -> float:
        """The same over all blocks' linear weights (Q, K, V, O, W_in, W_out of every layer)."""
        return 1.0 - self.stats.n_sub / total_linear_weights(self.shape)

    def with_binary(self, binary: dict[str, Tensor], **meta: Any) -> "Subnetwork":
        """A subnetwork with the given membership (logits +-BINARY_LOGIT: probabilities ~1 and ~0).

        At head granularity the heads are read from W_Q / W_O and the neurons from W_in / W_gate /
        W_out (which must agree); shared K/V heads follow the all-query-heads rule."""
        logits = {n: _binary_logits(b) for n, b in binary.items()}
        return Subnetwork(logits, self.mask_config, self.shape, {**self.meta, **meta})

    def density_stats(self) -> dict[str, Any]:
        """Sparsity, density per layer / matrix / attention head, and the share of mask
        probabilities near 0 and 1."""
        per_layer: dict[int, list[int]] = {}
        per_matrix: dict[str, list[int]] = {}
        per_lm: dict[int, dict[str, float]] = {}
        per_head: dict[int, dict[str, list[float]]] = {}
        for n, b in self.full_binary().items():
            layer, matrix = parse_weight_name(n)
            k, tot = int(b.sum()), b.numel()
            for a in (per_layer.setdefault(layer, [0, 0]), per_matrix.setdefault(matrix, [0, 0])):
                a[0] += k
                a[1] += tot
            per_lm.setdefault(layer, {})[matrix] = k / tot
            if matrix in ATTN_MATRICES:  # [h, m, d] or [h, d, m]: head first
                dens = b.flatten(1).float().mean(1)
                if matrix in KV_MATRICES:  # GQA: query head h reads key/value head h // group
                    dens = dens.repeat_interleave(self.shape.group_size)
                per_head.setdefault(layer, {})[matrix] = dens.tolist()
        for heads in per_head.values():
            heads["all"] = torch.tensor([heads[m] for m in ATTN_MATRICES if m in heads]).mean(0).tolist()
        probs = torch.sigmoid(torch.cat([l.flatten().float() for l in (self.units or self.logits).values()]))
        st = self.stats
        units = self.unit_binary()
        extra: dict[str, Any] = {}
        if units is not None:  # head granularity: the decisions themselves
            extra["units"] = {
                "heads": {str(parse_unit_name(n)[0]): b.int().tolist() for n, b in units.items() if n.endswith(HEAD_UNITS)},
                "n_heads_in_subnetwork": sum(int(b.sum()) for n, b in units.items() if n.endswith(HEAD_UNITS)),
                "neurons_in_subnetwork": {
                    str(parse_unit_name(n)[0]): int(b.sum()) for n, b in units.items() if not n.endswith(HEAD_UNITS)
                },
            }
        return {
            **extra,
            "sparsity": st.sparsity,
            "sparsity_all_linear": self.sparsity_all_linear,
            "n_in_subnetwork": st.n_sub,
            "n_masked": st.n_total,
            "n_linear": total_linear_weights(self.shape),
            "granularity": self.mask_config.granularity,
            "layers": list(self.mask_config.layers),
            "density": {
                "per_layer": {str(l): a / t for l, (a, t) in sorted(per_layer.items())},
                "per_matrix": {m: a / t for m, (a, t) in per_matrix.items()},
                "per_layer_matrix": {str(l): v for l, v in sorted(per_lm.items())},
                "per_head": {str(l): v for l, v in sorted(per_head.items())},
            },
            "logits": {
                "near_threshold": NEAR,
                "near_0": float((probs <= NEAR).float().mean()),
                "near_1": float((probs >= 1 - NEAR).float().mean()),
            },
        }

    # --- applying --------------------------------------------------------------------------
    def check_model(self, lm: LensModel, *, strict_fingerprint: bool = True) -> None:
        if lm.shape != self.shape:
            raise SubnetworkError(
                f"subnetwork was found on a model of shape {asdict(self.shape)}, but {lm.spec!r} has {asdict(lm.shape)}"
            )
        if strict_fingerprint:
            lm.check_fingerprint(
                self.meta.get("model_fingerprint"), f"subnetwork was found on model {self.meta.get('model_spec')!r}"
            )

    @contextmanager
    def applied(self, lm: LensModel, keep: Keep = "remaining", *, strict_fingerprint: bool = True) -> Iterator[LensModel]:
        """``with sub.applied(model): ...`` runs the remaining model (or ``keep="subnetwork"``)."""
        self.check_model(lm, strict_fingerprint=strict_fingerprint)
        wm = self.to_mask(device=lm.device)
        with wm.applied(lm, mode="eval", keep=keep):
            yield lm

    # --- files -----------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        st = self.stats
        meta = {
            **self.meta,
            "mask_config": self.mask_config.to_dict(),
            "model_shape": asdict(self.shape),
            "sparsity": st.sparsity,
            "sparsity_all_linear": self.sparsity_all_linear,
            "n_in_subnetwork": st.n_sub,
            "n_masked": st.n_total,
        }
        from kcs_lens import __version__

        meta.setdefault("kcs_lens_version", __version__)
        return {k: canonical_json(v) for k, v in meta.items()}

    def save(self, path: str | os.PathLike) -> Path:
        tensors: dict[str, Tensor] = {}
        for n, l in self.logits.items():
            tensors[f"logits/{n}"] = l.float().contiguous()
            tensors[f"mask/{n}"] = (l > 0).to(torch.uint8).contiguous()
        for n, u in (self.units or {}).items():
            tensors[f"units/{n}"] = u.float().contiguous()
        atomic_save_safetensors(tensors, path, self.metadata())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Subnetwork":
        path = Path(path)
        if path.is_dir():
            path = path / "subnetwork.safetensors"
        if not path.exists():
            raise SubnetworkError(f"{path}: no such subnetwork file")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
            tensors = load_file(str(path))
            meta = {k: json.loads(v) for k, v in raw.items()}
            mc = MaskConfig.from_dict(meta.pop("mask_config"))
            shape = ModelShape(**meta.pop("model_shape"))
        except SubnetworkError:
            raise
        except Exception as e:
            raise SubnetworkError(f"{path}: not a kcs-lens subnetwork file ({type(e).__name__}: {e})") from e
        for k in ("sparsity", "sparsity_all_linear", "n_in_subnetwork", "n_masked"):
            meta.pop(k, None)
        logits = {k[len("logits/") :]: v for k, v in tensors.items() if k.startswith("logits/")}
        units = {k[len("units/") :]: v for k, v in tensors.items() if k.startswith("units/")} or None
        missing = [n for n in mc.model_names(shape) if n not in logits]
        if missing:
            raise SubnetworkError(f"{path}: logits missing for {missing[:3]}{'...' if len(missing) > 3 else ''}")
        try:
            return cls(logits, mc, shape, meta, units=units)
        except SubnetworkError as e:
            raise SubnetworkError(f"{path}: {e}") from None


def units_from_matrix_logits(logits: dict[str, Tensor], mc: MaskConfig, shape: ModelShape) -> dict[str, Tensor]:
    """Head granularity: the per-head / per-neuron logits behind per-matrix ones (heads from W_Q,
    else W_O, else K/V without GQA; neurons from W_in, W_gate or W_out). Every other matrix of a
    unit must agree on membership (shared K/V heads are not checked under GQA: they follow the
    rule); otherwise the masks are not head-structured -> SubnetworkError."""
    n_kv = shape.kv_heads
    order = {HEAD_UNITS: ("W_Q", "W_O", "W_K", "W_V"), "neurons": ("W_in", "W_gate", "W_out")}
    units: dict[str, Tensor] = {}
    for name in param_names_of(mc, mc.model_names(shape)):
        layer, kind = parse_unit_name(name)
        mats = [m for m in order[kind] if m in mc.matrices and weight_name(layer, m) in logits]
        given = [(m, logits[weight_name(layer, m)].flatten()) for m in mats]
        if kind == HEAD_UNITS and n_kv != shape.n_heads:
            given = [(m, t) for m, t in given if m not in ("W_K", "W_V")]
        if not given:
            raise SubnetworkError(f"{name}: a head-granularity subnetwork needs W_Q or W_O logits under grouped-query attention")
        (m0, u), *rest = given
        for m, t in rest:
            if t.shape != u.shape or not torch.equal(t > 0, u > 0):
                raise SubnetworkError(
                    f"block {layer}: {m} and {m0} disagree on which {kind} are in the subnetwork; at head granularity "
                    f"every matrix of a {'head' if kind == HEAD_UNITS else 'neuron'} is in or out together"
                )
        units[name] = u.clone()
    return units


def _binary_logits(b: Tensor) -> Tensor:
    return torch.where(b.bool(), BINARY_LOGIT, -BINARY_LOGIT)


def random_like(sub: Subnetwork, generator: torch.Generator) -> Subnetwork:
    """A subnetwork with, in every matrix, as many members as ``sub`` (weights, or rows at row
    granularity) placed uniformly at random; at head granularity as many heads and MLP neurons
    per block."""
    units = sub.unit_binary()
    out = {}
    for n, b in (units if units is not None else sub.binary()).items():
        flat = torch.zeros(b.numel(), dtype=torch.bool)
        flat[torch.randperm(b.numel(), generator=generator)[: int(b.sum())]] = True
        out[n] = flat.view(b.shape)
    if units is not None:
        return sub.with_unit_binary(out, random_baseline=True)
    return sub.with_binary(out, random_baseline=True)
