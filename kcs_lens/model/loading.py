"""Loading models as :class:`~kcs_lens.model.lens.LensModel` with UNPROCESSED weights.

One entry point, :func:`load_model`, takes a model spec (an HF name, a local HF directory, the
bundled model's short name, or a model object the user already holds) and returns a LensModel
over either backend (:mod:`kcs_lens.model.lens`):

- ``bridge``: TransformerLens 4.x ``TransformerBridge`` (what a default install gets), or
- ``hooked``: TransformerLens 3.x ``HookedTransformer`` (what many notebooks hold).

Families: every HF ``model_type`` in :data:`kcs_lens.model.families.FAMILIES` loads on both backends
(``hooked`` through our own HF -> HookedTransformer mapping, :mod:`kcs_lens.model.hooked_config`, :mod:`kcs_lens.model.hooked_weights`; variants it
does not map, e.g. scaled RoPE, are refused there naming the architecture and ``--backend bridge``).
Anything else is refused with an error naming the architecture. Default: ``hooked`` for GPT-2 where
TransformerLens 3.x is installed, the bridge otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from kcs_lens.errors import ModelLoadError
from kcs_lens.model.backend_bridge import BridgeLensModel
from kcs_lens.model.backend_hooked import HookedLensModel, hooked_from_hf
from kcs_lens.model.families import FAMILIES, check_config
from kcs_lens.model.lens import Backend, LensModel

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "bundled" / "model"
# short name -> (model directory, how to rebuild it)
BUNDLED_MODELS: dict[str, tuple[Path, str]] = {
    "bundled": (BUNDLED_DIR, "python scripts/train_bundled.py"),
    "kcs-wordnet-tiny": (BUNDLED_DIR, "python scripts/train_bundled.py"),
    "bundled-llama": (
        Path(__file__).resolve().parents[1] / "bundled" / "llama" / "model",
        "python scripts/train_bundled.py --family llama",
    ),
}
BUNDLED_NAMES = tuple(BUNDLED_MODELS)
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


def _default_backend_for(model_type: str | None) -> Backend:
    """:func:`default_backend` for GPT-2; the bridge for every other family where it is installed (the
    hooked backend loads them too, with ``--backend hooked``: the default for them stays what it was)."""
    family = FAMILIES.get(model_type or "")
    if not (family is not None and family.hooked_default) and "bridge" in available_backends():
        return "bridge"
    return default_backend()


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
        hf = getattr(model, "original_model", None)
        if hf is None:
            return BridgeLensModel(model, tok, name, {"kind": "object", "class": cls_name})
        check_config(hf.config.model_type, hf.config.to_dict(), name)
        return BridgeLensModel(model, tok, name, {"kind": "object", "class": cls_name, "hf_config": _hf_config_dict(hf)})
    if cls_name == "HookedTransformer":
        c = model.cfg
        arch = getattr(c, "original_architecture", None)
        if arch not in (None, "GPT2LMHeadModel"):
            raise ModelLoadError(
                f"{name}: wrapping a HookedTransformer of architecture {arch!r} is not supported (its HF config, which "
                "export and the weights fingerprint need, is not in it); load the HF checkpoint with "
                "load_model(PATH_OR_NAME, backend='hooked') instead"
            )
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
    backend = backend or _default_backend_for(getattr(getattr(hf, "config", None), "model_type", None))
    if backend not in available_backends():
        raise ModelLoadError(
            f"backend {backend!r} is not available with the installed transformer_lens "
            f"(available: {', '.join(available_backends()) or 'none'})"
        )
    return from_hf(hf, tok, backend=backend, spec=spec_s, source=source, device=device)


def check_device(device: str | torch.device, option: str = "--device") -> torch.device:
    """``device`` as a torch.device, or a ModelLoadError naming ``option`` and saying why it cannot be used here."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"{option} {device!r}: not a torch device ({e})") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"{option} {device}: CUDA is not available (torch {torch.__version__} sees no GPU)")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ModelLoadError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"{option} {device}: MPS is not available")
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
    path, kind, model_type = local
    from transformers import AutoTokenizer

    try:
        with _no_weight_bar():
            hf = _causal_lm_class(model_type).from_pretrained(str(path))
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # the checks of _local_dir passed, the weights still do not load
        raise ModelLoadError(f"model {spec!r}: cannot load the weights in {path} ({_first_line(e)})") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelLoadError(f"model {spec!r}: cannot load the tokenizer in {path} ({_first_line(e)})") from None
    return hf, tok, {"kind": kind, "path": str(path.resolve()), "hf_config": hf.config.to_diff_dict()}


@contextlib.contextmanager
def _no_weight_bar() -> Iterator[None]:
    """transformers' "Loading weights" bar off while a local checkpoint loads (it would print on
    stderr in logs and before an ``error:`` line, and ``--no-progress`` cannot reach it)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _local_dir(spec: str) -> tuple[Path, str, str | None] | None:
    """The checked checkpoint directory of a bundled or local spec and its ``model_type``; None for a
    Hub name."""
    if spec in BUNDLED_MODELS:
        bdir, how = BUNDLED_MODELS[spec]
        if not (bdir / "config.json").exists():
            raise ModelLoadError(f"the bundled model {spec!r} is missing from {bdir}; rebuild it with `{how}`")
        path, kind = bdir, "bundled"
    elif os.path.exists(os.path.expanduser(spec)):
        path, kind = Path(os.path.expanduser(spec)), "path"
    elif spec in HUB_GPT2 or _HUB_ID.match(spec):
        return None
    else:
        raise ModelLoadError(
            f"model {spec!r}: no such directory, and not a Hugging Face model id. Use 'bundled', 'bundled-llama', "
            f"a local HF directory, an HF id (org/name), or one of {', '.join(HUB_GPT2)}"
        )
    if not path.is_dir():
        raise ModelLoadError(f"model {spec!r}: {path} is not a directory (expected an HF checkpoint directory)")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"model {spec!r}: {cfg_file} is missing (expected an HF checkpoint directory)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"model {spec!r}: {cfg_file}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"model {spec!r}: {cfg_file}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"model {spec!r}: {cfg_file}: expected a JSON object of settings, got {type(cfg).__name__}")
    check_config(cfg.get("model_type"), cfg, f"model {spec!r}")
    _check_hf_config(path, spec)
    if not any((path / f).exists() for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        raise ModelLoadError(f"model {spec!r}: {path} has no weights (model.safetensors or pytorch_model.bin)")
    _check_safetensors(path, spec)
    if not any((path / f).exists() for f in ("tokenizer.json", "vocab.json")):
        raise ModelLoadError(f"model {spec!r}: {path} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    return path, kind, cfg.get("model_type")


def _check_hf_config(path: Path, spec: str) -> None:
    """transformers' own checks of config.json (types of its fields), as one error naming the file."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers' validation errors have no common base class
        raise ModelLoadError(f"model {spec!r}: {path / 'config.json'}: {_first_line(e)}") from None


def _check_safetensors(path: Path, spec: str) -> None:
    """Every ``*.safetensors`` weights file has a readable header (a truncated or foreign file is named
    now, not as a SafetensorError from inside transformers)."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # SafetensorError, OSError
            raise ModelLoadError(
                f"model {spec!r}: {f} is not a readable safetensors file ({_first_line(e)}); truncated or damaged?"
            ) from None


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) if str(e) else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _causal_lm_class(model_type: str | None) -> Any:
    import transformers

    family = FAMILIES.get(model_type or "")
    return getattr(transformers, family.hf_class if family is not None else "AutoModelForCausalLM")


def _hf_config_dict(hf: Any) -> dict[str, Any]:
    """The HF config as stored in sources: the diff dict plus ``model_type`` (always present)."""
    return {**hf.config.to_diff_dict(), "model_type": hf.config.model_type}


def _load_hub(spec: str) -> tuple[nn.Module, Any, dict[str, Any]]:
    repo = HUB_GPT2.get(spec, spec)
    cfg = _hub_config(spec)
    from transformers import AutoTokenizer

    hf = _causal_lm_class(cfg.model_type).from_pretrained(repo)
    tok = AutoTokenizer.from_pretrained(repo)
    return hf, tok, {"kind": "hub", "repo": repo, "hf_config": hf.config.to_diff_dict()}


def _hub_config(spec: str) -> Any:
    """The HF config of a Hub model (checked to be a supported family), or a ModelLoadError saying
    how to get it."""
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
    check_config(cfg.model_type, cfg.to_dict(), f"model {spec!r}")
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
    """Build a LensModel from an HF causal LM of a supported family and its tokenizer (no weight
    processing)."""
    backend = backend or _default_backend_for(getattr(hf.config, "model_type", None))
    mt = getattr(hf.config, "model_type", None)
    family = check_config(mt, hf.config.to_dict(), f"model {spec!r}")
    source = dict(source or {"kind": "object"})
    source["hf_config"] = {**dict(source.get("hf_config") or hf.config.to_diff_dict()), "model_type": mt}
    hf = hf.to(device).eval()
    if backend == "bridge":
        name = family.bridge_name or str(source.get("path") or getattr(hf.config, "_name_or_path", "") or mt)
        try:
            bridge = _bridge_class().boot_transformers(name, hf_model=hf, tokenizer=tokenizer, device=str(device))
        except Exception as e:  # an architecture this TransformerLens has no adapter for
            raise ModelLoadError(
                f"model {spec!r}: TransformerBridge cannot load architecture {mt!r} "
                f"({', '.join(getattr(hf.config, 'architectures', None) or [type(hf).__name__])}): {type(e).__name__}: {e}"
            ) from e
        return BridgeLensModel(bridge, tokenizer, spec, source)
    model, originals = hooked_from_hf(hf, tokenizer, device, spec)
    lm = HookedLensModel(model, tokenizer, spec, source)
    lm.hf_originals = originals
    return lm
