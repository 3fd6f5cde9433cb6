"""Model families: which HF architectures kcs-lens supports, and where each canonical matrix is in
the HF checkpoint.

One table, :data:`FAMILIES`, keyed by the HF ``model_type``: for every canonical matrix
(:mod:`kcs_lens.model.canonical`) the HF parameter that holds it and its layout, so that one mask entry
is exactly one entry of the HF weight (fused QKV weights included). Loading refuses a
``model_type`` that is not in the table with an error naming the architecture; export rebuilds the
HF state dict (fused weights too) from it.

Layouts (``h`` heads, or key/value heads for W_K / W_V; ``m`` d_model, ``d`` d_head, ``f`` d_mlp):

- ``gpt2_qkv``: GPT-2's Conv1D ``c_attn.weight`` ``[m, 3 (h d)]``, columns Q | K | V;
- ``neox_qkv``: GPT-NeoX's ``query_key_value.weight`` ``[(h 3 d), m]``: rows grouped per head,
  then q/k/v, then d_head;
- ``heads_in``: a Linear ``[(h d), m]`` (q_proj, k_proj, v_proj);
- ``heads_out_conv``: Conv1D ``[(h d), m]`` (GPT-2's ``attn.c_proj``);
- ``heads_out``: Linear ``[m, (h d)]`` (o_proj, dense, out_proj);
- ``conv``: Conv1D ``[in, out]``, the canonical layout itself (GPT-2's MLP);
- ``linear``: Linear ``[out, in]``, the transpose of the canonical layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import einops
import torch
from torch import Tensor

from kcs_lens.errors import ModelLoadError
from kcs_lens.model.canonical import ModelShape, parse_weight_name

QKV = ("W_Q", "W_K", "W_V")


@dataclass(frozen=True)
class Family:
    """One HF architecture: parameter names (``{l}`` = layer) and layouts of the canonical matrices,
    and the facts the loaders, backends and the HookedTransformer mapping read (one place each)."""

    name: str  # what the docs call it
    prefix: str  # of layer l's parameters
    sites: dict[str, tuple[str, str]]  # canonical matrix -> (HF parameter suffix, layout)
    hooked_kind: str  # which HookedTransformerConfig builder maps it (kcs_lens.model.hooked_config)
    block_norms: tuple[tuple[str, str], ...]  # per block: (HF norm module under prefix, TL norm module)
    embed: str  # HF token embedding parameter
    final_norm: str  # HF final norm module (with a trailing dot)
    pos_embed: str | None = None  # HF learned position embedding parameter (None: rotary)
    pos_offset: int = 0  # rows of pos_embed never used (OPT: 2)
    rms_norm: bool = False  # RMSNorm (no centring) rather than LayerNorm
    norm_plus_one: bool = False  # the RMSNorm scales by (1 + weight) (Gemma)
    embed_scaled: bool = False  # the embeddings are multiplied by sqrt(d_model) in the forward pass (Gemma)
    qk_norm: bool = False  # RMSNorm on queries and keys (Qwen 3)
    sandwich_norms: bool = False  # norms before and after attention and MLP (Gemma 2)
    act_fields: tuple[str, ...] = ("hidden_act",)  # HF config fields naming the activation, first present wins
    plain_blocks: bool = False  # GPT-2 blocks: learned positions, the blocks need nothing but the residual
    hf_class: str = "AutoModelForCausalLM"  # the transformers class that loads a checkpoint
    hooked_default: bool = False  # the hooked backend is its default where TransformerLens 3.x is installed
    bridge_name: str | None = None  # the name TransformerBridge boots it by (None: the checkpoint's path or name)
    tied: tuple[str, ...] = ()  # HF parameters that are always another's (GPT-2's lm_head is wte)
    # HF config fields an exported checkpoint's config.json takes from the model's shape (ModelShape attribute)
    shape_config: tuple[tuple[str, str], ...] = ()
    notes: str = ""

    def hf_name(self, layer: int, matrix: str) -> str:
        return self.prefix.format(l=layer) + self.sites[matrix][0]

    def layout(self, matrix: str) -> str:
        return self.sites[matrix][1]


_LLAMA_LIKE = {
    "W_Q": ("self_attn.q_proj.weight", "heads_in"),
    "W_K": ("self_attn.k_proj.weight", "heads_in"),
    "W_V": ("self_attn.v_proj.weight", "heads_in"),
    "W_O": ("self_attn.o_proj.weight", "heads_out"),
    "W_in": ("mlp.up_proj.weight", "linear"),
    "W_gate": ("mlp.gate_proj.weight", "linear"),
    "W_out": ("mlp.down_proj.weight", "linear"),
}

_LLAMA_NORMS = (("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2"))
_GEMMA2_NORMS = (
    ("input_layernorm", "ln1"),
    ("post_attention_layernorm", "ln1_post"),
    ("pre_feedforward_layernorm", "ln2"),
    ("post_feedforward_layernorm", "ln2_post"),
)


def _llama_like(name: str, **facts: Any) -> Family:
    """A Llama-like decoder: RMSNorm, gated MLP, rotary positions, ``model.layers``."""
    return Family(
        name,
        "model.layers.{l}.",
        _LLAMA_LIKE,
        hooked_kind="llama",
        block_norms=facts.pop("block_norms", _LLAMA_NORMS),
        embed="model.embed_tokens.weight",
        final_norm="model.norm.",
        rms_norm=True,
        **facts,
    )


_GEMMA = dict(norm_plus_one=True, embed_scaled=True, act_fields=("hidden_activation", "hidden_act"))

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "GPT-2",
        "transformer.h.{l}.",
        {
            "W_Q": ("attn.c_attn.weight", "gpt2_qkv"),
            "W_K": ("attn.c_attn.weight", "gpt2_qkv"),
            "W_V": ("attn.c_attn.weight", "gpt2_qkv"),
            "W_O": ("attn.c_proj.weight", "heads_out_conv"),
            "W_in": ("mlp.c_fc.weight", "conv"),
            "W_out": ("mlp.c_proj.weight", "conv"),
        },
        hooked_kind="gpt2",
        block_norms=(("ln_1", "ln1"), ("ln_2", "ln2")),
        embed="transformer.wte.weight",
        pos_embed="transformer.wpe.weight",
        final_norm="transformer.ln_f.",
        plain_blocks=True,
        hf_class="GPT2LMHeadModel",
        hooked_default=True,
        bridge_name="gpt2",
        tied=("lm_head.weight",),
        shape_config=(
            ("n_layer", "n_layers"),
            ("n_head", "n_heads"),
            ("n_embd", "d_model"),
            ("n_inner", "d_mlp"),
            ("vocab_size", "d_vocab"),
            ("n_positions", "n_ctx"),
        ),
    ),
    "gpt_neox": Family(
        "GPT-NeoX / Pythia",
        "gpt_neox.layers.{l}.",
        {
            "W_Q": ("attention.query_key_value.weight", "neox_qkv"),
            "W_K": ("attention.query_key_value.weight", "neox_qkv"),
            "W_V": ("attention.query_key_value.weight", "neox_qkv"),
            "W_O": ("attention.dense.weight", "heads_out"),
            "W_in": ("mlp.dense_h_to_4h.weight", "linear"),
            "W_out": ("mlp.dense_4h_to_h.weight", "linear"),
        },
        hooked_kind="gpt_neox",
        block_norms=_LLAMA_NORMS,
        embed="gpt_neox.embed_in.weight",
        final_norm="gpt_neox.final_layer_norm.",
    ),
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3", qk_norm=True),
    "gemma": _llama_like("Gemma", **_GEMMA),
    "gemma2": _llama_like("Gemma 2", block_norms=_GEMMA2_NORMS, sandwich_norms=True, **_GEMMA),
    "opt": Family(
        "OPT",
        "model.decoder.layers.{l}.",
        {
            "W_Q": ("self_attn.q_proj.weight", "heads_in"),
            "W_K": ("self_attn.k_proj.weight", "heads_in"),
            "W_V": ("self_attn.v_proj.weight", "heads_in"),
            "W_O": ("self_attn.out_proj.weight", "heads_out"),
            "W_in": ("fc1.weight", "linear"),
            "W_out": ("fc2.weight", "linear"),
        },
        hooked_kind="opt",
        block_norms=(("self_attn_layer_norm", "ln1"), ("final_layer_norm", "ln2")),
        embed="model.decoder.embed_tokens.weight",
        pos_embed="model.decoder.embed_positions.weight",
        pos_offset=2,
        final_norm="model.decoder.final_layer_norm.",
    ),
    "gptj": Family(
        "GPT-J",
        "transformer.h.{l}.",
        {
            "W_Q": ("attn.q_proj.weight", "heads_in"),
            "W_K": ("attn.k_proj.weight", "heads_in"),
            "W_V": ("attn.v_proj.weight", "heads_in"),
            "W_O": ("attn.out_proj.weight", "heads_out"),
            "W_in": ("mlp.fc_in.weight", "linear"),
            "W_out": ("mlp.fc_out.weight", "linear"),
        },
        hooked_kind="gpt2",
        block_norms=(("ln_1", "ln1"), ("ln_1", "ln2")),  # one LayerNorm for the parallel attention and MLP
        embed="transformer.wte.weight",
        pos_embed="transformer.wpe.weight",
        final_norm="transformer.ln_f.",
    ),
}


def family_of(model_type: str | None, where: str = "") -> Family:
    """The :class:`Family` of an HF ``model_type``, or a ModelLoadError naming the architecture."""
    fam = FAMILIES.get(model_type or "")
    if fam is None:
        raise ModelLoadError(
            f"{where + ': ' if where else ''}architecture {model_type!r} is not supported; kcs-lens supports "
            f"{', '.join(sorted(FAMILIES))} (docs/families.md)"
        )
    return fam


def check_config(model_type: str | None, cfg: dict[str, Any], where: str = "") -> Family:
    """:func:`family_of` plus the checks of variants the table does not cover (said by name)."""
    fam = family_of(model_type, where)
    w = where + ": " if where else ""
    if model_type == "opt":
        proj = cfg.get("word_embed_proj_dim")
        if proj is not None and proj != cfg.get("hidden_size"):
            raise ModelLoadError(
                f"{w}architecture 'opt' with word_embed_proj_dim {proj} != hidden_size {cfg.get('hidden_size')} "
                "(OPT-350m's project_in/project_out) is not supported"
            )
        if cfg.get("do_layer_norm_before") is False:
            raise ModelLoadError(
                f"{w}architecture 'opt' with post-LayerNorm blocks (do_layer_norm_before=false, OPT-350m) is not supported"
            )
    return fam


# ------------------------------------------------------------------------------------------
# Canonical <-> HF layout
# ------------------------------------------------------------------------------------------
def hf_shape(family: Family, matrix: str, shape: ModelShape) -> tuple[int, ...]:
    """Shape of the HF parameter that holds ``matrix``."""
    m, d, f, h, kv = shape.d_model, shape.d_head, shape.d_mlp, shape.n_heads, shape.kv_heads
    lay = family.layout(matrix)
    if lay == "gpt2_qkv":
        return (m, 3 * h * d)
    if lay == "neox_qkv":
        return (3 * h * d, m)
    if lay == "heads_in":
        return ((kv if matrix in ("W_K", "W_V") else h) * d, m)
    if lay == "heads_out_conv":
        return (h * d, m)
    if lay == "heads_out":
        return (m, h * d)
    out = {"W_in": (m, f), "W_gate": (m, f), "W_out": (f, m)}[matrix]
    return out if lay == "conv" else out[::-1]


def place(family: Family, matrix: str, shape: ModelShape, hf: Tensor, canon: Tensor) -> Tensor:
    """``hf`` (the HF parameter of ``matrix``) with ``matrix``'s entries replaced by ``canon``
    (canonical layout); a new tensor. Fused parameters keep the other matrices' entries."""
    lay = family.layout(matrix)
    out = hf.clone()
    if lay == "gpt2_qkv":
        i = QKV.index(matrix) * shape.n_heads * shape.d_head
        out[:, i : i + shape.n_heads * shape.d_head] = einops.rearrange(canon, "h m d -> m (h d)")
    elif lay == "neox_qkv":
        v = out.view(shape.n_heads, 3, shape.d_head, shape.d_model)
        v[:, QKV.index(matrix)] = einops.rearrange(canon, "h m d -> h d m")
    elif lay == "heads_in":
        out = einops.rearrange(canon, "h m d -> (h d) m").to(hf.dtype)
    elif lay == "heads_out_conv":
        out = einops.rearrange(canon, "h d m -> (h d) m").to(hf.dtype)
    elif lay == "heads_out":
        out = einops.rearrange(canon, "h d m -> m (h d)").to(hf.dtype)
    elif lay == "conv":
        out = canon.to(hf.dtype)
    else:
        out = canon.T.to(hf.dtype)
    return out.contiguous()


def extract(family: Family, matrix: str, shape: ModelShape, hf: Tensor) -> Tensor:
    """``matrix`` in the canonical layout, read from its HF parameter ``hf``."""
    lay = family.layout(matrix)
    h = shape.kv_heads if matrix in ("W_K", "W_V") else shape.n_heads
    if lay == "gpt2_qkv":
        i = QKV.index(matrix) * shape.n_heads * shape.d_head
        return einops.rearrange(hf[:, i : i + shape.n_heads * shape.d_head], "m (h d) -> h m d", h=h)
    if lay == "neox_qkv":
        v = hf.view(shape.n_heads, 3, shape.d_head, shape.d_model)
        return einops.rearrange(v[:, QKV.index(matrix)], "h d m -> h m d")
    if lay == "heads_in":
        return einops.rearrange(hf, "(h d) m -> h m d", h=h)
    if lay == "heads_out_conv":
        return einops.rearrange(hf, "(h d) m -> h d m", h=h)
    if lay == "heads_out":
        return einops.rearrange(hf, "m (h d) -> h d m", h=h)
    return hf if lay == "conv" else hf.T


def hf_multipliers(family: Family, shape: ModelShape, keep: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per HF parameter name, the 0/1 multiplier built from canonical-layout ``keep`` tensors
    (``blocks.L.attn.W_Q`` -> values); parameters holding no masked matrix are absent."""
    out: dict[str, Tensor] = {}
    for n, k in keep.items():
        layer, matrix = parse_weight_name(n)
        name = family.hf_name(layer, matrix)
        base = out.get(name)
        if base is None:
            base = torch.ones(hf_shape(family, matrix, shape))
        out[name] = place(family, matrix, shape, base, k.float())
    return out
