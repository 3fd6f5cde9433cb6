"""The ``bridge`` backend: TransformerLens 4.x ``TransformerBridge`` over the native HF modules
of any supported family (:class:`BridgeLensModel`)."""

from __future__ import annotations

import re
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

from kcs_lens.errors import MaskError
from kcs_lens.model.canonical import KV_MATRICES, ModelShape, parse_weight_name
from kcs_lens.model.lens import Backend, LensModel, NormParams, PerHead, Resid, UnembedParams, WeightSite, hf_param_names


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
            return _rearranged(name, getattr(blk.attn, matrix[-1].lower()).original_component, "h m d", "(h d) m", h)
        if matrix == "W_O":
            mod = blk.attn.o.original_component
            # HF Conv1D (GPT-2): weight [in=(h d), out=m]; nn.Linear: weight [out=m, in=(h d)]
            return _rearranged(name, mod, "h d m", "(h d) m" if _is_conv1d(mod) else "m (h d)", h)
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
        if self.family.plain_blocks:  # learned positions: the blocks need nothing else
            return super().run_blocks(x, start, stop)
        inputs = self._block_args(x.shape[1], x.device)
        stop = self.shape.n_layers if stop is None else stop
        for l in range(start, stop):
            args, kw = inputs[l]
            out = self.model.blocks[l](x, *args, **kw)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def unembed_params(self) -> UnembedParams:
        lin = self.model.unembed.original_component
        return lin.weight, getattr(lin, "bias", None)

    def final_norm_params(self) -> NormParams:
        norm = self.model.ln_final.original_component
        w = norm.weight.detach()
        if self.family.norm_plus_one:  # Gemma's RMSNorm multiplies by (1 + weight)
            w = 1.0 + w
        eps: Any = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or getattr(self.model.cfg, "eps", 1e-5)
        return w, float(eps)

    def project(self, layer: int, t: Resid, which: Literal["Q", "K", "V"]) -> PerHead:
        return getattr(self.model.blocks[layer].attn, which.lower())(t).unflatten(-1, (-1, self.shape.d_head))

    def attn_output(self, layer: int, z: PerHead) -> Resid:
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
        names, _ = hf_param_names(hf.config.to_dict())
        sd = _clean_state_dict(hf)
        return self._with_canonical({k: sd[k] for k in names})


def _rearranged(name: str, mod: nn.Module, canonical: str, native: str, h: int) -> WeightSite:
    """The ``weight`` of ``mod``, stored with the einops axes ``native``, canonically ``canonical``
    (``h``: the head count of the split axis)."""
    return WeightSite(
        name,
        mod,
        "weight",
        to_native=lambda t: einops.rearrange(t, f"{canonical} -> {native}"),
        from_native=lambda t: einops.rearrange(t, f"{native} -> {canonical}", h=h),
    )


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
