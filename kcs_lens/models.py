"""Loading GPT-2-style models as hooked TransformerLens models with UNPROCESSED weights.

One entry point, :func:`load_model`, takes a model spec (an HF name, a local HF directory, the
bundled model's short name, or a model object the user already holds) and returns a
:class:`LensModel`: a thin, backend-neutral handle over either

- ``bridge``: TransformerLens 4.x ``TransformerBridge`` (what a default install gets), or
- ``hooked``: TransformerLens 3.x ``HookedTransformer`` (what many notebooks hold).

Both expose the maskable matrices under canonical TL names and layout
(``blocks.{l}.attn.W_Q`` [n_heads, d_model, d_head], ``W_K``, ``W_V``, ``W_O`` [n_heads, d_head,
d_model], ``blocks.{l}.mlp.W_in`` [d_model, d_mlp], ``W_out`` [d_mlp, d_model]) through
:class:`WeightSite`, so a mask saved from one backend applies on the other. No TL weight
processing (fold_ln, centring, value-bias folding) is ever run: a zeroed entry must mean a zeroed
entry of the HF GPT-2 weight.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

Backend = Literal["bridge", "hooked"]
MATRICES: tuple[str, ...] = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out")
ATTN_MATRICES = ("W_Q", "W_K", "W_V", "W_O")

BUNDLED_NAMES = ("bundled", "kcs-wordnet-tiny")
BUNDLED_DIR = Path(__file__).parent / "bundled" / "model"
HUB_GPT2 = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded; the message names the spec and what to do."""


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int


def weight_name(layer: int, matrix: str) -> str:
    """Canonical TransformerLens name of a maskable matrix, e.g. ``blocks.6.attn.W_Q``."""
    if matrix not in MATRICES:
        raise ValueError(f"unknown matrix {matrix!r}; expected one of {', '.join(MATRICES)}")
    return f"blocks.{layer}.{'attn' if matrix in ATTN_MATRICES else 'mlp'}.{matrix}"


def parse_weight_name(name: str) -> tuple[int, str]:
    m = re.fullmatch(r"blocks\.(\d+)\.(attn|mlp)\.(W_Q|W_K|W_V|W_O|W_in|W_out)", name)
    if not m:
        raise ValueError(f"not a canonical maskable weight name: {name!r}")
    return int(m.group(1)), m.group(3)


def canonical_shape(shape: ModelShape, matrix: str) -> tuple[int, ...]:
    h, m, d, f = shape.n_heads, shape.d_model, shape.d_head, shape.d_mlp
    return {"W_Q": (h, m, d), "W_K": (h, m, d), "W_V": (h, m, d), "W_O": (h, d, m), "W_in": (m, f), "W_out": (f, m)}[
        matrix
    ]


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
        p = getattr(self.module, "parametrizations", None)
        if p is not None and self.attr in p:
            return p[self.attr].original
        return getattr(self.module, self.attr)

    def canonical_weight(self) -> Tensor:
        return self.from_native(self.native_weight().detach())


class LensModel:
    """A hooked TL model (``.model``) plus tokenizer, shape and canonical weight access."""

    backend: Backend

    def __init__(self, model: nn.Module, tokenizer: Any, spec: str, source: dict[str, Any]):
        self.model = model
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
        raise NotImplementedError

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


# ------------------------------------------------------------------------------------------
# TransformerLens 4.x: TransformerBridge over the native HF GPT-2 modules
# ------------------------------------------------------------------------------------------
class BridgeLensModel(LensModel):
    backend: Backend = "bridge"

    @property
    def shape(self) -> ModelShape:
        c = self.model.cfg
        return ModelShape(c.n_layers, c.n_heads, c.d_model, c.d_head, c.d_mlp, c.d_vocab, c.n_ctx)

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
            sd[p + "attn.c_attn.weight"] = torch.cat([self._param(m, "weight").T for m in qkv], dim=1)
            sd[p + "attn.c_attn.bias"] = torch.cat([m.bias for m in qkv])
            sd[p + "attn.c_proj.weight"] = self._param(blk.attn.o.original_component, "weight")
            sd[p + "attn.c_proj.bias"] = blk.attn.o.original_component.bias
            sd[p + "ln_2.weight"] = blk.ln2.original_component.weight
            sd[p + "ln_2.bias"] = blk.ln2.original_component.bias
            for hf_name, attr in (("c_fc", "in"), ("c_proj", "out")):
                conv = getattr(blk.mlp, attr).original_component
                sd[p + f"mlp.{hf_name}.weight"] = self._param(conv, "weight")
                sd[p + f"mlp.{hf_name}.bias"] = conv.bias
        sd["lm_head.weight"] = b.unembed.original_component.weight
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}

    @staticmethod
    def _param(module: nn.Module, attr: str) -> Tensor:
        p = getattr(module, "parametrizations", None)
        return p[attr].original if p is not None and attr in p else getattr(module, attr)


# ------------------------------------------------------------------------------------------
# TransformerLens 3.x: HookedTransformer with TL-native parameters
# ------------------------------------------------------------------------------------------
class HookedLensModel(LensModel):
    backend: Backend = "hooked"

    @property
    def shape(self) -> ModelShape:
        c = self.model.cfg
        return ModelShape(c.n_layers, c.n_heads, c.d_model, c.d_head, c.d_mlp, c.d_vocab, c.n_ctx)

    def site(self, name: str) -> WeightSite:
        layer, matrix = parse_weight_name(name)
        blk = self.model.blocks[layer]
        module = blk.attn if matrix in ATTN_MATRICES else blk.mlp
        ident = lambda t: t
        return WeightSite(name, module, matrix, to_native=ident, from_native=ident)

    def hf_state_dict(self) -> dict[str, Tensor]:
        m, s = self.model, self.shape
        P = lambda mod, attr: HookedLensModel._param(mod, attr).detach()
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

    _param = staticmethod(BridgeLensModel._param)


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------
def _bridge_class():
    try:
        from transformer_lens import TransformerBridge
    except ImportError:  # TransformerLens 3.9 ships it one level down
        from transformer_lens.model_bridge import TransformerBridge
    return TransformerBridge


def available_backends() -> list[Backend]:
    out: list[Backend] = []
    try:
        _bridge_class()
        out.append("bridge")
    except ImportError:
        pass
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transformer_lens import HookedTransformer  # noqa: F401
        out.append("hooked")
    except ImportError:
        pass
    return out


def default_backend() -> Backend:
    """``hooked`` where TransformerLens 3.x provides HookedTransformer, else ``bridge`` (4.x)."""
    av = available_backends()
    if not av:
        raise ModelLoadError("transformer_lens provides neither TransformerBridge nor HookedTransformer")
    return "hooked" if "hooked" in av else "bridge"


def wrap_model(model: nn.Module, tokenizer: Any = None, spec: str | None = None) -> LensModel:
    """Wrap a ``HookedTransformer`` or ``TransformerBridge`` the user already holds.

    The model must carry unprocessed weights (e.g. ``HookedTransformer.from_pretrained_no_processing``);
    a model with folded LayerNorms is refused because masks would not mean HF weights.
    """
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise ModelLoadError("the model object has no tokenizer; pass tokenizer=...")
    name = spec or getattr(getattr(model, "cfg", None), "model_name", None) or type(model).__name__
    cls_name = type(model).__name__
    if cls_name == "TransformerBridge":
        if getattr(model, "compatibility_mode", False) or getattr(model.cfg, "layer_norm_folding", False):
            raise ModelLoadError(
                f"{name}: this TransformerBridge has processed weights (compatibility mode); "
                "kcs-lens masks unprocessed weights. Boot a fresh bridge without enable_compatibility_mode()."
            )
        return BridgeLensModel(model, tok, name, {"kind": "object", "class": cls_name})
    if cls_name == "HookedTransformer":
        c = model.cfg
        if getattr(c, "normalization_type", "LN") != "LN" or getattr(model, "_kcs_processed", False):
            raise ModelLoadError(
                f"{name}: this HookedTransformer has processed weights (normalization_type="
                f"{c.normalization_type!r}); load it with HookedTransformer.from_pretrained_no_processing."
            )
        return HookedLensModel(model, tok, name, {"kind": "object", "class": cls_name})
    raise ModelLoadError(f"cannot wrap a {cls_name}: expected a TransformerBridge or a HookedTransformer")


def load_model(
    spec: "str | os.PathLike[str] | LensModel | nn.Module" = "bundled",
    *,
    backend: Backend | None = None,
    device: str | torch.device = "cpu",
    tokenizer: Any = None,
) -> LensModel:
    """Load a model spec as a :class:`LensModel` with unprocessed weights.

    ``spec``: ``"bundled"`` (the project's small WordNet model), a local HF GPT-2 directory, an HF
    hub name (``gpt2``, ``gpt2-medium``, ``openai-community/gpt2-large``, ...), or a
    ``HookedTransformer`` / ``TransformerBridge`` / ``LensModel`` object.
    """
    if isinstance(spec, LensModel):
        return spec
    if isinstance(spec, nn.Module):
        return wrap_model(spec, tokenizer)
    spec_s = str(spec)
    if backend is not None and backend not in ("bridge", "hooked"):
        raise ModelLoadError(f"backend {backend!r}: expected 'bridge' (TransformerLens 4.x) or 'hooked' (3.x)")
    check_device(device)
    hf, tok, source = _load_hf(spec_s)  # first: a bad spec fails before the TL import cost
    backend = backend or default_backend()
    if backend not in available_backends():
        raise ModelLoadError(
            f"backend {backend!r} is not available with the installed transformer_lens "
            f"(available: {', '.join(available_backends()) or 'none'})"
        )
    return from_hf(hf, tok, backend=backend, spec=spec_s, source=source, device=device)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, or a ModelLoadError saying why it cannot be used here."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"--device {device!r}: not a torch device ({e})") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available (torch {torch.__version__} sees no GPU)")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ModelLoadError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"--device {device}: MPS is not available")
    return d


def _load_hf(spec: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    if spec in BUNDLED_NAMES:
        if not (BUNDLED_DIR / "config.json").exists():
            raise ModelLoadError(
                f"the bundled model is missing from {BUNDLED_DIR}; rebuild it with `python scripts/train_bundled.py`"
            )
        path, kind = BUNDLED_DIR, "bundled"
    elif os.path.exists(os.path.expanduser(spec)):
        path, kind = Path(os.path.expanduser(spec)), "path"
    elif spec in HUB_GPT2 or _HUB_ID.match(spec):
        return _load_hub(spec)
    else:
        raise ModelLoadError(
            f"model {spec!r}: no such directory, and not a Hugging Face model id. Use 'bundled', a local "
            f"HF GPT-2 directory, or one of {', '.join(HUB_GPT2)}"
        )
    if not path.is_dir():
        raise ModelLoadError(f"model {spec!r}: {path} is not a directory (expected an HF checkpoint directory)")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"model {spec!r}: {cfg_file} is missing (expected an HF checkpoint directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"model {spec!r}: {cfg_file} is not valid JSON ({e})") from e
    _check_gpt2(spec, cfg.get("model_type"))
    if not any((path / f).exists() for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        raise ModelLoadError(f"model {spec!r}: {path} has no weights (model.safetensors or pytorch_model.bin)")
    if not any((path / f).exists() for f in ("tokenizer.json", "vocab.json")):
        raise ModelLoadError(f"model {spec!r}: {path} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    return hf, tok, {"kind": kind, "path": str(path.resolve()), "hf_config": hf.config.to_diff_dict()}


def _check_gpt2(spec: str, model_type: str | None) -> None:
    if model_type != "gpt2":
        raise ModelLoadError(
            f"model {spec!r}: architecture {model_type!r} is not supported yet; kcs-lens supports GPT-2-style "
            "models (model_type 'gpt2')"
        )


def _load_hub(spec: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    repo = HUB_GPT2.get(spec, spec)
    how = (
        f"Connect to the Hugging Face Hub (unset HF_HUB_OFFLINE), or download it elsewhere with "
        f"`hf download {repo} --local-dir DIR` (older huggingface_hub: `huggingface-cli download`) and pass the directory as --model DIR."
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:  # answer at once instead of going through transformers' retries
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(repo, "config.json"), str):
            raise ModelLoadError(
                f"could not load model {spec!r} ({repo}) from the Hugging Face Hub: HF_HUB_OFFLINE is set and it "
                f"is not in the local cache. {how}"
            )
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    try:
        cfg = AutoConfig.from_pretrained(repo)
    except Exception as e:  # offline, unknown repo, network error
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"could not load model {spec!r} ({repo}) from the Hugging Face Hub: {why}. {how}") from e
    _check_gpt2(spec, cfg.model_type)
    hf = GPT2LMHeadModel.from_pretrained(repo)
    tok = AutoTokenizer.from_pretrained(repo)
    return hf, tok, {"kind": "hub", "repo": repo, "hf_config": hf.config.to_diff_dict()}


def from_hf(
    hf: nn.Module,
    tokenizer: Any,
    *,
    backend: Backend | None = None,
    spec: str = "custom",
    source: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> LensModel:
    """Build a LensModel from an HF ``GPT2LMHeadModel`` and its tokenizer (no weight processing)."""
    backend = backend or default_backend()
    source = source or {"kind": "object", "hf_config": hf.config.to_diff_dict()}
    _check_gpt2(spec, getattr(hf.config, "model_type", None))
    hf = hf.to(device).eval()
    if backend == "bridge":
        bridge = _bridge_class().boot_transformers("gpt2", hf_model=hf, tokenizer=tokenizer, device=str(device))
        return BridgeLensModel(bridge, tokenizer, spec, source)
    return HookedLensModel(_hooked_from_hf(hf, tokenizer, device), tokenizer, spec, source)


def _hooked_from_hf(hf: nn.Module, tokenizer: Any, device: str | torch.device) -> nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        act_fn="gelu_new",
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=True,
        device=str(device),
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_state_dict(hf_to_tl_state_dict(hf.state_dict(), cfg), strict=False)
    # TL 3.x's HookedTransformer.to prints "Moving model to device" on stdout, which would
    # corrupt `--json` output; keep stdout for results.
    return model.to(device, print_details=False).eval()


def hf_to_tl_state_dict(sd: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """HF GPT-2 state dict -> HookedTransformer (unprocessed) state dict."""
    h = cfg.n_heads
    out = {
        "embed.W_E": sd["transformer.wte.weight"],
        "pos_embed.W_pos": sd["transformer.wpe.weight"],
        "ln_final.w": sd["transformer.ln_f.weight"],
        "ln_final.b": sd["transformer.ln_f.bias"],
        "unembed.W_U": sd.get("lm_head.weight", sd["transformer.wte.weight"]).T,
        "unembed.b_U": torch.zeros(cfg.d_vocab, dtype=sd["transformer.wte.weight"].dtype),
    }
    for l in range(cfg.n_layers):
        p, b = f"transformer.h.{l}.", f"blocks.{l}."
        W = sd[p + "attn.c_attn.weight"]
        B = sd[p + "attn.c_attn.bias"]
        for i, x in enumerate("QKV"):
            w = W[:, i * cfg.d_model : (i + 1) * cfg.d_model]
            out[b + f"attn.W_{x}"] = einops.rearrange(w, "m (h d) -> h m d", h=h)
            out[b + f"attn.b_{x}"] = einops.rearrange(B[i * cfg.d_model : (i + 1) * cfg.d_model], "(h d) -> h d", h=h)
        out[b + "attn.W_O"] = einops.rearrange(sd[p + "attn.c_proj.weight"], "(h d) m -> h d m", h=h)
        out[b + "attn.b_O"] = sd[p + "attn.c_proj.bias"]
        out[b + "ln1.w"], out[b + "ln1.b"] = sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]
        out[b + "ln2.w"], out[b + "ln2.b"] = sd[p + "ln_2.weight"], sd[p + "ln_2.bias"]
        out[b + "mlp.W_in"], out[b + "mlp.b_in"] = sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]
        out[b + "mlp.W_out"], out[b + "mlp.b_out"] = sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"]
    return {k: v.clone() for k, v in out.items()}
