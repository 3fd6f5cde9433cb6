"""HF state dicts <-> TransformerLens 3.9 ``HookedTransformer`` state dicts, UNPROCESSED, for every family of
:data:`kcs_lens.model.families.FAMILIES`.

Our own mapping (the facts per architecture read from TL 3.9's ``convert_hf_model_config`` and its
weight converters; the config is :mod:`kcs_lens.model.hooked_config`; no TL weight processing is run):

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

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from kcs_lens.errors import ModelLoadError
from kcs_lens.model.canonical import KV_MATRICES, ModelShape, weight_name
from kcs_lens.model.families import Family, extract, hf_shape, place


# ------------------------------------------------------------------------------------------
# Parameter links
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    """HF parameter ``hf`` -> TL parameter ``tl`` through ``kind``: ``same``, ``T`` (transpose),
    ``bias:W_Q`` (a Q/K/V bias, in the layout of that matrix's HF weight), ``norm_plus_one``
    (1 + w, Gemma), ``embed_scaled`` (w sqrt(d_model), Gemma) or ``pos_offset`` (OPT's rows 2:)."""

    hf: str
    tl: str
    kind: str = "same"


def links(family: Family, n_layers: int, present: set[str] | None, gqa: bool) -> list[Link]:
    """Every non-maskable HF parameter of ``family`` and where it goes; ``present``: the HF names the
    checkpoint has (optional biases), None = all."""
    has = lambda n: present is None or n in present
    out: list[Link] = []
    add = lambda hf, tl, kind="same": out.append(Link(hf, tl, kind)) if has(hf) else None
    kv = lambda x: f"_b_{x}" if gqa else f"b_{x}"
    norm_kind = "norm_plus_one" if family.norm_plus_one else "same"
    for l in range(n_layers):
        p, b = family.prefix.format(l=l), f"blocks.{l}."
        for m in ("W_Q", "W_K", "W_V"):  # biases of Q/K/V: in the layout of their (maybe fused) weight
            bias = family.hf_name(l, m).removesuffix("weight") + "bias"
            add(bias, b + "attn." + (kv(m[-1]) if m in KV_MATRICES else "b_Q"), f"bias:{m}")
        add(family.hf_name(l, "W_O").removesuffix("weight") + "bias", b + "attn.b_O")
        add(family.hf_name(l, "W_in").removesuffix("weight") + "bias", b + "mlp.b_in")
        add(family.hf_name(l, "W_out").removesuffix("weight") + "bias", b + "mlp.b_out")
        for hn, tn in family.block_norms:
            add(p + hn + ".weight", b + tn + ".w", norm_kind)
            add(p + hn + ".bias", b + tn + ".b")
        if family.qk_norm:
            add(p + "self_attn.q_norm.weight", b + "attn.q_norm.w")
            add(p + "self_attn.k_norm.weight", b + "attn.k_norm.w")
    add(family.embed, "embed.W_E", "embed_scaled" if family.embed_scaled else "same")
    if family.pos_embed is not None:
        add(family.pos_embed, "pos_embed.W_pos", "pos_offset" if family.pos_offset else "same")
    add(family.final_norm + "weight", "ln_final.w", norm_kind)
    add(family.final_norm + "bias", "ln_final.b")
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
    if link.kind == "norm_plus_one":
        return t + 1.0
    if link.kind == "embed_scaled":
        return t * torch.tensor(shape.d_model**0.5, dtype=t.dtype)
    if link.kind == "pos_offset":
        return t[family.pos_offset :]
    if link.kind.startswith("bias:"):
        m = link.kind[5:]
        s1, dim = _bias_shape(family, m, shape)
        return extract(family, m, s1, t.unsqueeze(dim))[:, 0, :]
    return t


def _inverse(link: Link, t: Tensor, family: Family, shape: ModelShape, original: Tensor | None) -> Tensor:
    if link.kind == "T":
        return t.T
    if link.kind == "norm_plus_one":
        return t - 1.0
    if link.kind == "embed_scaled":
        return t / torch.tensor(shape.d_model**0.5, dtype=t.dtype)
    if link.kind == "pos_offset":  # the first rows never reach the forward pass
        k = family.pos_offset
        head = original[:k] if original is not None else torch.zeros(k, t.shape[1], dtype=t.dtype, device=t.device)
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
    all_links = links(family, shape.n_layers, set(sd), gqa)
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
        tied = link.kind == "embed_scaled" and any(
            n in sd and sd[n].shape == t.shape and torch.equal(sd[n], t) for n in ("lm_head.weight",)
        )
        if link.kind in ("norm_plus_one", "embed_scaled", "pos_offset") and not tied:  # a tied embedding is W_U.T
            originals[link.hf] = t.detach().clone()
    if "unembed.W_U" not in out:  # tied to the embedding without an lm_head entry
        emb = next(k for k in links(family, 0, None, gqa) if k.tl == "embed.W_E")
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
    for link in links(family, shape.n_layers, present, gqa):
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
        if link.kind == "embed_scaled":  # a tied embedding is exactly the unembedding
            W_U = tl("unembed.W_U").detach().T
            if torch.equal(_forward(link, W_U, family, shape), t):
                sd[link.hf] = W_U
                continue
        sd[link.hf] = _inverse(link, t, family, shape, orig)
    if names is not None:
        missing = [n for n in names if n not in sd]
        if missing:
            raise ModelLoadError(f"internal: no HookedTransformer tensor for the HF parameters {missing[:3]} ({mt})")
        sd = {n: sd[n] for n in names}
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}
