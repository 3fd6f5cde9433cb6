"""Unseen wordings: the TargetKG in templates the run did not train on (the bundled paraphrase
sets, --paraphrases, the --train-templates split) and the paper's other wordings of its WordNet
TargetKGs (read from the shared paper data, never copied)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import requires_bundled, tiny_run_kwargs

from kcs_lens.discovery.config import build_config
from kcs_lens.discovery.run_data import load_run_data
from kcs_lens.errors import ConfigError
from kcs_lens.evaluation.choice import DistractorPool, build_choices

PAPER = Path("/work/shared/paper-data/wordnet/targetkg")


@pytest.fixture(scope="module")
def bundled_lm():
    from kcs_lens.model.loading import load_model

    return load_model("bundled")


@requires_bundled
def test_bundled_paraphrases_and_train_templates_split(bundled_lm):
    data = load_run_data(build_config(target_kg="building"), bundled_lm, lambda m: None, text=False)
    assert len(data.target) == 30 and data.paraphrases is not None and len(data.paraphrases) == 90
    assert {t.meta["template"] for t in data.paraphrases} == {1, 2, 3}
    # --train-templates 0,1: the TargetKG's and the paraphrase set's rows of templates 0 and 1 are trained on
    data = load_run_data(build_config(target_kg="building", train_templates="0,1"), bundled_lm, lambda m: None, text=False)
    assert len(data.target) == 60 and {t.meta["template"] for t in data.target} == {0, 1}
    assert data.paraphrases is not None and {t.meta["template"] for t in data.paraphrases} == {2, 3}
    assert len(data.paraphrases) == 60 and not {t.text for t in data.target} & {t.text for t in data.paraphrases}
    assert {t.key for t in data.target} == {t.key for t in data.paraphrases}  # the same 30 facts, other wordings
    assert len(data.target_batch) == 60 and data.paraphrases_batch is not None
    none = load_run_data(build_config(target_kg="building", paraphrases=""), bundled_lm, lambda m: None, text=False)
    assert none.paraphrases is None
    with pytest.raises(ConfigError, match="no TargetKG row has one of these templates"):
        load_run_data(build_config(target_kg="building", train_templates="7"), bundled_lm, lambda m: None, text=False)


def test_train_templates_needs_a_template_field(tiny_kg, tiny_model_dir, make_tiny_lm):
    cfg = build_config(**tiny_run_kwargs(tiny_kg, tiny_model_dir), train_templates="0")
    with pytest.raises(ConfigError, match="--train-templates: 6 TargetKG/paraphrase row"):
        load_run_data(cfg, make_tiny_lm(), lambda m: None, text=False)


@pytest.mark.skipif(not PAPER.is_dir(), reason="the paper's data is not on this machine")
def test_paper_worse_format_wordings(tiny_tokenizer):
    from kcs_lens.data.loaders import load_kg

    best = load_kg(str(PAPER / "building.n.01_best_format.json"), model_name="gpt2")
    worse = load_kg(str(PAPER / "building.n.01_worse_format.json"), model_name="gpt2")
    assert worse.name == "building.n.01-paraphrases" and all(t.meta["paraphrase"] for t in worse)
    assert {t.key for t in worse} == {t.key for t in best}  # every fact, in other wordings
    assert len(worse) > 3 * len(best) and not {t.text for t in worse} & {t.text for t in best}
    # a fact gets the same distractors in every wording
    pool = DistractorPool([best])
    cs = build_choices(worse, pool, tiny_tokenizer, k=5)
    by_fact: dict = {}
    for t, choices in zip(worse, cs.choices):
        by_fact.setdefault(t.key, set()).add(tuple(choices))
    assert all(len(v) == 1 for v in by_fact.values())
    assert cs.describe()["n_short"] == 0 and cs.n_items == len(worse)
