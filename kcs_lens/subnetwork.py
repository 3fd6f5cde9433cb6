"""The saved subnetwork: mask logits and binary mask under canonical TL names, with metadata.

``subnetwork.safetensors`` holds, per masked matrix ``blocks.{l}.attn.W_Q`` ...:
``logits/<name>`` (float32, logit shape) and ``mask/<name>`` (uint8, 1 = in the subnetwork),
plus string metadata (model spec and weight fingerprint, model shape, layer range, granularity,
sparsity, seed, step, kcs-lens version). Logit shapes follow the canonical layout, so a
subnetwork found on one TransformerLens backend applies on the other.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from kcs_lens.masks import Keep, MaskConfig, WeightMask, mask_stats, total_linear_weights
from kcs_lens.models import LensModel, ModelShape


class SubnetworkError(ValueError):
    """A subnetwork file that is missing, malformed, or does not fit the model given."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Subnetwork:
    """Mask logits of a knowledge-critical subnetwork, and where they came from."""

    logits: dict[str, Tensor]
    mask_config: MaskConfig
    shape: ModelShape
    meta: dict[str, Any] = field(default_factory=dict)

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_mask(cls, mask: WeightMask, lm: LensModel | None = None, **meta: Any) -> "Subnetwork":
        logits = {n: p.detach().float().cpu().clone() for n, p in mask.items()}
        if lm is not None:
            meta.setdefault("model_spec", lm.spec)
            meta.setdefault("model_fingerprint", lm.fingerprint())
            meta.setdefault("backend", lm.backend)
        return cls(logits, mask.config, mask.shape, meta)

    def to_mask(self, seed: int = 0, device: str | torch.device = "cpu") -> WeightMask:
        wm = WeightMask(self.shape, self.mask_config, seed=seed, device=device)
        with torch.no_grad():
            for n, p in wm.items():
                p.copy_(self.logits[n].to(device))
        return wm

    # --- the subnetwork itself -------------------------------------------------------------
    def binary(self) -> dict[str, Tensor]:
        """{logit > 0}: True where the weight (or row) belongs to the subnetwork."""
        return {n: l > 0 for n, l in self.logits.items()}

    @property
    def stats(self):
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
        """A subnetwork with the given membership (logits +1 inside, -1 outside)."""
        logits = {n: torch.where(b.bool(), 1.0, -1.0) for n, b in binary.items()}
        return Subnetwork(logits, self.mask_config, self.shape, {**self.meta, **meta})

    # --- applying --------------------------------------------------------------------------
    def check_model(self, lm: LensModel, *, strict_fingerprint: bool = True) -> None:
        if lm.shape != self.shape:
            raise SubnetworkError(
                f"subnetwork was found on a model of shape {asdict(self.shape)}, but {lm.spec!r} has {asdict(lm.shape)}"
            )
        fp = self.meta.get("model_fingerprint")
        if strict_fingerprint and fp and fp != lm.fingerprint():
            raise SubnetworkError(
                f"subnetwork was found on model {self.meta.get('model_spec')!r} (weights fingerprint {fp}), "
                f"but {lm.spec!r} has different weights (fingerprint {lm.fingerprint()})"
            )

    @contextmanager
    def applied(self, lm: LensModel, keep: Keep = "remaining", *, strict_fingerprint: bool = True) -> Iterator[LensModel]:
        """``with sub.applied(model): ...`` runs the remaining model (or ``keep="subnetwork"``)."""
        self.check_model(lm, strict_fingerprint=strict_fingerprint)
        wm = self.to_mask(device=lm.device)
        with wm.applied(lm, mode="eval", keep=keep):
            yield lm

    def remove_from(self, lm: LensModel) -> WeightMask:
        """Attach the deterministic complement to ``lm`` and return the mask (``.detach()`` restores)."""
        self.check_model(lm)
        wm = self.to_mask(device=lm.device).attach(lm)
        wm.mode, wm.keep = "eval", "remaining"
        return wm

    # --- files -----------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        st = self.stats
        meta = {
            **{k: v for k, v in self.meta.items()},
            "mask_config": self.mask_config.to_dict(),
            "model_shape": asdict(self.shape),
            "sparsity": st.sparsity,
            "sparsity_all_linear": self.sparsity_all_linear,
            "n_in_subnetwork": st.n_sub,
            "n_masked": st.n_total,
        }
        from kcs_lens import __version__

        meta.setdefault("kcs_lens_version", __version__)
        return {k: json.dumps(v, default=str) for k, v in meta.items()}

    def save(self, path: str | os.PathLike) -> Path:
        tensors: dict[str, Tensor] = {}
        for n, l in self.logits.items():
            tensors[f"logits/{n}"] = l.float()
            tensors[f"mask/{n}"] = (l > 0).to(torch.uint8)
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
        missing = [n for n in mc.names if n not in logits]
        if missing:
            raise SubnetworkError(f"{path}: logits missing for {missing[:3]}{'...' if len(missing) > 3 else ''}")
        return cls(logits, mc, shape, meta)
