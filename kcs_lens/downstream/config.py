"""Typed settings of ``kcs-lens downstream`` (:class:`DownstreamConfig`): the task, the finetuning
(:class:`~kcs_lens.downstream.finetune.FinetuneSettings`, which it extends), the seeds, the random
baseline and the statistics; every option with its help text and check (:mod:`kcs_lens.settings`),
the command's flags generated from them, and the whole config saved into ``downstream.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from kcs_lens.downstream.finetune import FinetuneSettings
from kcs_lens.errors import ConfigError
from kcs_lens.settings import in_range, int_at_least, opt, seed_range, validate_fields

TASKS = {"bundled": ("bundled:train", "bundled:test")}


def parse_seeds(text: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]; ValueError unless one or more distinct integers."""
    seeds = [int(x) for x in text.replace(" ", "").split(",") if x]
    if not seeds or len(set(seeds)) != len(seeds) or not all(0 <= x < 2**63 for x in seeds):
        raise ValueError(text)
    return seeds


def _seed_list(x: Any) -> str | None:
    try:
        parse_seeds(x)
    except (ValueError, AttributeError):
        return "one or more distinct comma-separated integers in [0, 2^63), e.g. 1,2,3"
    return None


@dataclass
class DownstreamConfig(FinetuneSettings):
    """Everything ``kcs-lens downstream`` does besides which runs and where the results go."""

    train: str | None = opt(None, "train questions: a .jsonl/.json file (CommonsenseQA HF or original schema) or hf:name[:split]")
    test: str | None = opt(None, "test questions, same formats as --train")
    task: Literal["bundled"] | None = opt(None, "a shipped task instead of --train/--test: bundled")
    links: list[str] = opt(
        None,
        "KG files whose rows carry question ids (the paper's csqa*_best_format.json; a comma list)",
        factory=list,
    )
    seeds: str = opt("1,2,3", "finetuning seeds (head init and data order), comma-separated", check=_seed_list)
    baseline_draws: int = opt(3, "random removals of the same size per matrix", check=int_at_least(1))
    baseline_seed: int = opt(0, "seed of the first random draw (draw i: seed + i)", check=seed_range)
    val_fraction: float = opt(
        0.1, "share of --train held out to pick the best epoch", check=in_range(0, 1, open_lo=True, open_hi=True)
    )
    bootstrap: int = opt(1000, "bootstrap resamples for the 95% intervals", check=int_at_least(100))
    bootstrap_seed: int = opt(0, "seed of the bootstrap resamples", check=seed_range)

    def validate(self) -> "DownstreamConfig":
        """Every field checked (naming its option), then the relations."""
        validate_fields(self)
        if self.task is not None and (self.train or self.test):
            raise ConfigError("--task and --train/--test: give either a task or the two files")
        if self.task is None and (not self.train or not self.test):
            raise ConfigError("give --train and --test question files (or --task bundled)")
        return self

    @property
    def seed_list(self) -> list[int]:
        return parse_seeds(self.seeds)

    @property
    def question_files(self) -> tuple[str, str]:
        """(train, test) question specs."""
        if self.task is not None:
            return TASKS[self.task]
        assert self.train is not None and self.test is not None  # validate()
        return self.train, self.test

    def finetune_settings(self, bundled: bool = False) -> FinetuneSettings:
        """The finetuning part, resolved (0 -> the defaults of the mode; ``bundled``: its learning rates)."""
        return FinetuneSettings.resolved(self, bundled)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
