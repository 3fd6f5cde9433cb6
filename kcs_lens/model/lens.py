"""The handle every kcs-lens module holds: :class:`LensModel`, one TransformerLens model (either
backend) plus its tokenizer, shape, canonical weight access and the pieces of the forward pass
the fast objective and the analyses run themselves.

The two backends subclass it: :class:`~kcs_lens.model.backend_bridge.BridgeLensModel`
(TransformerLens 4.x ``TransformerBridge`` over the native HF modules) and
:class:`~kcs_lens.model.backend_hooked.HookedLensModel` (TransformerLens 3.x ``HookedTransformer``,
every family; the HF <-> TL mapping is :mod:`kcs_lens.model.hooked_config` and
:mod:`kcs_lens.model.hooked_weights`). Only those two modules branch on the backend: where each
canonical matrix sits in the forward pass (:class:`WeightSite`), the HF-layout state dict, the
frozen prefix, blocks, the final norm, the unembedding with its logit soft-cap, per-head
projections. The HF side of each model family (parameter names, fused layouts) is
:mod:`kcs_lens.model.families`. No TL weight processing (fold_ln, centring, value-bias folding) is
ever run: a zeroed mask entry means a zeroed entry of the HF weight.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from kcs_lens.errors import SubnetworkError
from kcs_lens.model.canonical import ModelShape, weight_name
from kcs_lens.model.families import Family, family_of, place

Backend = Literal["bridge", "hooked"]
# the shapes of the forward-pass pieces every backend implements (checked at test time)
Resid = Float[Tensor, "... d_model"]
PerHead = Float[Tensor, "... n_heads d_head"]
UnembedParams = tuple[Float[Tensor, "d_vocab d_model"], Float[Tensor, " d_vocab"] | None]
NormParams = tuple[Float[Tensor, " d_model"], float]


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
        if not self.family.shape_config:
            return cfg
        cfg.update(model_type=self.model_type, architectures=[self.family.hf_class])
        cfg.update({k: getattr(s, attr) for k, attr in self.family.shape_config})
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

    def check_fingerprint(self, expected: str | None, found_on: str) -> None:
        """A SubnetworkError unless this model's weights fingerprint is ``expected`` (None: nothing to
        check); ``found_on`` says what was found on which model (``run R was found on model 'M'``)."""
        if expected and expected != self.fingerprint():
            raise SubnetworkError(
                f"{found_on} (weights fingerprint {expected}), but {self.spec!r} has different weights "
                f"(fingerprint {self.fingerprint()})"
            )

    def _tied_names(self) -> set[str]:
        if self.family.tied:
            return set(self.family.tied)
        return set(hf_param_names(self.source.get("hf_config") or {})[1])

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "backend": self.backend, "shape": asdict(self.shape), "source": self.source}

    # --- pieces of the forward pass (the fast objective and the analyses run them) ----------
    def resid_pre(self, tokens: Int[Tensor, "batch seq"], layer: int) -> Float[Tensor, "batch seq d_model"]:
        """``blocks.{layer}.hook_resid_pre``: the residual stream entering block ``layer``."""
        return self.model(tokens, stop_at_layer=layer)

    def with_resid_post(
        self, tokens: Int[Tensor, "batch seq"], layers: tuple[int, ...]
    ) -> tuple[Float[Tensor, "batch seq vocab"], dict[int, Float[Tensor, "batch seq d_model"]]]:
        """The logits of one forward pass and, from the same pass (gradients kept), each of
        ``layers``' ``blocks.{l}.hook_resid_post``: the residual stream after block ``l``."""
        resid: dict[int, Tensor] = {}

        def keep(layer: int) -> Callable[..., None]:
            def hook(_m: Any, _args: Any, out: Any) -> None:  # the block's output
                resid[layer] = out[0] if isinstance(out, tuple) else out

            return hook

        hooks = [self.model.blocks[l].register_forward_hook(keep(l)) for l in layers]
        try:
            logits = self(tokens)
        finally:
            for h in hooks:
                h.remove()
        return logits, resid

    def run_blocks(
        self, x: Float[Tensor, "batch seq d_model"], start: int, stop: int | None = None
    ) -> Float[Tensor, "batch seq d_model"]:
        """Run ``blocks[start:stop]`` from the residual stream entering ``blocks[start]``."""
        for blk in self.model.blocks[start:stop]:
            out = blk(x)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def attn_input(self, layer: int, x: Resid) -> Resid:
        """Block ``layer``'s normalized attention input (``ln1``)."""
        return self.model.blocks[layer].ln1(x)

    def mlp_output(self, layer: int, x: Float[Tensor, "batch seq d_model"]) -> Float[Tensor, "batch seq d_model"]:
        """Block ``layer``'s MLP output (``hook_mlp_out``) from the residual entering its MLP (``ln2`` then the MLP)."""
        blk = self.model.blocks[layer]
        return blk.mlp(blk.ln2(x))

    def final_norm(self, x: Tensor) -> Tensor:
        return self.model.ln_final(x)

    def unembed(self, xn: Tensor) -> Tensor:
        """Logits from the normalized final residual, through the model's own unembedding module
        (and the family's logit soft-cap)."""
        if xn.dim() == 2:
            return self.softcap(self.model.unembed(xn[None])[0])
        return self.softcap(self.model.unembed(xn))

    def unembed_params(self) -> UnembedParams:
        """(W, b) with logits = xn @ W.T + b."""
        raise NotImplementedError

    def final_norm_params(self) -> NormParams:
        """The final norm's effective scale (Gemma's RMSNorm scales by 1 + weight) and epsilon."""
        raise NotImplementedError

    @property
    def rms_norm(self) -> bool:
        """Whether the norms are RMSNorm (no centring), as in Llama, Qwen, Gemma."""
        return self.family.rms_norm

    @property
    def plain_attention(self) -> bool:
        """Whether every block is GPT-2's: LayerNorm, learned positions, standard scaled attention,
        sequential attention then MLP (what the fast objective's last-block shortcut assumes).
        False for every other family: the shortcut turns itself off there."""
        hf = dict(self.source.get("hf_config") or {})
        return self.family.plain_blocks and not (hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"))

    def project(self, layer: int, t: Resid, which: Literal["Q", "K", "V"]) -> PerHead:
        """Per-head queries, keys or values of block ``layer`` from its normalized input."""
        raise NotImplementedError

    def attn_output(self, layer: int, z: PerHead) -> Resid:
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
        W_O: Float[Tensor, "n_heads d_head d_model"] = self.weight(f"blocks.{layer}.attn.W_O").to(z.device)
        out = torch.einsum("bhd,hdm->bhm", z, W_O)
        norm = self.attn_post_norm(layer)
        if norm is None:
            return out
        total: Float[Tensor, "batch d_model"] = self.attn_output(layer, z)
        eps = float(getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-6)
        ones = torch.ones(1, total.shape[-1], dtype=total.dtype, device=total.device)
        gain = norm(ones)[0] * (1.0 + eps) ** 0.5  # the norm's per-channel scale, whatever its convention
        inv_rms: Float[Tensor, "batch 1"] = (total.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
        return out * (inv_rms * gain)[:, None, :]


_HF_PARAM_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def hf_param_names(cfg: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every parameter name of the HF causal LM of ``cfg``, the names that repeat another one (tied))."""
    key = json.dumps(cfg, sort_keys=True, default=str)
    if key not in _HF_PARAM_NAMES:
        from transformers import AutoConfig, AutoModelForCausalLM

        c = dict(cfg)
        config = AutoConfig.for_model(c.pop("model_type"), **{k: v for k, v in c.items() if k != "transformers_version"})
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config)
        every = tuple(n for n, _ in fresh.named_parameters(remove_duplicate=False))
        unique = {n for n, _ in fresh.named_parameters()}
        _HF_PARAM_NAMES[key] = (every, tuple(n for n in every if n not in unique))
    return _HF_PARAM_NAMES[key]
