"""The ``hooked`` backend: TransformerLens 3.x ``HookedTransformer`` with TL-native, unprocessed
parameters (:class:`HookedLensModel`), for every family :mod:`kcs_lens.model.hooked_config` maps."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kcs_lens.errors import MaskError, ModelLoadError
from kcs_lens.model.canonical import ATTN_MATRICES, KV_MATRICES, ModelShape, parse_weight_name, weight_name
from kcs_lens.model.lens import (
    Backend,
    LensModel,
    NormParams,
    PerHead,
    Resid,
    UnembedParams,
    WeightSite,
    hf_param_names,
    stored_param,
)


class HookedLensModel(LensModel):
    """TransformerLens 3.x ``HookedTransformer`` with TL-native, unprocessed parameters, for every
    family :mod:`kcs_lens.model.hooked_config` maps. TL's parameter layouts are the canonical ones, so each
    site is the parameter itself (``_W_K`` / ``_W_V`` with grouped-query attention)."""

    backend: Backend = "hooked"

    def __init__(self, model: nn.Module, tokenizer: Any, spec: str, source: dict[str, Any]):
        super().__init__(model, tokenizer, spec, source)
        # HF tensors TL holds transformed (Gemma's 1 + w norms, ...): the way back uses them
        self.hf_originals: dict[str, Tensor] = {}

    @property
    def shape(self) -> ModelShape:
        c = self.model.cfg
        return ModelShape(
            c.n_layers, c.n_heads, c.d_model, c.d_head, c.d_mlp, c.d_vocab, c.n_ctx, c.n_key_value_heads, bool(c.gated_mlp)
        )

    def site(self, name: str) -> WeightSite:
        layer, matrix = parse_weight_name(name)
        if matrix not in self.shape.matrices:
            raise MaskError(f"{name}: {self.spec!r} has no {matrix} (its matrices: {', '.join(self.shape.matrices)})")
        blk = self.model.blocks[layer]
        module = blk.attn if matrix in ATTN_MATRICES else blk.mlp
        attr = "_" + matrix if matrix in KV_MATRICES and self.shape.n_kv_heads is not None else matrix
        ident = lambda t: t
        return WeightSite(name, module, attr, to_native=ident, from_native=ident)

    def hf_state_dict(self) -> dict[str, Tensor]:
        from kcs_lens.model.hooked_weights import tl_to_hf_state_dict

        names = list(hf_param_names(self.hf_config())[0])
        m = self.model

        def tl(name: str) -> Tensor:
            *path, attr = name.split(".")
            return stored_param(m.get_submodule(".".join(path)) if path else m, attr)

        def canonical(layer: int, matrix: str) -> Tensor:
            return self.site(weight_name(layer, matrix)).canonical_weight()

        return tl_to_hf_state_dict(tl, canonical, self.family, self.model_type, self.shape, names, self.hf_originals)

    def unembed_params(self) -> UnembedParams:
        return self.model.unembed.W_U.T, self.model.unembed.b_U

    def attn_post_norm(self, layer: int) -> nn.Module | None:
        # Gemma 2's post-attention RMSNorm is TL's ln1_post (use_normalization_before_and_after)
        return getattr(self.model.blocks[layer], "ln1_post", None)

    def final_norm_params(self) -> NormParams:
        return self.model.ln_final.w.detach(), float(self.model.cfg.eps)

    @property
    def plain_attention(self) -> bool:
        c = self.model.cfg
        return bool(  # some cfg fields are numpy scalars
            super().plain_attention
            and getattr(c, "positional_embedding_type", "standard") == "standard"
            and getattr(c, "normalization_type", "LN") == "LN"
            and not getattr(c, "parallel_attn_mlp", False)
            and not getattr(c, "use_split_qkv_input", False)
            and not getattr(c, "use_attn_in", False)
            and getattr(c, "n_key_value_heads", None) is None
            and getattr(c, "use_attn_scale", True)
            and not getattr(c, "scale_attn_by_inverse_layer_idx", False)
            and abs(getattr(c, "attn_scale", math.sqrt(c.d_head)) - math.sqrt(c.d_head)) < 1e-9
        )

    def project(self, layer: int, t: Resid, which: Literal["Q", "K", "V"]) -> PerHead:
        a = self.model.blocks[layer].attn
        return torch.einsum("...m,hmd->...hd", t, getattr(a, f"W_{which}")) + getattr(a, f"b_{which}")

    def attn_output(self, layer: int, z: PerHead) -> Resid:
        a = self.model.blocks[layer].attn
        return torch.einsum("...hd,hdm->...m", z, a.W_O) + a.b_O


def hooked_from_hf(
    hf: Any, tokenizer: Any, device: str | torch.device, spec: str = "custom"
) -> tuple[nn.Module, dict[str, Tensor]]:
    """A HookedTransformer with the HF model's weights, unprocessed (:mod:`kcs_lens.model.hooked_config`, :mod:`kcs_lens.model.hooked_weights`), and the
    HF tensors kept for the way back."""
    from kcs_lens.model.families import family_of
    from kcs_lens.model.hooked_config import hooked_config
    from kcs_lens.model.hooked_weights import hf_to_tl_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = hf.config
    mt = c.model_type
    kw = hooked_config(c, f"model {spec!r}")
    dtype = next(hf.parameters()).dtype
    cfg = HookedTransformerConfig(**kw, dtype=dtype, device=str(device), init_weights=False)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    shape = ModelShape(
        cfg.n_layers,
        cfg.n_heads,
        cfg.d_model,
        cfg.d_head,
        int(cfg.d_mlp or 0),
        cfg.d_vocab,
        cfg.n_ctx,
        cfg.n_key_value_heads,
        cfg.gated_mlp,
    )
    sd, originals = hf_to_tl_state_dict(
        hf.state_dict(),
        family_of(mt),
        mt,
        shape,
        dict(model.named_parameters()),
        {n for n, _ in hf.named_parameters(remove_duplicate=False)},
        f"model {spec!r}",
    )
    missing, unexpected = model.load_state_dict(sd, strict=False)
    params = {n for n, _ in model.named_parameters()}
    if unexpected or params & set(missing):
        raise ModelLoadError(
            f"internal: loading {mt!r} into HookedTransformer: missing {sorted(params & set(missing))[:3]}, unexpected {unexpected[:3]}"
        )
    # TL 3.x's HookedTransformer.to prints "Moving model to device" on stdout, which would
    # corrupt `--json` output; keep stdout for results.
    return model.to(device, print_details=False).eval(), originals
