"""Checkpoint selection (method.md, "Evaluation": not specified by the paper; our rule, stated in
every report): the sparsest checkpoint whose removal meets the thresholds, otherwise the last
checkpoint, flagged as not meeting them."""

from __future__ import annotations

from typing import Any

from kcs_lens.discovery.config import DiscoveryConfig
from kcs_lens.errors import RunError


def selection_rule(cfg: DiscoveryConfig) -> dict[str, Any]:
    """The rule and its thresholds, as written into config.json, summary.json and reports."""
    top1, tmc, cmc = cfg.select_max_target_top1, cfg.select_max_target_mc, cfg.select_min_control_mc
    extra = [
        text
        for bound, text in (
            (top1, "TargetKG top-1 accuracy of the remaining model <= max_target_top1"),
            (tmc, "TargetKG multiple-choice accuracy of the remaining model <= max_target_mc"),
            (cmc, "ControlKG (validation) multiple-choice accuracy of the remaining model >= min_control_mc"),
        )
        if bound is not None
    ]
    rule = {
        "rule": "sparsest checkpoint with target PPL ratio >= min_target_ratio, control PPL ratio <= "
        "max_control_ratio and LM PPL ratio <= max_lm_ratio (remaining / original)"
        + "".join(f", and {t}" for t in extra)
        + "; otherwise the last checkpoint, flagged meets_criteria=false",
        "min_target_ratio": cfg.select_min_target_ratio,
        "max_control_ratio": cfg.select_max_control_ratio,
        "max_lm_ratio": cfg.select_max_lm_ratio,
        "max_target_top1": top1,
    }
    # written only when set, so that runs without them keep their rule byte for byte
    rule.update({k: v for k, v in (("max_target_mc", tmc), ("min_control_mc", cmc)) if v is not None})
    return rule


def meets_criteria(r: dict[str, Any], cfg: DiscoveryConfig) -> bool:
    """Whether one evaluation record (a metrics.jsonl line) meets the thresholds. A record without
    the TargetKG top-1 or the multiple-choice accuracies (older runs) fails a criterion on them: it
    cannot be checked."""
    top1, tmc, cmc = cfg.select_max_target_top1, cfg.select_max_target_mc, cfg.select_min_control_mc
    return (
        r["target_ratio"] >= cfg.select_min_target_ratio
        and r["control_ratio"] <= cfg.select_max_control_ratio
        and r["lm_ratio"] <= cfg.select_max_lm_ratio
        and (top1 is None or (r.get("target_top1") is not None and r["target_top1"] <= top1))
        and (tmc is None or (r.get("target_mc") is not None and r["target_mc"] <= tmc))
        and (cmc is None or (r.get("control_mc") is not None and r["control_mc"] >= cmc))
    )


def select_checkpoint(records: list[dict[str, Any]], cfg: DiscoveryConfig) -> tuple[dict[str, Any], bool]:
    """(chosen record, whether it meets the criteria) among the checkpointed evaluations."""
    if not records:
        raise RunError("no checkpoint to select from")
    ok = [r for r in records if meets_criteria(r, cfg)]
    if ok:
        return max(ok, key=lambda r: (r["sparsity"], r["step"])), True
    return max(records, key=lambda r: r["step"]), False
