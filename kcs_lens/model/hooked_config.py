"""HF config -> TransformerLens 3.9 ``HookedTransformerConfig`` for every family of
:data:`kcs_lens.model.families.FAMILIES` (the ``hooked`` backend; the weights are
:mod:`kcs_lens.model.hooked_weights`).

Our own mapping (the facts per architecture read from TL 3.9's ``convert_hf_model_config``):
rotary dims and base, parallel attention + MLP, grouped-query attention, gated MLP, RMSNorm,
Gemma 2's pre/post norms, soft-caps, sliding windows and query scale, Qwen 3's q/k norms, GPT-J's
adjacent-pair rotary; or a ModelLoadError naming what TL 3.9 cannot represent.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from kcs_lens.errors import ModelLoadError
from kcs_lens.model.families import FAMILIES


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
    if part is None and FAMILIES[mt].hooked_kind == "gpt_neox":
        part = _g(c, "rotary_pct", default=1.0)
    return float(theta), float(part if part is not None else 1.0), extra


def _gpt2(c: Any, w: str) -> dict[str, Any]:
    """GPT-2 and GPT-J (GPT-J: one LayerNorm for the parallel attention and MLP, rotary on adjacent pairs)."""
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
    if FAMILIES[c.model_type].plain_blocks:  # GPT-2 (else GPT-J)
        if getattr(c, "add_cross_attention", False):
            raise ModelLoadError(f"{w}architecture 'gpt2' with cross-attention is not supported; use --backend bridge")
        out.update(
            use_attn_scale=bool(getattr(c, "scale_attn_weights", True)),
            scale_attn_by_inverse_layer_idx=bool(getattr(c, "scale_attn_by_inverse_layer_idx", False)),
            original_architecture="GPT2LMHeadModel",
        )
    else:
        out.update(
            parallel_attn_mlp=True,
            positional_embedding_type="rotary",
            rotary_dim=c.rotary_dim or d // h,
            rotary_adjacent_pairs=True,
            rotary_base=10000,  # HF GPT-J's fixed base
            original_architecture="GPTJForCausalLM",
        )
    return out


def _neox(c: Any, w: str) -> dict[str, Any]:
    theta, part, scaling = _rope(c, c.model_type, w)
    dh = c.hidden_size // c.num_attention_heads
    return dict(
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


def _opt(c: Any, w: str) -> dict[str, Any]:
    if not getattr(c, "do_layer_norm_before", True) or getattr(c, "_remove_final_layer_norm", False):
        raise ModelLoadError(f"{w}architecture 'opt' without pre-LayerNorms is not supported on the hooked backend")
    return dict(
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


def _llama(c: Any, w: str) -> dict[str, Any]:
    """Llama-like decoders (Llama, Mistral, Qwen 2/3, Gemma 1/2): RMSNorm, gated MLP, rotary, GQA."""
    mt, fam = c.model_type, FAMILIES[c.model_type]
    theta, part, scaling = _rope(c, mt, w)
    h = c.num_attention_heads
    dh = _g(c, "head_dim", default=c.hidden_size // h)
    kv = _g(c, "num_key_value_heads", default=h)
    arch = (getattr(c, "architectures", None) or [None])[0]
    out = dict(
        **scaling,
        n_layers=c.num_hidden_layers,
        d_model=c.hidden_size,
        n_heads=h,
        d_head=dh,
        d_mlp=c.intermediate_size,
        n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps,
        act_fn=_g(c, *fam.act_fields),
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
    if fam.qk_norm:
        out["use_qk_norm"] = True
    if fam.sandwich_norms:  # Gemma 2: norms before and after attention and MLP, soft-caps, query scale
        out.update(use_normalization_before_and_after=True, attn_scale=math.sqrt(c.query_pre_attn_scalar))
        if c.attn_logit_softcapping:
            out["attn_scores_soft_cap"] = float(c.attn_logit_softcapping)
        if c.final_logit_softcapping:
            out["output_logits_soft_cap"] = float(c.final_logit_softcapping)
    out.update(_sliding_window(c, w, "rotary_scaling_factor" in out))
    return out


def _sliding_window(c: Any, w: str, linear_rope: bool) -> dict[str, Any]:
    """The local-attention fields of a decoder with sliding-window layers ({} without)."""
    window = getattr(c, "sliding_window", None)
    types = list(getattr(c, "layer_types", None) or [])
    if c.model_type == "qwen2" and not getattr(c, "use_sliding_window", False):
        window = None
    if window is None:
        return {}
    local = [t == "sliding_attention" for t in types] if types else [True] * c.num_hidden_layers
    if not any(local):
        return {}
    if linear_rope:  # TL scales global layers only; HF scales all
        raise ModelLoadError(
            f"{w}architecture {c.model_type!r} with linear RoPE scaling and sliding-window layers is not supported "
            "on the hooked backend; use --backend bridge"
        )
    return dict(use_local_attn=True, window_size=int(window), attn_types=["local" if x else "global" for x in local])


# the HookedTransformerConfig builder of each Family.hooked_kind
_BUILDERS: dict[str, Callable[[Any, str], dict[str, Any]]] = {"gpt2": _gpt2, "gpt_neox": _neox, "opt": _opt, "llama": _llama}


def hooked_config(c: Any, where: str = "") -> dict[str, Any]:
    """``HookedTransformerConfig`` keyword arguments for an HF config of a supported family."""
    w = f"{where}: " if where else ""
    fam = FAMILIES.get(c.model_type)
    if fam is None:
        raise ModelLoadError(f"{w}architecture {c.model_type!r} is not supported on the hooked backend; use --backend bridge")
    out = _BUILDERS[fam.hooked_kind](c, w)
    out.update(d_vocab=c.vocab_size, default_prepend_bos=True)
    return out
