"""Loading models as :class:`~kcs_lens.backends.LensModel` with UNPROCESSED weights.

One entry point, :func:`load_model`, takes a model spec (an HF name, a local HF directory, the
bundled model's short name, or a model object the user already holds) and returns a LensModel
over either backend (:mod:`kcs_lens.backends`):

- ``bridge``: TransformerLens 4.x ``TransformerBridge`` (what a default install gets), or
- ``hooked``: TransformerLens 3.x ``HookedTransformer`` (what many notebooks hold).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import einops
import torch
from torch import Tensor, nn

from kcs_lens.backends import Backend, BridgeLensModel, HookedLensModel, LensModel
from kcs_lens.errors import ModelLoadError

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


def wrap_model(model: Any, tokenizer: Any = None, spec: str | None = None) -> LensModel:
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
    backend: str | None = None,
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


def check_spec(spec: str) -> None:
    """Whether a model spec can be loaded here, checked without loading any weights (a ModelLoadError
    saying why not): the files of a local directory, a Hub model in the cache when offline."""
    if _local_dir(spec) is None:
        _hub_config(spec)


def _load_hf(spec: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    local = _local_dir(spec)
    if local is None:
        return _load_hub(spec)
    path, kind = local
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    return hf, tok, {"kind": kind, "path": str(path.resolve()), "hf_config": hf.config.to_diff_dict()}


def _local_dir(spec: str) -> tuple[Path, str] | None:
    """The checked checkpoint directory of a bundled or local spec, None for a Hub name."""
    if spec in BUNDLED_NAMES:
        if not (BUNDLED_DIR / "config.json").exists():
            raise ModelLoadError(
                f"the bundled model is missing from {BUNDLED_DIR}; rebuild it with `python scripts/train_bundled.py`"
            )
        path, kind = BUNDLED_DIR, "bundled"
    elif os.path.exists(os.path.expanduser(spec)):
        path, kind = Path(os.path.expanduser(spec)), "path"
    elif spec in HUB_GPT2 or _HUB_ID.match(spec):
        return None
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
    return path, kind


def _check_gpt2(spec: str, model_type: str | None) -> None:
    if model_type != "gpt2":
        raise ModelLoadError(
            f"model {spec!r}: architecture {model_type!r} is not supported yet; kcs-lens supports GPT-2-style "
            "models (model_type 'gpt2')"
        )


def _load_hub(spec: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    repo = HUB_GPT2.get(spec, spec)
    _hub_config(spec)
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(repo)
    tok = AutoTokenizer.from_pretrained(repo)
    return hf, tok, {"kind": "hub", "repo": repo, "hf_config": hf.config.to_diff_dict()}


def _hub_config(spec: str) -> Any:
    """The HF config of a Hub model (checked to be GPT-2), or a ModelLoadError saying how to get it."""
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
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(repo)
    except Exception as e:  # offline, unknown repo, network error
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"could not load model {spec!r} ({repo}) from the Hugging Face Hub: {why}. {how}") from e
    _check_gpt2(spec, cfg.model_type)
    return cfg


def from_hf(
    hf: Any,
    tokenizer: Any,
    *,
    backend: str | None = None,
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


def _hooked_from_hf(hf: Any, tokenizer: Any, device: str | torch.device) -> nn.Module:
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
