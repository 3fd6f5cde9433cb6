"""Typed configuration of a discovery run (SAELens-style: config -> runner -> saved artifact).

Defaults are the authors' released ones (method.md, "Optimization") for GPT-2 models. The
bundled model has its own shortened recipe (``recipe="bundled"``, :mod:`kcs_lens.discovery.recipes`), documented in docs/method.md.
A TOML, YAML or JSON file can set any field; CLI flags win over the file.

Every field carries its help text and its constraint (:func:`kcs_lens.settings.opt`), so this file
is the one place where an option is described and checked: ``kcs-lens discover`` builds its flags
from the fields (cli/config_options.py) and :meth:`DiscoveryConfig.validate` checks every value,
naming the option, before any work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from kcs_lens import settings
from kcs_lens.discovery.recipes import Recipe, recipe_values
from kcs_lens.errors import ConfigError
from kcs_lens.files import read_mapping
from kcs_lens.masks.granularity import DEPRECATED_GRANULARITIES, Granularity, normalize_granularity
from kcs_lens.model.canonical import MATRICES
from kcs_lens.model.lens import Backend
from kcs_lens.model.loading import BUNDLED_NAMES
from kcs_lens.objective.reference import ABLATIONS, Ablation, LossConfig
from kcs_lens.settings import (
    check_value,
    coerce,
    field_types,
    flag_of,
    in_range,
    int_at_least,
    non_empty,
    non_negative,
    opt,
    seed_range,
    torch_device,
    validate_fields,
)

# Loss weights beyond this overflow float32 losses (a non-finite loss at step 0); the recipes use <= 75.
WEIGHT = in_range(0, 1e6)


def _matrix_subset(v: Any) -> str | None:
    return None if v and all(m in MATRICES for m in v) else f"a non-empty subset of {','.join(MATRICES)}"


@dataclass
class DiscoveryConfig:
    # what
    model: str = opt(
        "bundled",
        "bundled (default, GPT-2), bundled-llama, an HF name (gpt2-medium, EleutherAI/pythia-160m, ...) or a local HF directory",
        check=non_empty,
    )
    backend: Backend | None = opt(
        None,
        "bridge (TransformerLens 4.x TransformerBridge) or hooked (3.x HookedTransformer, every family); default: hooked for GPT-2 where TL 3.x is installed, else bridge",
    )
    target_kg: str = opt(
        "building", "TargetKG spec: a bundled name (building), a file or folder, hf:..., wordnet:ROOT", check=non_empty
    )
    control_kg: str = opt("control", "ControlKG spec (its training part)", check=non_empty)
    control_val_kg: str | None = opt(
        None,
        "ControlKG validation spec; '' or unset: the first --control-val-size items of --control-kg (unset with the bundled 'control': the bundled 'control-val')",
    )
    control_val_size: int = opt(
        50, "validation items split off --control-kg when there is no --control-val-kg (paper: 50)", check=int_at_least(1)
    )
    control_lm: str | None = opt(
        None,
        "ControlLM text: wikitext-2, bundled, or a .txt file/folder (default: bundled for the bundled model, else wikitext-2)",
    )
    lm_block_len: int = opt(
        512, "ControlLM block length in tokens (capped at the model's context; paper: 512)", check=int_at_least(2)
    )
    control_test_size: int = opt(
        0,
        "ControlKG test part: the last N triplets of the validation part, held out from checkpoint selection and "
        "training and reported beside it (0: none)",
        check=int_at_least(0),
    )
    templates: str | None = opt(None, "relation templates file (JSON/TOML/YAML) for KG rows without text")
    paraphrases: str | None = opt(
        None,
        "unseen wordings: KG spec of the TargetKG in other templates, never trained on, scored at every evaluation and "
        "by evaluate/report (unset: the bundled <target>-paraphrases where there is one; '': none)",
    )
    train_templates: list[str] | None = opt(
        None,
        "TargetKG wordings to train on, by the rows' 'template' field (e.g. 0 or 0,1): rows of the TargetKG and of "
        "--paraphrases with other templates are held out as unseen wordings (unset: the TargetKG as given)",
    )
    prepend_bos: bool = opt(True, "prepend BOS to every triplet prompt", flag="--prepend-bos/--no-prepend-bos")
    tail_scoring: Literal["all", "last"] = opt(
        "all", "score all tail tokens (teacher forcing) or only the last (the paper's data has one-token tails)"
    )
    # multiple choice (docs/method.md, "Removal in other formats"; not in the paper, measured only)
    mc_choices: int = opt(
        5,
        "multiple choice: choices per triplet, the true tail and k-1 other tails of its relation drawn with a fixed "
        "seed from the TargetKG, ControlKG and --distractors (0: no multiple choice)",
        check=lambda x: None if x == 0 or (isinstance(x, int) and 2 <= x <= 1000) else "0 or an integer in [2, 1000]",
    )
    distractors: str | None = opt(None, "multiple choice: a KG spec whose tails are added to the distractor pool")
    # mask
    granularity: Granularity = opt(
        "weight",
        "mask granularity: weight (one logit per weight), row (one per input row of each matrix: a residual "
        "dimension for W_Q/W_K/W_V/W_in, an MLP neuron for W_out; 'neuron' is its deprecated name) or head "
        "(one per attention head and per MLP neuron)",
        aliases=DEPRECATED_GRANULARITIES,
    )
    layers: str = opt("top-half", "masked blocks: top-half (paper), all, a range 6-11, or a list 6,7,8", check=non_empty)
    matrices: list[str] = opt(
        None, f"masked matrices, a comma list of {','.join(MATRICES)}", check=_matrix_subset, factory=lambda: list(MATRICES)
    )
    init_prob: float = opt(
        0.45,
        "initial probability of a weight in the sampled subnetwork (paper: 0.45)",
        check=in_range(0, 1, open_lo=True, open_hi=True),
    )
    tau: float = opt(1.0, "Gumbel-sigmoid temperature (paper: 1.0)", check=in_range(0, 1000, open_lo=True))
    share_sample: bool = opt(
        False,
        "one mask sample per step for all three passes (NOT the paper's default: fresh noise per pass)",
        flag="--share-sample/--fresh-sample",
    )
    # loss
    ablation: Ablation = opt("full", f"loss ablation: {', '.join(ABLATIONS)}")
    suppression_weight: float = opt(1.5, "weight of KL(U||q) on TargetKG (paper: 1.5)", check=WEIGHT)
    control_kg_weight: float = opt(1.0, "weight of KL(p||q) on ControlKG (paper: 1.0)", check=WEIGHT)
    control_lm_weight: float = opt(1.0, "weight of KL(p||q) on ControlLM (paper: 1.0)", check=WEIGHT)
    sparsity_start: float = opt(2.0, "sparsity weight until mid-training (paper: 2.0)", check=WEIGHT)
    sparsity_end: float = opt(3.0, "sparsity weight at the last step, linear from mid-training (paper: 3.0)", check=WEIGHT)
    tail_weight: float = opt(
        0.0,
        "weight of the tail term on TargetKG (NOT in the paper; 0 = off, the paper's objective; docs/method.md)",
        check=WEIGHT,
    )
    tail_kind: Literal["margin", "uniform"] = opt(
        "margin",
        "tail term: margin = max(0, tail logit - best other logit + 1), positive while the tail is the answer; "
        "uniform = max(0, log q(tail) + log V), the tail's log-prob above 1/V",
    )
    distractor_weight: float = opt(
        0.0,
        "weight of the distractor term on TargetKG (NOT in the paper; 0 = off): the tail against --distractor-k other "
        "tails of its relation, drawn afresh each step from the TargetKG and ControlKG (docs/method.md)",
        check=WEIGHT,
    )
    distractor_kind: Literal["margin", "uniform"] = opt(
        "margin",
        "distractor term: margin = max(0, tail logit - best drawn distractor's logit + 1); uniform = KL(uniform || "
        "softmax over the tail and the drawn distractors)",
    )
    distractor_k: int = opt(4, "distractor tails drawn per TargetKG triplet and step (distractor term)", check=int_at_least(1))
    lens_weight: float = opt(
        0.0,
        "weight of the lens term on TargetKG (NOT in the paper; 0 = off): the tail pushed out of the top --lens-topk of "
        "the logit lens after every masked block below the last (docs/method.md)",
        check=WEIGHT,
    )
    lens_topk: int = opt(
        10, "lens term: the tail is penalized while in this many top tokens of a layer's logit lens", check=int_at_least(1)
    )
    tail_position: Literal["correct", "released"] = opt(
        "correct", "correct (logits at the last prefix token) or released (the authors' off-by-one, for fidelity)"
    )
    # optimization
    recipe: Recipe = opt(
        "auto",
        "auto (bundled recipe for the bundled model, paper otherwise), paper, bundled, or robust (bundled + the distractor "
        "term on two wordings, NOT in the paper: removal that survives multiple choice and unseen wordings)",
    )
    steps: int = opt(40_000, "training steps (paper: 40000)", check=int_at_least(1))
    lr: float = opt(0.2, "Adam learning rate on the mask logits (paper: 0.2)", check=in_range(0, 1000, open_lo=True))
    warmup_frac: float = opt(0.1, "linear warm-up share of the steps (paper: 0.1)", check=in_range(0, 1))
    target_batch: int = opt(250, "TargetKG triplets per step (paper: the whole TargetKG, <= 250)", check=int_at_least(1))
    control_batch: int = opt(250, "ControlKG triplets per step, cycling (paper: 250)", check=int_at_least(1))
    lm_batch: int = opt(10, "ControlLM blocks per step (paper: 10)", check=int_at_least(1))
    seed: int = opt(84, "seed of the mask noise and data order (paper: 84, 1318, 735)", check=seed_range)
    device: str = opt("cpu", "torch device, e.g. cpu, cuda, cuda:1", check=torch_device)
    # speed (docs/performance.md): none of these changes the method except autocast's rounding
    objective: Literal["fast", "reference"] = opt(
        "fast", "fast (default: the same losses and gradients, cheaper) or reference (the straightforward implementation)"
    )
    autocast: Literal["none", "bf16"] = opt("none", "none or bf16 (CUDA and the fast objective only; losses stay fp32)")
    lm_cache_mb: float = opt(
        0.0, "cache frozen ControlLM activations per block up to this many MB (0: off)", check=in_range(0, 1e9)
    )
    # bookkeeping
    eval_every: int = opt(100, "evaluate the deterministic mask every N steps (paper: 100)", check=int_at_least(1))
    checkpoint_every: int = opt(
        200, "save a mask checkpoint every N steps, a multiple of --eval-every (paper: 200)", check=int_at_least(1)
    )
    lm_eval_blocks: int = opt(64, "held-out ControlLM blocks per evaluation", check=int_at_least(1))
    keep_all_checkpoints: bool = opt(
        False,
        "keep every mask checkpoint (default: only the latest and the best qualifying)",
        flag="--keep-all-checkpoints/--prune-checkpoints",
    )
    # checkpoint selection (method.md: our rule, stated in every report)
    select_min_target_ratio: float = opt(
        10.0, "checkpoint selection: minimum TargetKG PPL ratio, remaining / original", check=non_negative
    )
    select_max_control_ratio: float = opt(1.15, "checkpoint selection: maximum ControlKG PPL ratio", check=non_negative)
    select_max_lm_ratio: float = opt(1.05, "checkpoint selection: maximum held-out LM PPL ratio", check=non_negative)
    select_max_target_top1: float | None = opt(
        None,
        "checkpoint selection: maximum TargetKG top-1 accuracy of the remaining model, in [0, 1] (unset: no top-1 criterion)",
        check=in_range(0, 1),
    )
    select_max_target_mc: float | None = opt(
        None,
        "checkpoint selection: maximum TargetKG multiple-choice accuracy of the remaining model, in [0, 1] (unset: none)",
        check=in_range(0, 1),
    )
    select_min_control_mc: float | None = opt(
        None,
        "checkpoint selection: minimum ControlKG (validation) multiple-choice accuracy of the remaining model, in [0, 1] "
        "(unset: none)",
        check=in_range(0, 1),
    )

    def loss_config(self) -> LossConfig:
        return LossConfig(
            suppression=self.suppression_weight,
            control_kg=self.control_kg_weight,
            control_lm=self.control_lm_weight,
            sparsity_start=self.sparsity_start,
            sparsity_end=self.sparsity_end,
            tail=self.tail_weight,
            tail_kind=self.tail_kind,
            distractor=self.distractor_weight,
            distractor_kind=self.distractor_kind,
            distractor_k=self.distractor_k,
            lens=self.lens_weight,
            lens_topk=self.lens_topk,
            tail_position=self.tail_position,
        ).ablated(self.ablation)

    @property
    def is_bundled(self) -> bool:
        return self.model in BUNDLED_NAMES

    @property
    def lm_source(self) -> str:
        if self.control_lm:
            return self.control_lm
        return "bundled" if self.is_bundled else "wikitext-2"

    @property
    def control_val_source(self) -> str | None:
        """The ControlKG validation spec, or None: split the first ``control_val_size`` off the ControlKG."""
        if self.control_val_kg is None:
            return "control-val" if self.control_kg == "control" else None
        return self.control_val_kg or None

    def validate(self) -> "DiscoveryConfig":
        """Check every value against its type and constraint (naming the option), then the relations."""
        validate_fields(self)
        if self.checkpoint_every % self.eval_every:
            raise ConfigError(
                f"--checkpoint-every ({self.checkpoint_every}) must be a multiple of --eval-every ({self.eval_every}) "
                "so that every checkpoint has an evaluation to select on"
            )
        mc_bounds = [f for f in ("select_max_target_mc", "select_min_control_mc") if getattr(self, f) is not None]
        if mc_bounds and self.mc_choices == 0:
            raise ConfigError(f"{flag_of(mc_bounds[0])} needs multiple choice (--mc-choices >= 2, not 0)")
        for name in ("tail_weight", "distractor_weight", "lens_weight"):
            if getattr(self, name) > 0 and self.tail_position == "released":
                raise ConfigError(
                    f"{flag_of(name)} > 0 needs --tail-position correct (the released off-by-one scores positions without a tail token)"
                )
        if self.distractor_weight > 0 and self.tail_scoring == "last":
            raise ConfigError(
                "--distractor-weight > 0 needs --tail-scoring all (the term contrasts the first tail token, which "
                "--tail-scoring last does not score)"
            )
        if self.autocast != "none" and (self.objective != "fast" or not str(self.device).startswith("cuda")):
            raise ConfigError(
                f"--autocast {self.autocast} needs --objective fast and a CUDA --device (got --objective "
                f"{self.objective}, --device {self.device})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELD_NAMES = {f.name for f in fields(DiscoveryConfig)}
FIELD_TYPES: dict[str, Any] = field_types(DiscoveryConfig)


def check_setting(name: str, value: Any, *, where: str) -> Any:
    """One discovery setting checked on its own (type, constraint, allowed values), as ``validate``
    does for every field; errors name ``where`` (an option, or a file and key)."""
    return check_value(DiscoveryConfig, name, value, where=where)


def field_default(name: str) -> Any:
    return settings.field_default(DiscoveryConfig, name)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) file of DiscoveryConfig fields (a
    [discover] table is also accepted). Unknown keys and wrongly typed values are errors naming
    the file and the key."""
    p = Path(path)
    data = read_mapping(p, what="--config", error=ConfigError)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: the top level must be a table/mapping of options, not a {type(data).__name__}")
    if isinstance(data.get("discover"), dict):
        data = data["discover"]
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"--config {p}: unknown keys {unknown}; valid keys are {sorted(FIELD_NAMES)}")
    return {k: _coerce(k, v, where=f"--config {p}: key {k!r} =") for k, v in data.items()}


def _coerce(name: str, value: Any, *, where: str) -> Any:
    """``value`` as field ``name``'s type; a deprecated granularity name is kept (build_config warns)."""
    if name == "granularity" and value in DEPRECATED_GRANULARITIES:
        return value
    return coerce(value, FIELD_TYPES[name], where=where)


def build_config(file: str | Path | None = None, **cli: Any) -> DiscoveryConfig:
    """Defaults < recipe < config file < CLI flags (``None`` CLI values mean 'not given')."""
    given = {k: v for k, v in cli.items() if v is not None}
    unknown = sorted(set(given) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"unknown options {unknown}")
    merged = {**(read_config_file(file) if file else {}), **given}
    recipe, recipe_set = recipe_values(
        check_setting("recipe", merged.get("recipe", "auto"), where="--recipe"),
        merged.get("model", field_default("model")),
        merged.get("granularity", field_default("granularity")),  # validated below
    )
    values = {**recipe_set, **merged}
    if values.get("granularity") in DEPRECATED_GRANULARITIES:
        values["granularity"] = normalize_granularity(values["granularity"], warn=True)
    cfg = DiscoveryConfig(**{k: coerce(v, FIELD_TYPES[k], where=flag_of(k)) for k, v in values.items()})
    cfg.recipe = recipe
    return cfg.validate()


def config_from_saved(saved: dict[str, Any], where: str) -> DiscoveryConfig:
    """The DiscoveryConfig of a run's config.json (``where`` names the file in errors)."""
    if not isinstance(saved, dict):
        raise ConfigError(f"{where}: 'config' is not a mapping")
    unknown = sorted(set(saved) - FIELD_NAMES)
    if unknown:
        raise ConfigError(f"{where}: unknown config keys {unknown} (written by another kcs-lens version?)")
    try:
        saved = {
            k: DEPRECATED_GRANULARITIES.get(v, v) if k == "granularity" else v for k, v in saved.items()
        }  # old runs: 'neuron'
        return DiscoveryConfig(**{k: coerce(v, FIELD_TYPES[k], where=f"key {k!r} =") for k, v in saved.items()}).validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
