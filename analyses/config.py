"""Typed settings of ``kcs-lens compare-circuits`` (:class:`CompareConfig`): which prompts, the
corruption, the bootstrap, the views; every option with its help text and check
(:mod:`kcs_lens.settings`), the command's flags generated from them, and the config saved into
``comparison.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from kcs_lens.settings import int_at_least, non_empty, opt, seed_range, validate_fields

Corrupt = Literal["swap", "zero", "mean"]


@dataclass
class CompareConfig:
    kg: str = opt("target", "prompts: target (the run's TargetKG), control, or any KG spec", check=non_empty)
    corrupt: Corrupt = opt("swap", "swap (head entity swapped within the KG), zero or mean")
    n_bootstrap: int = opt(200, "bootstrap resamples over prompts", check=int_at_least(1))
    seed: int = opt(0, "seed of the bootstrap intervals and of the head-swap corruption", check=seed_range)
    max_prompts: int = opt(64, "first N prompts of each set (0 = all)", check=int_at_least(0))
    top_heads: int = opt(3, "heads shown in the attention views", check=int_at_least(1))
    attention_prompts: int = opt(2, "prompts with attention views", check=int_at_least(0))
    token_prompts: int = opt(8, "prompts with per-token log-prob views", check=int_at_least(0))
    control: bool = opt(True, "also analyse the ControlKG (specificity)", flag="--control/--no-control")
    threads: int | None = opt(
        None, "torch CPU threads during the analysis (default: 1 for small models, else torch's)", check=int_at_least(1)
    )

    def validate(self) -> "CompareConfig":
        validate_fields(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
