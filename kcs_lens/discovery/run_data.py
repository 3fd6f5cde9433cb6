"""The run's data: TargetKG, ControlKG split (train / validation, disjoint from the TargetKG) and
ControlLM blocks, tokenized for the run's model exactly as discovery used them
(:func:`load_run_data`), for discovery and every later command that reads a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from jaxtyping import Int
from torch import Tensor

from kcs_lens.data.triplets import TripletBatch, TripletSet, disjoint, split_control, tokenize_triplets
from kcs_lens.discovery.config import DiscoveryConfig
from kcs_lens.errors import ConfigError, RunError
from kcs_lens.model.lens import LensModel


@dataclass
class RunData:
    """TargetKG, ControlKG (train / validation, disjoint from the TargetKG) and ControlLM blocks
    of a run, tokenized for its model."""

    target: TripletSet
    control: TripletSet
    control_val: TripletSet
    n_overlap_dropped: int
    target_batch: TripletBatch
    control_batch: TripletBatch
    control_val_batch: TripletBatch
    lm_train: Int[Tensor, "n_train block"]
    lm_heldout: Int[Tensor, "n_heldout block"]
    control_test: TripletSet | None = None  # held out from training and selection (``control_test_size``)
    control_test_batch: TripletBatch | None = None
    paraphrases: TripletSet | None = None  # the TargetKG in wordings training never sees (``paraphrases``, ``train_templates``)
    paraphrases_batch: TripletBatch | None = None

    def sizes(self) -> dict[str, int]:
        return {
            "target": len(self.target),
            "control_train": len(self.control),
            "control_val": len(self.control_val),
            **({"control_test": len(self.control_test)} if self.control_test is not None else {}),
            **({"paraphrases": len(self.paraphrases)} if self.paraphrases is not None else {}),
            "control_overlap_dropped": self.n_overlap_dropped,
            "lm_train_blocks": int(self.lm_train.shape[0]),
            "lm_heldout_blocks": int(self.lm_heldout.shape[0]),
        }


def load_run_data(
    cfg: DiscoveryConfig,
    lm: LensModel,
    log: Callable[[str], None] = print,
    *,
    text: bool = True,
    cache: dict[Any, Any] | None = None,
) -> RunData:
    """The data of a run with config ``cfg`` on ``lm`` (TargetKG, ControlKG split, ControlLM;
    ``text=False``: no ControlLM blocks, for analyses of the KG prompts only). ``cache``: the
    loaded KGs and text blocks of earlier runs of ``lm`` in this process, by spec (filled here)."""
    from kcs_lens.data.loaders import load_kg

    kw: dict[str, Any] = dict(model_name=lm.spec, templates=cfg.templates)
    kg = lambda spec: _memo(cache, ("kg", spec, lm.spec, cfg.templates), lambda: load_kg(spec, **kw))
    target, paraphrases = split_wordings(cfg, kg(cfg.target_kg), kw)
    control, control_val, control_test, n_dropped = control_parts(cfg, target, kg, log)

    def tok(ts: TripletSet, name: str) -> TripletBatch:
        return tokenize_triplets(
            ts,
            lm.tokenizer,
            prepend_bos=cfg.prepend_bos,
            tail_scoring=cfg.tail_scoring,
            d_vocab=lm.shape.d_vocab,
            source=name,
            n_ctx=lm.shape.n_ctx,
        ).to(lm.device)

    if text:
        lm_train, lm_heldout = text_blocks(cfg, lm, cache)
    else:
        lm_train = lm_heldout = torch.zeros((0, min(cfg.lm_block_len, lm.shape.n_ctx)), dtype=torch.long, device=lm.device)
    val_spec = cfg.control_val_source or cfg.control_kg
    return RunData(
        target,
        control,
        control_val,
        n_dropped,
        tok(target, cfg.target_kg),
        tok(control, cfg.control_kg),
        tok(control_val, val_spec),
        lm_train,
        lm_heldout,
        control_test,
        None if control_test is None else tok(control_test, f"{val_spec} (test part)"),
        paraphrases,
        None if paraphrases is None else tok(paraphrases, paraphrases.source or "paraphrases"),
    )


def _memo(cache: dict[Any, Any] | None, key: tuple[Any, ...], load: Callable[[], Any]) -> Any:
    """``load()``, kept in ``cache`` under ``key`` (when there is a cache)."""
    if cache is None:
        return load()
    if key not in cache:
        cache[key] = load()
    return cache[key]


def control_parts(
    cfg: DiscoveryConfig, target: TripletSet, kg: Callable[[str], TripletSet], log: Callable[[str], None]
) -> tuple[TripletSet, TripletSet, TripletSet | None, int]:
    """The ControlKG's training, validation and (``control_test_size``) test parts, each disjoint
    from the TargetKG, and how many overlapping triplets were dropped. ``kg``: loads a KG spec."""
    control = kg(cfg.control_kg)
    if cfg.control_val_source:
        control_val = kg(cfg.control_val_source)
    else:
        if cfg.control_val_size >= len(control):
            raise ConfigError(
                f"--control-val-size {cfg.control_val_size}: the ControlKG {cfg.control_kg!r} has only {len(control)} "
                "triplets; the validation part must leave some for training (or pass --control-val-kg)"
            )
        control, control_val = split_control(control, cfg.control_val_size)
    control, n1 = disjoint(target, control)
    control_val, n2 = disjoint(target, control_val)
    if n1 + n2:
        log(f"dropped {n1 + n2} ControlKG triplets that are also in the TargetKG (they must be disjoint)")
    for name, ts in (("ControlKG", control), ("ControlKG validation", control_val)):
        if len(ts) == 0:
            raise RunError(f"{name} {cfg.control_kg!r} is empty after removing the TargetKG overlap")
    control_test = None
    if cfg.control_test_size:
        if cfg.control_test_size >= len(control_val):
            raise ConfigError(
                f"--control-test-size {cfg.control_test_size}: the ControlKG validation part has only {len(control_val)} "
                "triplets; the test part is taken from its end and must leave some for checkpoint selection"
            )
        n_val = len(control_val) - cfg.control_test_size
        control_test = TripletSet(control_val.triplets[n_val:], f"{control_val.name}-test", control_val.source)
        control_val = TripletSet(control_val.triplets[:n_val], control_val.name, control_val.source)
    return control, control_val, control_test, n1 + n2


def text_blocks(
    cfg: DiscoveryConfig, lm: LensModel, cache: dict[Any, Any] | None = None
) -> tuple[Int[Tensor, "n_train block"], Int[Tensor, "n_heldout block"]]:
    """The ControlLM training and held-out blocks (``lm_block_len`` tokens, capped at the model's
    context), checked to be in the model's vocabulary."""
    from kcs_lens.data.text import load_text_blocks

    block = min(cfg.lm_block_len, lm.shape.n_ctx)
    lm_train = _memo(
        cache,
        ("text", cfg.lm_source, block, "train", None),
        lambda: load_text_blocks(cfg.lm_source, lm.tokenizer, block_len=block, split="train").to(lm.device),
    )
    lm_heldout = _memo(
        cache,
        ("text", cfg.lm_source, block, "heldout", cfg.lm_eval_blocks),
        lambda: load_text_blocks(cfg.lm_source, lm.tokenizer, block_len=block, split="heldout", max_blocks=cfg.lm_eval_blocks).to(
            lm.device
        ),
    )
    if int(max(lm_train.max(), lm_heldout.max())) >= lm.shape.d_vocab:
        raise RunError(f"ControlLM text {cfg.lm_source!r} tokenizes to ids outside the model's vocabulary")
    return lm_train, lm_heldout


def paraphrase_spec(cfg: DiscoveryConfig) -> str | None:
    """The run's unseen-wordings KG spec: ``cfg.paraphrases``, else the bundled ``<target>-paraphrases``
    where the TargetKG is a bundled set that has one ('' : none)."""
    from kcs_lens.data.loaders import builtin_names

    if cfg.paraphrases is not None:
        return cfg.paraphrases or None
    name = str(cfg.target_kg)
    name = name[len("builtin:") :] if name.startswith("builtin:") else name
    if any(c in name for c in "/:\\."):
        return None
    return f"{name}-paraphrases" if f"{name}-paraphrases" in builtin_names() else None


def split_wordings(cfg: DiscoveryConfig, target: TripletSet, kw: dict[str, Any]) -> tuple[TripletSet, TripletSet | None]:
    """(the TargetKG trained on, the unseen wordings). With ``train_templates``, the rows of the
    TargetKG and of the paraphrase set whose ``template`` field is listed are trained on and the
    others held out; every row needs the field."""
    from kcs_lens.data.loaders import load_kg

    spec = paraphrase_spec(cfg)
    para = load_kg(spec, **kw) if spec else None
    if not cfg.train_templates:
        return target, para
    rows = [*target, *(para or [])]
    missing = [t for t in rows if "template" not in t.meta]
    if missing:
        raise ConfigError(
            f"--train-templates: {len(missing)} TargetKG/paraphrase row(s) have no 'template' field (first: {missing[0].text!r}); "
            "it needs KG files whose rows name their template"
        )
    keep = {str(x) for x in cfg.train_templates}
    train = [t for t in rows if str(t.meta["template"]) in keep]
    held = [t for t in rows if str(t.meta["template"]) not in keep]
    if not train:
        have = sorted({str(t.meta["template"]) for t in rows})
        raise ConfigError(
            f"--train-templates {','.join(cfg.train_templates)}: no TargetKG row has one of these templates (have {have})"
        )
    source = target.source + (f" + {para.source}" if para is not None else "")
    unseen = TripletSet(held, f"{target.name}-unseen", f"{source} (templates not in {','.join(cfg.train_templates)})")
    return TripletSet(train, target.name, f"{source} (templates {','.join(cfg.train_templates)})"), (unseen if held else None)
