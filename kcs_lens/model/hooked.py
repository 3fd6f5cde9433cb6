"""HF checkpoints <-> TransformerLens 3.9 ``HookedTransformer``, UNPROCESSED, for every family of
:data:`kcs_lens.model.families.FAMILIES`.

Our own mapping (the facts per architecture read from TL 3.9's ``convert_hf_model_config`` and its
weight converters; no TL weight processing is run):

- :func:`hooked_config`: the ``HookedTransformerConfig`` fields of an HF config (rotary dims and
  base, parallel attention + MLP, grouped-query attention, gated MLP, RMSNorm, Gemma 2's pre/post
  norms, soft-caps, sliding windows and query scale, Qwen 3's q/k norms, GPT-J's adjacent-pair
  rotary), or a ModelLoadError naming what TL 3.9 cannot represent;
- :func:`links`: where every other HF parameter (embeddings, norms, biases, unembedding) goes in
  the HookedTransformer, with the transform TL's architecture needs;
- :func:`hf_to_tl_state_dict` and :func:`tl_to_hf_state_dict`.

The maskable matrices need no transform: the canonical layout (:mod:`kcs_lens.model.canonical`) is TL's
own (``W_Q``, ``_W_K`` / ``_W_V`` with grouped-query attention, ``W_O``, ``W_in``, ``W_gate``,
``W_out``), read from and written back to the HF checkpoint by :func:`kcs_lens.model.families.extract` /
:func:`~kcs_lens.model.families.place`, so one mask entry is one HF weight entry on both backends.

Transforms TL's architecture needs (the only departures from "the HF tensor as is"):

- Gemma / Gemma 2 RMSNorms scale by ``1 + w`` in HF; TL's RMSNorm scales by ``w``, so TL holds
  ``1 + w`` (as TL 3.9's own Gemma converter does); Gemma multiplies the embeddings by
  ``sqrt(d_model)`` in the forward pass, TL holds ``W_E * sqrt(d_model)``;
- OPT's learned positions are offset by 2 (rows 0 and 1 are never used): TL holds rows 2: ;
- GPT-J has one LayerNorm for attention and MLP; TL's parallel block has ln1 and ln2: both get it.

The way back keeps the HF tensors these transforms do not invert exactly (``(1 + w) - 1`` rounds):
:func:`hf_to_tl_state_dict` returns them as ``originals``, and :func:`tl_to_hf_state_dict` uses an
original wherever the transform of it still equals the TL tensor, so that the HF state dict (and
the weights fingerprint) of a hooked model is bit for bit the bridge's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from kcs_lens.errors import ModelLoadError
from kcs_lens.model.canonical import KV_MATRICES, ModelShape, weight_name
from kcs_lens.model.families import Family, extract, hf_shape, place

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


def _g(c: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` the HF config has (not None)."""
    for n in names:
        v = getattr(c, n, None)
        if v is not None:
            return v
    return default


def _rope(c: Any, mt: str, where: str) -> tuple[float, float, dict[str, Any]]:
    """(rope_theta, partial_rotary_factor, the HookedTransformerConfig fields of its scaling) of an
    HF config: ``default``, ``linear`` and Llama 3's ``llama3`` (NTK by parts); a ModelLoadError
    for the other scalings (TL 3.9's YaRN / dynamic NTK are not mapped here)."""
    rp = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    kind = rp.get("rope_type", rp.get("type", "default")) or "default"
    extra: dict[str, Any] = {}
    if kind == "linear":  # positions / factor == frequencies * factor
        extra = {"rotary_scaling_factor": float(rp["factor"])}
    elif kind == "llama3":
        extra = {
            "use_NTK_by_parts_rope": True,
            "NTK_by_parts_factor": float(rp["factor"]),
            "NTK_by_parts_low_freq_factor": float(rp.get("low_freq_factor", 1.0)),
            "NTK_by_parts_high_freq_factor": float(rp.get("high_freq_factor", 4.0)),
            "NTK_original_ctx_len": int(rp.get("original_max_position_embeddings", c.max_position_embeddings)),
        }
    elif kind != "default":
        raise ModelLoadError(
            f"{where}architecture {mt!r} with rope_type {kind!r} is not supported on the hooked backend "
            "(TransformerLens 3.9; kcs-lens maps default, linear and llama3 RoPE there); use --backend bridge"
        )
    theta = rp.get("rope_theta", _g(c, "rope_theta", default=10000.0))
    part = rp.get("partial_rotary_factor", _g(c, "partial_rotary_factor", default=None))
    if part is None and mt == "gpt_neox":
        part = _g(c, "rotary_pct", default=1.0)
    return float(theta), float(part if part is not None else 1.0), extra


def hooked_config(c: Any, where: str = "") -> dict[str, Any]:
    """``HookedTransformerConfig`` keyword arguments for an HF config of a supported family."""
    mt = c.model_type
    w = f"{where}: " if where else ""
    arch = (getattr(c, "architectures", None) or [None])[0]
    if mt in ("gpt2", "gptj"):
        d, h = c.n_embd, c.n_head
        out: dict[str, Any] = dict(
            n_layers=c.n_layer,
            d_model=d,
            n_heads=h,
            d_head=d // h,
            d_mlp=c.n_inner or 4 * d,
            n_ctx=c.n_positions,
            eps=c.layer_norm_epsilon,
            act_fn=c.activation_function,
            normalization_type="LN",
        )
        if mt == "gpt2":
            if getattr(c, "add_cross_attention", False):
                raise ModelLoadError(f"{w}architecture 'gpt2' with cross-attention is not supported; use --backend bridge")
            out.update(
                use_attn_scale=bool(getattr(c, "scale_attn_weights", True)),
                scale_attn_by_inverse_layer_idx=bool(getattr(c, "scale_attn_by_inverse_layer_idx", False)),
                original_architecture="GPT2LMHeadModel",
            )
        else:  # GPT-J: one LayerNorm for the parallel attention and MLP, rotary on adjacent pairs
            out.update(
                parallel_attn_mlp=True,
                positional_embedding_type="rotary",
                rotary_dim=c.rotary_dim or d // h,
                rotary_adjacent_pairs=True,
                rotary_base=10000,  # HF GPT-J's fixed base
                original_architecture="GPTJForCausalLM",
            )
    elif mt == "gpt_neox":
        theta, part, scaling = _rope(c, mt, w)
        dh = c.hidden_size // c.num_attention_heads
        out = dict(
            **scaling,
            n_layers=c.num_hidden_layers,
            d_model=c.hidden_size,
            n_heads=c.num_attention_heads,
            d_head=dh,
            d_mlp=c.intermediate_size,
            n_ctx=c.max_position_embeddings,
            eps=c.layer_norm_eps,
            act_fn=c.hidden_act,
            normalization_type="LN",
            parallel_attn_mlp=bool(getattr(c, "use_parallel_residual", True)),
            positional_embedding_type="rotary",
            rotary_dim=int(dh * part),  # HF: int(head_size * partial_rotary_factor)
            rotary_base=theta,
            original_architecture="GPTNeoXForCausalLM",
        )
    elif mt == "opt":
        out = dict(
            n_layers=c.num_hidden_layers,
            d_model=c.hidden_size,
            n_heads=c.num_attention_heads,
            d_head=c.hidden_size // c.num_attention_heads,
            d_mlp=c.ffn_dim,
            n_ctx=c.max_position_embeddings,
            eps=1e-5,  # nn.LayerNorm's default, which HF OPT uses
            act_fn=c.activation_function,
            normalization_type="LN",
            original_architecture="OPTForCausalLM",
        )
        if not getattr(c, "do_layer_norm_before", True) or getattr(c, "_remove_final_layer_norm", False):
            raise ModelLoadError(f"{w}architecture 'opt' without pre-LayerNorms is not supported on the hooked backend")
    elif mt in LLAMA_LIKE:
        theta, part, scaling = _rope(c, mt, w)
        h = c.num_attention_heads
        dh = _g(c, "head_dim", default=c.hidden_size // h)
        kv = _g(c, "num_key_value_heads", default=h)
        act = _g(c, "hidden_activation", "hidden_act") if mt.startswith("gemma") else c.hidden_act
        out = dict(
            **scaling,
            n_layers=c.num_hidden_layers,
            d_model=c.hidden_size,
            n_heads=h,
            d_head=dh,
            d_mlp=c.intermediate_size,
            n_ctx=c.max_position_embeddings,
            eps=c.rms_norm_eps,
            act_fn=act,
            normalization_type="RMS",
            final_rms=True,
            gated_mlp=True,
            positional_embedding_type="rotary",
            rotary_dim=int(dh * part),
            rotary_base=theta,
            rotary_adjacent_pairs=False,
            n_key_value_heads=kv if kv != h else None,
            original_architecture=arch or f"{type(c).__name__.removesuffix('Config')}ForCausalLM",
        )
        if mt == "qwen3":
            out["use_qk_norm"] = True
        if mt == "gemma2":
            out.update(use_normalization_before_and_after=True, attn_scale=math.sqrt(c.query_pre_attn_scalar))
            if c.attn_logit_softcapping:
                out["attn_scores_soft_cap"] = float(c.attn_logit_softcapping)
            if c.final_logit_softcapping:
                out["output_logits_soft_cap"] = float(c.final_logit_softcapping)
        window = getattr(c, "sliding_window", None)
        types = list(getattr(c, "layer_types", None) or [])
        if mt == "qwen2" and not getattr(c, "use_sliding_window", False):
            window = None
        if window is not None:
            local = [t == "sliding_attention" for t in types] if types else [True] * c.num_hidden_layers
            if any(local):
                out.update(use_local_attn=True, window_size=int(window), attn_types=["local" if x else "global" for x in local])
                if "rotary_scaling_factor" in out:  # TL scales global layers only; HF scales all
                    raise ModelLoadError(
                        f"{w}architecture {mt!r} with linear RoPE scaling and sliding-window layers is not supported "
                        "on the hooked backend; use --backend bridge"
                    )
    else:
        raise ModelLoadError(f"{w}architecture {mt!r} is not supported on the hooked backend; use --backend bridge")
    out.update(d_vocab=c.vocab_size, default_prepend_bos=True)
    return out


# ------------------------------------------------------------------------------------------
# Parameter links
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """HF parameter ``hf`` -> TL parameter ``tl`` through ``kind``: ``same``, ``T`` (transpose),
    ``bias:W_Q`` (a Q/K/V bias, in the layout of that matrix's HF weight), ``gemma_norm`` (1 + w),
    ``gemma_embed`` (w sqrt(d_model)) or ``opt_pos`` (rows 2:)."""

    hf: str
    tl: str
    kind: str = "same"


def links(family: Family, mt: str, n_layers: int, present: set[str] | None, gqa: bool) -> list[Link]:
    """Every non-maskable HF parameter of ``family`` and where it goes; ``present``: the HF names the
    checkpoint has (optional biases), None = all."""
    has = lambda n: present is None or n in present
    out: list[Link] = []
    add = lambda hf, tl, kind="same": out.append(Link(hf, tl, kind)) if has(hf) else None
    kv = lambda x: f"_b_{x}" if gqa else f"b_{x}"
    for l in range(n_layers):
        p, b = family.prefix.format(l=l), f"blocks.{l}."
        for m in ("W_Q", "W_K", "W_V"):  # biases of Q/K/V: in the layout of their (maybe fused) weight
            bias = family.hf_name(l, m).removesuffix("weight") + "bias"
            add(bias, b + "attn." + (kv(m[-1]) if m in KV_MATRICES else "b_Q"), f"bias:{m}")
        add(family.hf_name(l, "W_O").removesuffix("weight") + "bias", b + "attn.b_O")
        add(family.hf_name(l, "W_in").removesuffix("weight") + "bias", b + "mlp.b_in")
        add(family.hf_name(l, "W_out").removesuffix("weight") + "bias", b + "mlp.b_out")
        if mt == "gpt2":
            norms = [("ln_1", "ln1"), ("ln_2", "ln2")]
        elif mt == "gptj":
            norms = [("ln_1", "ln1"), ("ln_1", "ln2")]
        elif mt == "gpt_neox":
            norms = [("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2")]
        elif mt == "opt":
            norms = [("self_attn_layer_norm", "ln1"), ("final_layer_norm", "ln2")]
        elif mt == "gemma2":
            norms = [
                ("input_layernorm", "ln1"),
                ("post_attention_layernorm", "ln1_post"),
                ("pre_feedforward_layernorm", "ln2"),
                ("post_feedforward_layernorm", "ln2_post"),
            ]
        else:  # Llama-like
            norms = [("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2")]
        kind = "gemma_norm" if mt.startswith("gemma") else "same"
        for hn, tn in norms:
            add(p + hn + ".weight", b + tn + ".w", kind)
            add(p + hn + ".bias", b + tn + ".b")
        if mt == "qwen3":
            add(p + "self_attn.q_norm.weight", b + "attn.q_norm.w")
            add(p + "self_attn.k_norm.weight", b + "attn.k_norm.w")
    if mt in ("gpt2", "gptj"):
        add("transformer.wte.weight", "embed.W_E")
        add("transformer.wpe.weight", "pos_embed.W_pos")
        final = "transformer.ln_f."
    elif mt == "gpt_neox":
        add("gpt_neox.embed_in.weight", "embed.W_E")
        final = "gpt_neox.final_layer_norm."
    elif mt == "opt":
        add("model.decoder.embed_tokens.weight", "embed.W_E")
        add("model.decoder.embed_positions.weight", "pos_embed.W_pos", "opt_pos")
        final = "model.decoder.final_layer_norm."
    else:
        add("model.embed_tokens.weight", "embed.W_E", "gemma_embed" if mt.startswith("gemma") else "same")
        final = "model.norm."
    add(final + "weight", "ln_final.w", "gemma_norm" if mt.startswith("gemma") else "same")
    add(final + "bias", "ln_final.b")
    for head in ("lm_head", "embed_out"):  # GPT-NeoX's was embed_out before transformers 5.14
        add(head + ".weight", "unembed.W_U", "T")
        add(head + ".bias", "unembed.b_U")
    return out


def _bias_shape(family: Family, matrix: str, shape: ModelShape) -> tuple[ModelShape, int]:
    """The shape with d_model = 1 and the dim to unsqueeze: a Q/K/V bias read as a one-column weight."""
    return replace(shape, d_model=1), 0 if family.layout(matrix) == "gpt2_qkv" else 1


def _forward(link: Link, t: Tensor, family: Family, shape: ModelShape) -> Tensor:
    if link.kind == "T":
        return t.T
    if link.kind == "gemma_norm":
        return t + 1.0
    if link.kind == "gemma_embed":
        return t * torch.tensor(shape.d_model**0.5, dtype=t.dtype)
    if link.kind == "opt_pos":
        return t[2:]
    if link.kind.startswith("bias:"):
        m = link.kind[5:]
        s1, dim = _bias_shape(family, m, shape)
        return extract(family, m, s1, t.unsqueeze(dim))[:, 0, :]
    return t


def _inverse(link: Link, t: Tensor, shape: ModelShape, original: Tensor | None) -> Tensor:
    if link.kind == "T":
        return t.T
    if link.kind == "gemma_norm":
        return t - 1.0
    if link.kind == "gemma_embed":
        return t / torch.tensor(shape.d_model**0.5, dtype=t.dtype)
    if link.kind == "opt_pos":  # rows 0 and 1 never reach the forward pass
        head = original[:2] if original is not None else torch.zeros(2, t.shape[1], dtype=t.dtype, device=t.device)
        return torch.cat([head.to(t.device), t])
    return t


def hf_to_tl_state_dict(
    sd: dict[str, Tensor],
    family: Family,
    mt: str,
    shape: ModelShape,
    tl_params: dict[str, Tensor],
    hf_params: set[str] | None = None,
    where: str = "",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the HookedTransformer state dict, the HF tensors to keep for the way back) of an HF state
    dict. ``tl_params``: the model's parameters (names and shapes); the biases an HF checkpoint
    lacks (Llama's, GPT-J's attention) are zero. ``hf_params``: the HF model's parameter names;
    one the HookedTransformer has no place for (e.g. Llama's ``mlp_bias``: TL 3.9's gated MLP has
    no gate bias) is a ModelLoadError naming it."""
    gqa = shape.n_kv_heads is not None
    out: dict[str, Tensor] = {}
    originals: dict[str, Tensor] = {}
    used: set[str] = set()
    for l in range(shape.n_layers):
        for m in shape.matrices:
            tl = weight_name(l, m).replace(f"attn.{m}", f"attn._{m}") if gqa and m in KV_MATRICES else weight_name(l, m)
            out[tl] = extract(family, m, shape, sd[family.hf_name(l, m)])
            used.add(family.hf_name(l, m))
    all_links = links(family, mt, shape.n_layers, set(sd), gqa)
    used |= {k.hf for k in all_links}
    unplaced = sorted((hf_params or set()) - used)
    if unplaced:
        more = f" (and {len(unplaced) - 1} more)" if len(unplaced) > 1 else ""
        raise ModelLoadError(
            f"{where + ': ' if where else ''}architecture {mt!r} with parameter {unplaced[0]!r}{more} is not supported on "
            "the hooked backend (TransformerLens 3.9's HookedTransformer has no place for it); use --backend bridge"
        )
    for link in all_links:
        t = sd[link.hf]
        out.setdefault(link.tl, _forward(link, t, family, shape))
        tied = link.kind == "gemma_embed" and any(
            n in sd and sd[n].shape == t.shape and torch.equal(sd[n], t) for n in ("lm_head.weight",)
        )
        if link.kind in ("gemma_norm", "gemma_embed", "opt_pos") and not tied:  # a tied embedding is W_U.T
            originals[link.hf] = t.detach().clone()
    if "unembed.W_U" not in out:  # tied to the embedding without an lm_head entry
        emb = next(k for k in links(family, mt, 0, None, gqa) if k.tl == "embed.W_E")
        out["unembed.W_U"] = sd[emb.hf].T
    for k, p in tl_params.items():
        if k in out:
            if tuple(out[k].shape) != tuple(p.shape):
                raise ModelLoadError(
                    f"internal: {k} {tuple(out[k].shape)} from the HF checkpoint, expected {tuple(p.shape)} ({mt})"
                )
        elif k.split(".")[-1].startswith(("b_", "_b_")):
            out[k] = torch.zeros_like(p)
        else:
            raise ModelLoadError(f"internal: no HF tensor for the HookedTransformer parameter {k!r} ({mt})")
    unknown = set(out) - set(tl_params)
    if unknown:
        raise ModelLoadError(f"internal: HookedTransformer has no parameters {sorted(unknown)[:3]} ({mt})")
    return {k: v.detach().clone().to(tl_params[k].dtype) for k, v in out.items()}, originals


def tl_to_hf_state_dict(
    tl: Callable[[str], Tensor],
    canonical: Callable[[int, str], Tensor],
    family: Family,
    mt: str,
    shape: ModelShape,
    names: list[str] | None,
    originals: dict[str, Tensor],
) -> dict[str, Tensor]:
    """The HF state dict (``names``: the HF parameter names, tied ones included; None = every name
    the family can have that ``tl`` has) from TL parameters (``tl(name)``) and the canonical
    matrices (``canonical(layer, matrix)``)."""
    gqa = shape.n_kv_heads is not None
    present = set(names) if names is not None else None
    sd: dict[str, Tensor] = {}
    for l in range(shape.n_layers):
        for m in shape.matrices:
            name = family.hf_name(l, m)
            base = sd.get(name)
            if base is None:
                base = torch.zeros(hf_shape(family, m, shape))
            sd[name] = place(family, m, shape, base, canonical(l, m))
    for link in links(family, mt, shape.n_layers, present, gqa):
        try:
            t = tl(link.tl).detach()
        except AttributeError:
            continue
        if link.kind.startswith("bias:"):
            m = link.kind[5:]
            s1, dim = _bias_shape(family, m, shape)
            base = sd.get(link.hf)
            if base is None:
                base = torch.zeros(hf_shape(family, m, s1)).squeeze(dim)
            sd[link.hf] = place(family, m, s1, base.unsqueeze(dim), t[:, None, :]).squeeze(dim)
            continue
        if link.hf in sd:  # GPT-J's ln_2 copy of ln_1
            continue
        orig = originals.get(link.hf)
        if orig is not None and torch.equal(_forward(link, orig.to(t.device), family, shape), t):
            sd[link.hf] = orig
            continue
        if link.kind == "gemma_embed":  # a tied embedding is exactly the unembedding
            W_U = tl("unembed.W_U").detach().T
            if torch.equal(_forward(link, W_U, family, shape), t):
                sd[link.hf] = W_U
                continue
        sd[link.hf] = _inverse(link, t, shape, orig)
    if names is not None:
        missing = [n for n in names if n not in sd]
        if missing:
            raise ModelLoadError(f"internal: no HookedTransformer tensor for the HF parameters {missing[:3]} ({mt})")
        sd = {n: sd[n] for n in names}
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}
