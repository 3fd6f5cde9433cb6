"""Export the remaining model (or the subnetwork alone) as a standard Hugging Face checkpoint.

The canonical masks (TransformerLens layout) are converted to the HF layout of the model's family
(:mod:`kcs_lens.model.families`: GPT-2's Conv1D ``c_attn`` with Q | K | V columns, GPT-NeoX's fused
``query_key_value`` grouped per head, separate ``q_proj`` / ``k_proj`` / ``v_proj`` with
grouped-query K/V, gated MLPs' ``gate_proj``) and multiplied into :meth:`LensModel.hf_state_dict`;
the checkpoint is of the same architecture and loads with plain ``transformers``.

The directory (config.json, model.safetensors, tokenizer files, ``kcs_lens_export.json``) is built
in a temporary folder beside the target and renamed into place; an existing target is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from jaxtyping import Float
from torch import Tensor

from kcs_lens.discovery.run_model import ModelOverrides, load_run_model
from kcs_lens.discovery.rundir import load_run
from kcs_lens.errors import ExportError
from kcs_lens.files import make_temp_dir, normal_modes
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.canonical import canonical_shape, parse_weight_name
from kcs_lens.model.families import FAMILIES, Family, hf_multipliers
from kcs_lens.model.lens import LensModel

Remove = Literal["subnetwork", "complement"]


def hf_keep_multipliers(
    sub: Subnetwork, remove: Remove = "subnetwork", family: Family | None = None
) -> dict[str, Float[Tensor, "..."]]:
    """Per HF weight name, the 0/1 multiplier that removes the subnetwork (``remove="subnetwork"``:
    theta * (1 - m)) or everything else in the masked matrices (``"complement"``: theta * m).
    ``family`` (default GPT-2) says where each canonical matrix is in the HF checkpoint."""
    if remove not in ("subnetwork", "complement"):
        raise ExportError(f"--remove {remove!r}: expected 'subnetwork' or 'complement'")
    s = sub.shape
    keep: dict[str, Tensor] = {}
    for n, b in sub.binary().items():
        m = b.expand(canonical_shape(s, parse_weight_name(n)[1])).float()
        keep[n] = 1.0 - m if remove == "subnetwork" else m
    return hf_multipliers(family or FAMILIES["gpt2"], s, keep)


def masked_hf_state_dict(lm: LensModel, sub: Subnetwork, remove: Remove = "subnetwork") -> dict[str, Tensor]:
    """The model's HF-layout weights with the chosen weights zeroed."""
    sd = lm.hf_state_dict()
    for name, mult in hf_keep_multipliers(sub, remove, lm.family).items():
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
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} exists; export writes a new directory (remove it or choose another --out)")
    sub.check_model(lm)
    sd = masked_hf_state_dict(lm, sub, remove)
    cfg = {k: v for k, v in lm.hf_config().items() if k not in ("_name_or_path", "transformers_version")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, out.name)
    try:
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        dtype = next(iter(sd.values())).dtype
        hf = AutoModelForCausalLM.from_config(config).to(dtype)
        missing, unexpected = hf.load_state_dict({k: v.cpu() for k, v in sd.items()}, strict=False)
        tied = {n for n, _ in hf.named_parameters(remove_duplicate=False)} - {n for n, _ in hf.named_parameters()}
        if unexpected or [k for k in missing if not k.endswith(".attn.bias") and k != "lm_head.weight" and k not in tied]:
            raise ExportError(f"internal: HF state dict mismatch (missing {missing}, unexpected {unexpected})")
        hf.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        n_zeroed = sum(int((m == 0).sum()) for m in hf_keep_multipliers(sub, remove, lm.family).values())
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
        normal_modes(tmp)
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
    overrides: ModelOverrides | None = None,
    lens_model: LensModel | None = None,
) -> Path:
    """``kcs-lens export RUN --out DIR``: load the run's model (:func:`~kcs_lens.discovery.run_model.load_run_model`) and export it."""
    if Path(out).exists():  # fail before loading anything
        raise ExportError(f"{out} exists; export writes a new directory (remove it or choose another --out)")
    if remove not in ("subnetwork", "complement"):
        raise ExportError(f"--remove {remove!r}: expected 'subnetwork' or 'complement'")
    remove_kind: Literal["subnetwork", "complement"] = "subnetwork" if remove == "subnetwork" else "complement"
    info = load_run(run, subnetwork)
    c = info.config
    lm = load_run_model(info, overrides, lens_model=lens_model)
    return export_model(
        lm, info.subnetwork, out, remove=remove_kind, provenance={"run": str(info.dir), "target_kg": c.target_kg, "seed": c.seed}
    )
