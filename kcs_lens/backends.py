"""The two TransformerLens backends behind one handle, :class:`LensModel`.

- :class:`BridgeLensModel`: TransformerLens 4.x ``TransformerBridge`` over the native HF modules;
- :class:`HookedLensModel`: TransformerLens 3.x ``HookedTransformer`` with TL-native parameters.

Everything that differs between them lives here: where each canonical matrix sits in the forward
pass (:class:`WeightSite`), the HF-layout state dict, and the pieces the fast objective and the
analyses run themselves (the frozen prefix, blocks, the final norm, the unembedding, per-head
projections). No TL weight processing (fold_ln, centring, value-bias folding) is ever run: a
zeroed mask entry means a zeroed entry of the HF weight.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from kcs_lens.canonical import ATTN_MATRICES, ModelShape, parse_weight_name

Backend = Literal["bridge", "hooked"]


def stored_param(module: nn.Module, attr: str) -> Tensor:
    """``module.attr`` as stored: the unmasked original while a parametrization is attached."""
    p = getattr(module, "parametrizations", None)
    return p[attr].original if p is not None and attr in p else getattr(module, attr)


@dataclass
class WeightSite:
    """Where one canonical matrix lives in a backend: ``getattr(module, attr)`` in native layout.

    ``to_native`` maps a canonical-layout tensor (weights or a broadcastable mask) to the native
    layout; ``from_native`` maps back. Masks attach here with ``torch.nn.utils.parametrize``.
    """

    name: str
    module: nn.Module
    attr: str
    to_native: Callable[[Tensor], Tensor]
    from_native: Callable[[Tensor], Tensor]

    def native_weight(self) -> Tensor:
        """The stored (unmasked) parameter, also while a parametrization is attached."""
        return stored_param(self.module, self.attr)

    def canonical_weight(self) -> Tensor:
        return self.from_native(self.native_weight().detach())


class LensModel:
    """A hooked TL model (``.model``) plus tokenizer, shape and canonical weight access."""

    backend: Backend

    def __init__(self, model: nn.Module, tokenizer: Any, spec: str, source: dict[str, Any]):
        self.model: Any = model  # a TransformerBridge or HookedTransformer: TL's dynamic module tree
        self.tokenizer = tokenizer
        self.spec = spec
        self.source = source
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._fingerprint: str | None = None

    # --- forward -------------------------------------------------------------------------
    def __call__(self, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq vocab"]:
        return self.model(tokens)

    forward = __call__

    def to_tokens(self, text: str | list[str], prepend_bos: bool = True) -> Int[Tensor, "batch seq"]:
        texts = [text] if isinstance(text, str) else text
        bos = [self.bos_id] if prepend_bos else []
        rows = [bos + self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        n = max(len(r) for r in rows)
        out = torch.full((len(rows), n), self.bos_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(self.device)

    @property
    def bos_id(self) -> int:
        t = self.tokenizer
        return t.bos_token_id if t.bos_token_id is not None else t.eos_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- weights -------------------------------------------------------------------------
    @property
    def shape(self) -> ModelShape:
        c = self.model.cfg
        return ModelShape(c.n_layers, c.n_heads, c.d_model, c.d_head, c.d_mlp, c.d_vocab, c.n_ctx)

    def site(self, name: str) -> WeightSite:
        raise NotImplementedError

    def weight(self, name: str) -> Tensor:
        """A canonical-layout copy of one maskable matrix (unmasked)."""
        return self.site(name).canonical_weight().clone()

    def hf_state_dict(self) -> dict[str, Tensor]:
        """The unmasked weights in the HF ``GPT2LMHeadModel`` layout and naming."""
        raise NotImplementedError

    def hf_config(self) -> dict[str, Any]:
        s = self.shape
        cfg = dict(self.source.get("hf_config") or {})
        cfg.update(
            model_type="gpt2",
            architectures=["GPT2LMHeadModel"],
            n_layer=s.n_layers,
            n_head=s.n_heads,
            n_embd=s.d_model,
            n_inner=s.d_mlp,
            vocab_size=s.d_vocab,
            n_positions=s.n_ctx,
        )
        return cfg

    def fingerprint(self) -> str:
        """SHA-256 over the HF-layout weights (names, shapes, float32 bytes): identifies a model."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for k, v in sorted(self.hf_state_dict().items()):
                if k == "lm_head.weight":  # tied to wte in GPT-2
                    continue
                h.update(k.encode())
                h.update(str(tuple(v.shape)).encode())
                h.update(v.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "backend": self.backend, "shape": asdict(self.shape), "source": self.source}

    # --- pieces of the forward pass (the fast objective and the analyses run them) ----------
    def resid_pre(self, tokens: Int[Tensor, "batch seq"], layer: int) -> Float[Tensor, "batch seq d_model"]:
        """``blocks.{layer}.hook_resid_pre``: the residual stream entering block ``layer``."""
        return self.model(tokens, stop_at_layer=layer)

    def run_blocks(
        self, x: Float[Tensor, "batch seq d_model"], start: int, stop: int | None = None
    ) -> Float[Tensor, "batch seq d_model"]:
        """Run ``blocks[start:stop]`` from the residual stream entering ``blocks[start]``."""
        for blk in self.model.blocks[start:stop]:
            out = blk(x)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def final_norm(self, x: Tensor) -> Tensor:
        return self.model.ln_final(x)

    def unembed(self, xn: Tensor) -> Tensor:
        """Logits from the normalized final residual, through the model's own unembedding module."""
        if xn.dim() == 2:
            return self.model.unembed(xn[None])[0]
        return self.model.unembed(xn)

    def unembed_params(self) -> tuple[Float[Tensor, "d_vocab d_model"], Float[Tensor, " d_vocab"] | None]:
        """(W, b) with logits = xn @ W.T + b."""
        raise NotImplementedError

    def final_norm_params(self) -> tuple[Float[Tensor, " d_model"], float]:
        """The final LayerNorm's weight and epsilon (unprocessed)."""
        raise NotImplementedError

    @property
    def plain_attention(self) -> bool:
        """Whether every block is GPT-2's: LayerNorm, learned positions, standard scaled attention,
        sequential attention then MLP (what the fast objective's last-block shortcut assumes)."""
        hf = dict(self.source.get("hf_config") or {})
        return not (hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"))

    def project(
        self, layer: int, t: Float[Tensor, "... d_model"], which: Literal["Q", "K", "V"]
    ) -> Float[Tensor, "... n_heads d_head"]:
        """Per-head queries, keys or values of block ``layer`` from its normalized input."""
        raise NotImplementedError

    def attn_output(self, layer: int, z: Float[Tensor, "... n_heads d_head"]) -> Float[Tensor, "... d_model"]:
        """The attention output (``hook_z`` through W_O plus its bias) of block ``layer``."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------
# TransformerLens 4.x: TransformerBridge over the native HF GPT-2 modules
# ------------------------------------------------------------------------------------------
class BridgeLensModel(LensModel):
    backend: Backend = "bridge"

    def site(self, name: str) -> WeightSite:
        layer, matrix = parse_weight_name(name)
        blk = self.model.blocks[layer]
        h = self.shape.n_heads
        if matrix in ("W_Q", "W_K", "W_V"):
            # The forward uses the split q/k/v nn.Linear ([out, in]); the fused qkv is not used.
            lin = getattr(blk.attn, matrix[-1].lower()).original_component
            return WeightSite(
                name,
                lin,
                "weight",
                to_native=lambda t: einops.rearrange(t, "h m d -> (h d) m"),
                from_native=lambda t: einops.rearrange(t, "(h d) m -> h m d", h=h),
            )
        if matrix == "W_O":
            conv = blk.attn.o.original_component  # HF Conv1D: weight [in=(h d), out=m]
            return WeightSite(
                name,
                conv,
                "weight",
                to_native=lambda t: einops.rearrange(t, "h d m -> (h d) m"),
                from_native=lambda t: einops.rearrange(t, "(h d) m -> h d m", h=h),
            )
        conv = getattr(blk.mlp, "in" if matrix == "W_in" else "out").original_component  # Conv1D [in, out]
        return WeightSite(name, conv, "weight", to_native=lambda t: t, from_native=lambda t: t)

    def unembed_params(self) -> tuple[Tensor, Tensor | None]:
        lin = self.model.unembed.original_component
        return lin.weight, getattr(lin, "bias", None)

    def final_norm_params(self) -> tuple[Tensor, float]:
        return self.model.ln_final.original_component.weight.detach(), float(getattr(self.model.cfg, "eps", 1e-5))

    def project(self, layer: int, t: Tensor, which: Literal["Q", "K", "V"]) -> Tensor:
        return getattr(self.model.blocks[layer].attn, which.lower())(t).unflatten(-1, (self.shape.n_heads, -1))

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        return self.model.blocks[layer].attn.o(z.flatten(-2))

    def hf_state_dict(self) -> dict[str, Tensor]:
        b = self.model
        sd: dict[str, Tensor] = {
            "transformer.wte.weight": b.embed.original_component.weight,
            "transformer.wpe.weight": b.pos_embed.original_component.weight,
            "transformer.ln_f.weight": b.ln_final.original_component.weight,
            "transformer.ln_f.bias": b.ln_final.original_component.bias,
        }
        for l in range(self.shape.n_layers):
            blk, p = b.blocks[l], f"transformer.h.{l}."
            qkv = [getattr(blk.attn, x).original_component for x in "qkv"]
            sd[p + "ln_1.weight"] = blk.ln1.original_component.weight
            sd[p + "ln_1.bias"] = blk.ln1.original_component.bias
            sd[p + "attn.c_attn.weight"] = torch.cat([stored_param(m, "weight").T for m in qkv], dim=1)
            sd[p + "attn.c_attn.bias"] = torch.cat([m.bias for m in qkv])
            sd[p + "attn.c_proj.weight"] = stored_param(blk.attn.o.original_component, "weight")
            sd[p + "attn.c_proj.bias"] = blk.attn.o.original_component.bias
            sd[p + "ln_2.weight"] = blk.ln2.original_component.weight
            sd[p + "ln_2.bias"] = blk.ln2.original_component.bias
            for hf_name, attr in (("c_fc", "in"), ("c_proj", "out")):
                conv = getattr(blk.mlp, attr).original_component
                sd[p + f"mlp.{hf_name}.weight"] = stored_param(conv, "weight")
                sd[p + f"mlp.{hf_name}.bias"] = conv.bias
        sd["lm_head.weight"] = b.unembed.original_component.weight
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------
# TransformerLens 3.x: HookedTransformer with TL-native parameters
# ------------------------------------------------------------------------------------------
class HookedLensModel(LensModel):
    backend: Backend = "hooked"

    def site(self, name: str) -> WeightSite:
        layer, matrix = parse_weight_name(name)
        blk = self.model.blocks[layer]
        module = blk.attn if matrix in ATTN_MATRICES else blk.mlp
        ident = lambda t: t
        return WeightSite(name, module, matrix, to_native=ident, from_native=ident)

    def hf_state_dict(self) -> dict[str, Tensor]:
        m, s = self.model, self.shape
        P = lambda mod, attr: stored_param(mod, attr).detach()
        sd: dict[str, Tensor] = {
            "transformer.wte.weight": m.embed.W_E,
            "transformer.wpe.weight": m.pos_embed.W_pos,
            "transformer.ln_f.weight": m.ln_final.w,
            "transformer.ln_f.bias": m.ln_final.b,
            "lm_head.weight": m.unembed.W_U.T,
        }
        for l in range(s.n_layers):
            blk, p = m.blocks[l], f"transformer.h.{l}."
            a = blk.attn
            qkv = [einops.rearrange(P(a, w), "h m d -> m (h d)") for w in ("W_Q", "W_K", "W_V")]
            sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = blk.ln1.w, blk.ln1.b
            sd[p + "attn.c_attn.weight"] = torch.cat(qkv, dim=1)
            sd[p + "attn.c_attn.bias"] = torch.cat([einops.rearrange(b, "h d -> (h d)") for b in (a.b_Q, a.b_K, a.b_V)])
            sd[p + "attn.c_proj.weight"] = einops.rearrange(P(a, "W_O"), "h d m -> (h d) m")
            sd[p + "attn.c_proj.bias"] = a.b_O
            sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = blk.ln2.w, blk.ln2.b
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = P(blk.mlp, "W_in"), blk.mlp.b_in
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = P(blk.mlp, "W_out"), blk.mlp.b_out
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}

    def unembed_params(self) -> tuple[Tensor, Tensor | None]:
        return self.model.unembed.W_U.T, self.model.unembed.b_U

    def final_norm_params(self) -> tuple[Tensor, float]:
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

    def project(self, layer: int, t: Tensor, which: Literal["Q", "K", "V"]) -> Tensor:
        a = self.model.blocks[layer].attn
        return torch.einsum("...m,hmd->...hd", t, getattr(a, f"W_{which}")) + getattr(a, f"b_{which}")

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        a = self.model.blocks[layer].attn
        return torch.einsum("...hd,hdm->...m", z, a.W_O) + a.b_O
