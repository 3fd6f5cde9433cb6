"""The two TransformerLens backends behind one handle, :class:`LensModel`.

- :class:`BridgeLensModel`: TransformerLens 4.x ``TransformerBridge`` over the native HF modules;
- :class:`HookedLensModel`: TransformerLens 3.x ``HookedTransformer`` with TL-native parameters
  (every family; the HF <-> TL mapping is :mod:`kcs_lens.model.hooked`).

Everything that differs between them lives here: where each canonical matrix sits in the forward
pass (:class:`WeightSite`), the HF-layout state dict, and the pieces the fast objective and the
analyses run themselves (the frozen prefix, blocks, the final norm, the unembedding with its logit
soft-cap, per-head projections). The HF side of each model family (parameter names, fused
layouts) is :mod:`kcs_lens.model.families`. No TL weight processing (fold_ln, centring, value-bias folding) is ever run: a
zeroed mask entry means a zeroed entry of the HF weight.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from kcs_lens.errors import MaskError
from kcs_lens.model.canonical import ATTN_MATRICES, KV_MATRICES, ModelShape, parse_weight_name, weight_name
from kcs_lens.model.families import Family, family_of, place

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
        hf_cfg = dict(source.get("hf_config") or {})
        self.family: Family = family_of(hf_cfg.get("model_type", "gpt2"), spec)

    @property
    def model_type(self) -> str:
        """The HF ``model_type`` of the model (``gpt2``, ``llama``, ...)."""
        return str(dict(self.source.get("hf_config") or {}).get("model_type", "gpt2"))

    @property
    def logit_softcap(self) -> float | None:
        """Gemma 2's final logit soft-cap c (logits = c tanh(z / c)), or None."""
        cap = dict(self.source.get("hf_config") or {}).get("final_logit_softcapping")
        return float(cap) if cap else None

    def softcap(self, logits: Tensor) -> Tensor:
        cap = self.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

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
        """The unmasked weights in the HF layout and naming of the model's family (fused weights
        rebuilt from the canonical matrices)."""
        raise NotImplementedError

    def _with_canonical(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """``sd`` (an HF state dict) with every maskable matrix written from its site."""
        s = self.shape
        for l in range(s.n_layers):
            for m in s.matrices:
                name = self.family.hf_name(l, m)
                sd[name] = place(self.family, m, s, sd[name], self.site(weight_name(l, m)).canonical_weight())
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}

    def hf_config(self) -> dict[str, Any]:
        s = self.shape
        cfg = dict(self.source.get("hf_config") or {})
        if self.model_type != "gpt2":
            return cfg
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
            tied = self._tied_names()
            for k, v in sorted(self.hf_state_dict().items()):
                if k in tied:  # a second name of another parameter (GPT-2's lm_head is wte)
                    continue
                h.update(k.encode())
                h.update(str(tuple(v.shape)).encode())
                h.update(v.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def _tied_names(self) -> set[str]:
        if self.model_type == "gpt2":
            return {"lm_head.weight"}
        return set(_hf_param_names(self.source.get("hf_config") or {})[1])

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
        """Logits from the normalized final residual, through the model's own unembedding module
        (and the family's logit soft-cap)."""
        if xn.dim() == 2:
            return self.softcap(self.model.unembed(xn[None])[0])
        return self.softcap(self.model.unembed(xn))

    def unembed_params(self) -> tuple[Float[Tensor, "d_vocab d_model"], Float[Tensor, " d_vocab"] | None]:
        """(W, b) with logits = xn @ W.T + b."""
        raise NotImplementedError

    def final_norm_params(self) -> tuple[Float[Tensor, " d_model"], float]:
        """The final norm's effective scale (Gemma's RMSNorm scales by 1 + weight) and epsilon."""
        raise NotImplementedError

    @property
    def rms_norm(self) -> bool:
        """Whether the norms are RMSNorm (no centring), as in Llama, Qwen, Gemma."""
        return self.family.prefix.startswith("model.layers")

    @property
    def plain_attention(self) -> bool:
        """Whether every block is GPT-2's: LayerNorm, learned positions, standard scaled attention,
        sequential attention then MLP (what the fast objective's last-block shortcut assumes).
        False for every other family: the shortcut turns itself off there."""
        hf = dict(self.source.get("hf_config") or {})
        return self.model_type == "gpt2" and not (hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"))

    def project(
        self, layer: int, t: Float[Tensor, "... d_model"], which: Literal["Q", "K", "V"]
    ) -> Float[Tensor, "... n_heads d_head"]:
        """Per-head queries, keys or values of block ``layer`` from its normalized input."""
        raise NotImplementedError

    def attn_output(self, layer: int, z: Float[Tensor, "... n_heads d_head"]) -> Float[Tensor, "... d_model"]:
        """The attention output (``hook_z`` through W_O plus its bias) of block ``layer``."""
        raise NotImplementedError

    def attn_post_norm(self, layer: int) -> nn.Module | None:
        """The RMSNorm applied to block ``layer``'s attention output before it joins the residual
        stream (Gemma 2's ``post_attention_layernorm``); None in families without one."""
        return None

    def head_outputs(self, layer: int, z: Float[Tensor, "batch n_heads d_head"]) -> Float[Tensor, "batch n_heads d_model"]:
        """Each head's direct contribution to the residual stream (``hook_attn_out`` without the
        output bias): its ``hook_z`` through its slice of W_O and, where the family normalizes the
        attention output (:meth:`attn_post_norm`), that RMSNorm with its scale frozen at the whole
        layer's output, so that the heads' contributions sum to the normalized output exactly."""
        W_O = self.weight(f"blocks.{layer}.attn.W_O").to(z.device)  # [head, d_head, d_model]
        out = torch.einsum("bhd,hdm->bhm", z, W_O)
        norm = self.attn_post_norm(layer)
        if norm is None:
            return out
        total = self.attn_output(layer, z)  # [b, d_model]
        eps = float(getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-6)
        ones = torch.ones(1, total.shape[-1], dtype=total.dtype, device=total.device)
        gain = norm(ones)[0] * (1.0 + eps) ** 0.5  # the norm's per-channel scale, whatever its convention
        inv_rms = (total.pow(2).mean(-1, keepdim=True) + eps).rsqrt()  # [b, 1]
        return out * (inv_rms * gain)[:, None, :]


# ------------------------------------------------------------------------------------------
# TransformerLens 4.x: TransformerBridge over the native HF GPT-2 modules
# ------------------------------------------------------------------------------------------
class BridgeLensModel(LensModel):
    """TransformerLens 4.x ``TransformerBridge``: the native HF modules of any supported family."""

    backend: Backend = "bridge"

    def __init__(self, model: nn.Module, tokenizer: Any, spec: str, source: dict[str, Any]):
        super().__init__(model, tokenizer, spec, source)
        self._block_inputs: dict[tuple[int, str], list[tuple[tuple, dict]]] = {}

    @property
    def shape(self) -> ModelShape:
        c = self.model.cfg
        kv = getattr(c, "n_key_value_heads", None)
        gated = "W_gate" in self.family.sites
        # d_mlp and d_head from the weights the forward uses (TL's config guesses 4 d_model for OPT)
        lin = self.model.blocks[0].mlp.get_submodule("in").original_component
        d_mlp = int(lin.weight.shape[1] if _is_conv1d(lin) else lin.weight.shape[0])
        q = self.model.blocks[0].attn.q.original_component
        d_head = int(q.weight.shape[0]) // c.n_heads if not _is_conv1d(q) else c.d_head
        return ModelShape(c.n_layers, c.n_heads, c.d_model, d_head, d_mlp, c.d_vocab, c.n_ctx, kv, gated)

    def site(self, name: str) -> WeightSite:
        layer, matrix = parse_weight_name(name)
        if matrix not in self.shape.matrices:
            raise MaskError(f"{name}: {self.spec!r} has no {matrix} (its matrices: {', '.join(self.shape.matrices)})")
        blk = self.model.blocks[layer]
        h = self.shape.kv_heads if matrix in KV_MATRICES else self.shape.n_heads
        if matrix in ("W_Q", "W_K", "W_V"):
            # The forward uses the split q/k/v nn.Linear ([out, in]); a fused qkv (GPT-2, NeoX) is not used.
            lin = getattr(blk.attn, matrix[-1].lower()).original_component
            return WeightSite(
                name,
                lin,
                "weight",
                to_native=lambda t: einops.rearrange(t, "h m d -> (h d) m"),
                from_native=lambda t: einops.rearrange(t, "(h d) m -> h m d", h=h),
            )
        if matrix == "W_O":
            mod = blk.attn.o.original_component
            if _is_conv1d(mod):  # HF Conv1D (GPT-2): weight [in=(h d), out=m]
                return WeightSite(
                    name,
                    mod,
                    "weight",
                    to_native=lambda t: einops.rearrange(t, "h d m -> (h d) m"),
                    from_native=lambda t: einops.rearrange(t, "(h d) m -> h d m", h=h),
                )
            return WeightSite(  # nn.Linear: weight [out=m, in=(h d)]
                name,
                mod,
                "weight",
                to_native=lambda t: einops.rearrange(t, "h d m -> m (h d)"),
                from_native=lambda t: einops.rearrange(t, "m (h d) -> h d m", h=h),
            )
        mod = getattr(blk.mlp, {"W_in": "in", "W_gate": "gate", "W_out": "out"}[matrix]).original_component
        if _is_conv1d(mod):  # Conv1D [in, out]: the canonical layout
            return WeightSite(name, mod, "weight", to_native=lambda t: t, from_native=lambda t: t)
        return WeightSite(name, mod, "weight", to_native=lambda t: t.transpose(0, 1), from_native=lambda t: t.transpose(0, 1))

    # --- blocks with the inputs HF gives them (rotary positions, masks, position ids) ----------
    def _block_args(self, n: int, device: torch.device) -> list[tuple[tuple, dict]]:
        """Per block, the extra arguments the model passes it for a sequence of ``n`` positions,
        captured once per length from one unmasked batch-1 forward pass (broadcast over rows)."""
        key = (n, str(device))
        if key not in self._block_inputs:
            got: list[tuple[tuple, dict]] = []

            def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                clean = lambda v: None if type(v).__name__.endswith("Cache") else v
                kw = {k: clean(v) for k, v in kwargs.items()}
                if "use_cache" in kw:
                    kw["use_cache"] = False
                got.append((tuple(clean(a) for a in args[1:]), kw))

            hooks = [blk.register_forward_pre_hook(grab, with_kwargs=True) for blk in self.model.blocks]
            try:
                # .forward, not __call__: hooks on the whole model (a mask's refresh) stay out of it.
                # Not under no_grad: inside parametrize.cached() the masked weights formed here are
                # the ones the caller's pass reuses, and they must keep their graph.
                self.model.forward(torch.full((1, n), self.bos_id, dtype=torch.long, device=device))
            finally:
                for hk in hooks:
                    hk.remove()
            if len(got) != self.shape.n_layers:
                raise RuntimeError(f"internal: captured inputs of {len(got)} blocks, expected {self.shape.n_layers}")
            self._block_inputs[key] = got
        return self._block_inputs[key]

    def run_blocks(
        self, x: Float[Tensor, "batch seq d_model"], start: int, stop: int | None = None
    ) -> Float[Tensor, "batch seq d_model"]:
        """Run ``blocks[start:stop]`` from the residual stream entering ``blocks[start]``."""
        if self.model_type == "gpt2":  # learned positions: the blocks need nothing else
            return super().run_blocks(x, start, stop)
        inputs = self._block_args(x.shape[1], x.device)
        stop = self.shape.n_layers if stop is None else stop
        for l in range(start, stop):
            args, kw = inputs[l]
            out = self.model.blocks[l](x, *args, **kw)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def unembed_params(self) -> tuple[Tensor, Tensor | None]:
        lin = self.model.unembed.original_component
        return lin.weight, getattr(lin, "bias", None)

    def final_norm_params(self) -> tuple[Tensor, float]:
        norm = self.model.ln_final.original_component
        w = norm.weight.detach()
        if self.model_type.startswith("gemma"):  # Gemma's RMSNorm multiplies by (1 + weight)
            w = 1.0 + w
        eps: Any = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or getattr(self.model.cfg, "eps", 1e-5)
        return w, float(eps)

    def project(self, layer: int, t: Tensor, which: Literal["Q", "K", "V"]) -> Tensor:
        return getattr(self.model.blocks[layer].attn, which.lower())(t).unflatten(-1, (-1, self.shape.d_head))

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        return self.model.blocks[layer].attn.o(z.flatten(-2))

    def attn_post_norm(self, layer: int) -> nn.Module | None:
        hf_layer = self.model.original_model.get_submodule(self.family.prefix.format(l=layer).rstrip("."))
        # sandwich norms (Gemma 2/3): post_attention_layernorm normalizes the attention output there,
        # and pre_feedforward_layernorm is the MLP's input norm (in Llama the former is the latter)
        if hasattr(hf_layer, "pre_feedforward_layernorm"):
            return hf_layer.post_attention_layernorm
        return None

    def hf_state_dict(self) -> dict[str, Tensor]:
        hf = self.model.original_model
        names, _ = _hf_param_names(hf.config.to_dict())
        sd = _clean_state_dict(hf)
        return self._with_canonical({k: sd[k] for k in names})


def _is_conv1d(module: nn.Module) -> bool:
    """HF's Conv1D (weight [in, out]), also while a parametrization is attached (its class is then
    ``ParametrizedConv1D``)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _clean_state_dict(hf: nn.Module) -> dict[str, Tensor]:
    """An HF model's tensors under their HF names: the bridge's wrappers (``_original_component``)
    and parametrizations (``parametrizations.weight.original``) taken out of the keys."""
    out: dict[str, Tensor] = {}
    for k, v in hf.state_dict().items():
        k2 = k.replace("._original_component", "").replace("_original_component.", "")
        k2 = re.sub(r"parametrizations\.(\w+)\.original$", r"\1", k2)
        out.setdefault(k2, v)
    return out


_PARAM_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _hf_param_names(cfg: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every parameter name of the HF causal LM of ``cfg``, the names that repeat another one (tied))."""
    import json

    key = json.dumps(cfg, sort_keys=True, default=str)
    if key not in _PARAM_NAMES:
        from transformers import AutoConfig, AutoModelForCausalLM

        c = dict(cfg)
        config = AutoConfig.for_model(c.pop("model_type"), **{k: v for k, v in c.items() if k != "transformers_version"})
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config)
        every = tuple(n for n, _ in fresh.named_parameters(remove_duplicate=False))
        unique = {n for n, _ in fresh.named_parameters()}
        _PARAM_NAMES[key] = (every, tuple(n for n in every if n not in unique))
    return _PARAM_NAMES[key]


# ------------------------------------------------------------------------------------------
# TransformerLens 3.x: HookedTransformer with TL-native parameters
# ------------------------------------------------------------------------------------------
class HookedLensModel(LensModel):
    """TransformerLens 3.x ``HookedTransformer`` with TL-native, unprocessed parameters, for every
    family :mod:`kcs_lens.model.hooked` maps. TL's parameter layouts are the canonical ones, so each
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
        from kcs_lens.model.hooked import tl_to_hf_state_dict

        names = list(_hf_param_names(self.hf_config())[0])
        m = self.model

        def tl(name: str) -> Tensor:
            *path, attr = name.split(".")
            return stored_param(m.get_submodule(".".join(path)) if path else m, attr)

        def canonical(layer: int, matrix: str) -> Tensor:
            return self.site(weight_name(layer, matrix)).canonical_weight()

        return tl_to_hf_state_dict(tl, canonical, self.family, self.model_type, self.shape, names, self.hf_originals)

    def unembed_params(self) -> tuple[Tensor, Tensor | None]:
        return self.model.unembed.W_U.T, self.model.unembed.b_U

    def attn_post_norm(self, layer: int) -> nn.Module | None:
        # Gemma 2's post-attention RMSNorm is TL's ln1_post (use_normalization_before_and_after)
        return getattr(self.model.blocks[layer], "ln1_post", None)

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
