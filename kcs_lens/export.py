"""Export the remaining model (or the subnetwork alone) as a standard Hugging Face checkpoint.

The canonical masks (TransformerLens layout, ``kcs_lens.models``) are converted to the HF GPT-2
Conv1D layout and multiplied into :meth:`LensModel.hf_state_dict`:

- ``attn.c_attn.weight`` [d_model, 3 d_model]: columns Q | K | V, each ``(h d)``; canonical W_Q
  [h, m, d] -> ``m (h d)``;
- ``attn.c_proj.weight`` [(h d), m] <- W_O [h, d, m]; ``mlp.c_fc.weight`` [m, f] = W_in;
  ``mlp.c_proj.weight`` [f, m] = W_out.

The directory (config.json, model.safetensors, tokenizer files, ``kcs_lens_export.json``) is built
in a temporary folder beside the target and renamed into place; an existing target is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from kcs_lens.backends import LensModel
from kcs_lens.canonical import canonical_shape, parse_weight_name
from kcs_lens.errors import ExportError
from kcs_lens.evaluation import check_model
from kcs_lens.models import load_model
from kcs_lens.runs import load_run
from kcs_lens.subnetwork import Subnetwork

Remove = Literal["subnetwork", "complement"]
HF_NAMES = {"W_O": "attn.c_proj.weight", "W_in": "mlp.c_fc.weight", "W_out": "mlp.c_proj.weight"}
QKV = ("W_Q", "W_K", "W_V")


def hf_keep_multipliers(sub: Subnetwork, remove: Remove = "subnetwork") -> dict[str, Float[Tensor, "..."]]:
    """Per HF weight name, the 0/1 multiplier that removes the subnetwork (``remove="subnetwork"``:
    theta * (1 - m)) or everything else in the masked matrices (``"complement"``: theta * m)."""
    if remove not in ("subnetwork", "complement"):
        raise ExportError(f"--remove {remove!r}: expected 'subnetwork' or 'complement'")
    s = sub.shape
    out: dict[str, Tensor] = {}
    for n, b in sub.binary().items():
        layer, matrix = parse_weight_name(n)
        keep = b.expand(canonical_shape(s, matrix)).float()
        keep = 1.0 - keep if remove == "subnetwork" else keep
        p = f"transformer.h.{layer}."
        if matrix in QKV:
            name = p + "attn.c_attn.weight"
            mult = out.setdefault(name, torch.ones(s.d_model, 3 * s.d_model))
            i = QKV.index(matrix) * s.d_model
            mult[:, i : i + s.d_model] = einops.rearrange(keep, "h m d -> m (h d)")
        elif matrix == "W_O":
            out[p + HF_NAMES[matrix]] = einops.rearrange(keep, "h d m -> (h d) m")
        else:
            out[p + HF_NAMES[matrix]] = keep
    return out


def masked_hf_state_dict(lm: LensModel, sub: Subnetwork, remove: Remove = "subnetwork") -> dict[str, Tensor]:
    """The model's HF-layout weights with the chosen weights zeroed."""
    sd = lm.hf_state_dict()
    for name, mult in hf_keep_multipliers(sub, remove).items():
        sd[name] = sd[name] * mult.to(sd[name].device, sd[name].dtype)
    return sd


def export_model(
    lm: LensModel,
    sub: Subnetwork,
    out: str | os.PathLike,
    *,
    remove: Remove = "subnetwork",
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write an HF checkpoint directory loadable with ``AutoModelForCausalLM.from_pretrained(out)``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} exists; export writes a new directory (remove it or choose another --out)")
    sub.check_model(lm)
    sd = masked_hf_state_dict(lm, sub, remove)
    cfg = {k: v for k, v in lm.hf_config().items() if k not in ("_name_or_path", "transformers_version")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        hf = GPT2LMHeadModel(GPT2Config(**cfg)).to(sd["transformer.wte.weight"].dtype)  # type: ignore[arg-type]
        missing, unexpected = hf.load_state_dict({k: v.cpu() for k, v in sd.items()}, strict=False)
        if unexpected or [k for k in missing if not k.endswith(".attn.bias") and k != "lm_head.weight"]:
            raise ExportError(f"internal: HF state dict mismatch (missing {missing}, unexpected {unexpected})")
        hf.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        n_zeroed = sum(int((m == 0).sum()) for m in hf_keep_multipliers(sub, remove).values())
        info = {
            "removed": remove,
            "n_weights_zeroed": n_zeroed,
            "sparsity": sub.sparsity,
            "source_model": lm.spec,
            "source_fingerprint": lm.fingerprint(),
            "subnetwork_meta": sub.meta,
            **(provenance or {}),
        }
        (tmp / "kcs_lens_export.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        if out.exists():
            raise ExportError(f"{out} appeared while exporting; nothing written")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_run(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    remove: str = "subnetwork",  # validated below: it comes from the command line
    subnetwork: str | os.PathLike | None = None,
    model: str | None = None,
    backend: str | None = None,
    lens_model: LensModel | None = None,
    device: str | None = None,
) -> Path:
    """``kcs-lens export RUN --out DIR``: load the run's model (or ``model``) and export it."""
    if Path(out).exists():  # fail before loading anything
        raise ExportError(f"{out} exists; export writes a new directory (remove it or choose another --out)")
    if remove not in ("subnetwork", "complement"):
        raise ExportError(f"--remove {remove!r}: expected 'subnetwork' or 'complement'")
    remove_kind: Literal["subnetwork", "complement"] = "subnetwork" if remove == "subnetwork" else "complement"
    info = load_run(run, subnetwork)
    c = info.config
    lm = lens_model or load_model(model or c.model, backend=backend or c.backend, device=device or c.device)
    check_model(info, lm)
    return export_model(
        lm, info.subnetwork, out, remove=remove_kind, provenance={"run": str(info.dir), "target_kg": c.target_kg, "seed": c.seed}
    )
