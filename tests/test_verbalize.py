"""Model-dependent KG features: tail scores, best-template choice, known-fact filter, kg summary."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _kg_fixtures import RuleLM, tiny_model, tiny_tokenizer  # noqa: F401 (fixtures)

from kcs_lens.data.loaders import load_kg
from kcs_lens.data.summary import format_summary, kg_summary
from kcs_lens.data.templates import TEMPLATES
from kcs_lens.data.triplets import Triplet, TripletSet, tokenize_triplets
from kcs_lens.data.verbalize import candidate_texts, choose_templates, filter_known, score_tails
from kcs_lens.errors import KGError

# no TransformerLens code runs here: scripts/test.sh runs it on one TL line only
pytestmark = pytest.mark.tl_independent


def kg_of(tmp_path, rows, name="k"):
    f = tmp_path / f"{name}.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_kg(f)


ROWS = [
    {"head": "car", "relation": "IsA", "tail": "vehicle"},
    {"head": "truck", "relation": "IsA", "tail": "vehicle"},
    {"head": "apple", "relation": "IsA", "tail": "fruit"},
    {"head": "zq", "relation": "IsA", "tail": "zyxwvut"},
]


def test_score_tails_matches_manual_nll(tmp_path, tiny_model):
    kg = kg_of(tmp_path, ROWS)
    s = score_tails(tiny_model, kg, batch_size=3)  # batches of unequal lengths
    batch = tokenize_triplets(kg, tiny_model.tokenizer)
    logp = tiny_model(batch.tokens).log_softmax(-1)
    for i in range(len(kg)):
        pos = batch.score_mask[i].nonzero()[:, 0]
        manual = -logp[i, pos, batch.targets[i, pos]].mean()
        assert torch.isclose(s.nll[i], manual, atol=1e-5)
        first = int(pos[0])
        rank = int((logp[i, first] > logp[i, first, batch.targets[i, first]]).sum())
        assert int(s.first_rank[i]) == rank
    assert s.n_scored.tolist() == batch.score_mask.sum(1).tolist() and s.n_scored[3] > 1
    last = score_tails(tiny_model, kg, tail_scoring="last")
    assert last.n_scored.tolist() == [1, 1, 1, 1]
    assert torch.allclose(last.nll[:3], s.nll[:3])  # single-token tails: the same score
    summ = s.summary()
    assert summ["n"] == 4 and summ["tail_ppl"] == pytest.approx(math.exp(float(s.nll.mean())))
    assert summ["top1_acc"] == int((s.first_rank == 0).sum()) / len(s.first_rank) and summ["mean_rank"] == float(
        s.first_rank.float().mean()
    )


def test_candidates_have_article_variants(tmp_path):
    t = kg_of(tmp_path, ROWS[2:3])[0]
    texts = [text for _, text in candidate_texts(t)]
    assert "An apple is a fruit" in texts and "Apple is fruit" in texts and "An apple is a kind of fruit" in texts
    assert all(x.endswith("fruit") for x in texts) and len(texts) == len(set(texts))
    spaced = [text for _, text in candidate_texts(t, space_variants=True)]
    assert " An apple is a fruit" in spaced and len(spaced) == 2 * len(texts)
    assert [text for _, text in candidate_texts(t, variants=False)] == [
        x.format(A_head="An apple", a_tail="a fruit", tail="fruit") for x in TEMPLATES["IsA"]
    ]


def test_choose_templates_picks_lowest_tail_ppl(tmp_path, tiny_model):
    kg = kg_of(tmp_path, ROWS)
    chosen = choose_templates(kg, tiny_model)
    for t, c in zip(kg, chosen):
        cands = candidate_texts(t)
        s = score_tails(tiny_model, [Triplet(t.head, t.relation, t.tail, text) for _, text in cands])
        best = int(s.nll.argmin())
        assert c.text == cands[best][1] and c.meta["template"] == cands[best][0]
        assert c.meta["text_source"] == "best_template"
        assert c.meta["tail_ppl"] == pytest.approx(float(s.nll[best].exp()), rel=1e-4)
        assert (c.head, c.relation, c.tail) == (t.head, t.relation, t.tail)


def test_choose_templates_follows_the_model(tmp_path, tiny_tokenizer):
    """A model that only predicts ' vehicle' after ' of' makes '... a kind of vehicle' win."""
    kg = kg_of(tmp_path, ROWS[:1])
    chosen = choose_templates(kg, RuleLM(tiny_tokenizer, " vehicle", after=" of"))
    assert chosen[0].text == "A car is a kind of vehicle"


def test_choose_templates_keeps_given_texts(tmp_path, tiny_model):
    rows = [dict(ROWS[0], text="Car is a vehicle"), ROWS[2]]
    kg = kg_of(tmp_path, rows)
    chosen = choose_templates(kg, tiny_model)
    assert chosen[0].text == "Car is a vehicle" and chosen[1].meta["text_source"] == "best_template"
    forced = choose_templates(kg, tiny_model, only_templated=False)
    assert forced[0].meta["text_source"] == "best_template"


def test_choose_templates_unknown_relation(tiny_model):
    kg = TripletSet([Triplet("rose", "SmellsLike", "apple", "A rose smells like apple")], "k", "k.jsonl")
    with pytest.raises(KGError, match=r"k\.jsonl #0: unknown relation 'SmellsLike' has no template"):
        choose_templates(kg, tiny_model, only_templated=False)


def test_filter_known_reports_dropped(tmp_path, tiny_tokenizer):
    kg = kg_of(tmp_path, ROWS)
    lm = RuleLM(tiny_tokenizer, " vehicle")  # ' vehicle' is always the top prediction
    kept, dropped = filter_known(kg, lm, max_rank=0)
    assert [t.head for t in kept] == ["car", "truck"] and dropped == 2
    kept, dropped = filter_known(kg, lm, max_rank=len(tiny_tokenizer))
    assert len(kept) == 4 and dropped == 0


def test_filter_known_empty_is_an_error(tmp_path, tiny_tokenizer):
    kg = kg_of(tmp_path, ROWS[2:], name="fruits")
    with pytest.raises(KGError, match=r"fruits\.jsonl: the known-fact filter \(first tail token rank <= 0\) dropped all 2"):
        filter_known(kg, RuleLM(tiny_tokenizer, " vehicle"), max_rank=0)


def test_kg_summary_with_model_and_control(tmp_path, tiny_model):
    kg = kg_of(tmp_path, ROWS)
    control = kg_of(tmp_path, [ROWS[0], {"head": "pear", "relation": "IsA", "tail": "fruit"}], name="ctrl")
    s = kg_summary(kg, control=control, model=tiny_model)
    assert s["relations"] == {"IsA": 4} and s["tail_tokens"][1] == 3 and sum(s["tail_tokens"].values()) == 4
    assert s["control"]["overlap"] == 1 and s["control"]["overlap_examples"] == ["car | isa | vehicle"]
    assert s["model"]["spec"] == "tiny-gpt2"
    expect = score_tails(tiny_model, kg).summary()
    assert s["model"]["tail_ppl"] == pytest.approx(expect["tail_ppl"])
    text = format_summary(s)
    assert "tail PPL" in text and "top-1 accuracy" in text and "overlap with control ctrl" in text
    json.dumps(s)  # JSON-able


def test_cli_show_with_a_local_model(tmp_path, tiny_tokenizer):
    """`kg show --model DIR` loads the model through kcs_lens.model.loading.load_model and reports its fit."""
    import typer
    from _kg_fixtures import load_kg_app
    from transformers import GPT2Config, GPT2LMHeadModel
    from typer.testing import CliRunner

    pytest.importorskip("kcs_lens.model.loading")
    d = tmp_path / "model"
    eos = tiny_tokenizer.eos_token_id
    cfg = GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=len(tiny_tokenizer), n_positions=64, bos_token_id=eos, eos_token_id=eos
    )
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    kg = kg_of(tmp_path, ROWS)
    app = typer.Typer()
    app.add_typer(load_kg_app(), name="kg")
    res = CliRunner().invoke(app, ["kg", "show", kg.source, "--model", str(d), "--tail-scoring", "last", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["model"]["n"] == 4 and s["model"]["tail_scoring"] == "last" and math.isfinite(s["model"]["tail_ppl"])
    assert s["tail_tokens"]["1"] == 3
    bad = CliRunner().invoke(app, ["kg", "show", kg.source, "--model", str(tmp_path / "no-model")])
    assert bad.exit_code == 2 and "no-model" in bad.stderr
