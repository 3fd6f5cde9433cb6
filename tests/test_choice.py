"""Multiple choice among same-relation tails (kcs_lens.evaluation.choice): the scores equal a hand
computation, distractors come from the same relation with a fixed seed, short relations are
reported, and discovery records and selects on it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kcs_lens.data.triplets import Triplet, TripletSet
from kcs_lens.evaluation.choice import DistractorPool, build_choices, choice_scores, with_tail


def T(h: str, r: str, t: str, text: str | None = None) -> Triplet:
    return Triplet(h, r, t, text or f"A {h} is a {t}")


def test_scores_equal_a_hand_computation(make_tiny_lm):
    lm = make_tiny_lm()
    kg = TripletSet([T("car", "IsA", "vehicle"), T("cat", "IsA", "animal"), T("tree", "IsA", "plant"), T("mat", "IsA", "thing")])
    pool = DistractorPool([kg, TripletSet([T("fish", "IsA", "animal"), T("bird", "IsA", "house")])])
    cs = build_choices(kg, pool, lm.tokenizer, k=3)
    sc = choice_scores(lm, cs, batch_size=2)  # several batches
    hand_sum, hand_mean = [], []
    for i, tails in enumerate(cs.choices):
        t = kg[i]
        for j, tail in enumerate(tails):
            text = t.text if j == 0 else with_tail(t, tail)
            # the context: the choices' common prefix up to a word boundary
            ctx = "A " + t.head + " is"  # tails differ in their article here or right after it
            texts = [t.text if jj == 0 else with_tail(t, c) for jj, c in enumerate(tails)]
            if all(x.startswith(f"A {t.head} is a ") for x in texts):
                ctx += " a"
            ids = [lm.bos_id] + lm.tokenizer.encode(text)
            n_ctx = 1 + len(lm.tokenizer.encode(ctx))
            with torch.no_grad():
                logp = torch.log_softmax(lm(torch.tensor([ids]))[0].double(), -1)
            lps = [float(logp[p - 1, ids[p]]) for p in range(n_ctx, len(ids))]
            hand_sum.append(sum(lps))
            hand_mean.append(sum(lps) / len(lps))
    assert torch.allclose(sc.sum_logprob.double(), torch.tensor(hand_sum, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(sc.mean_logprob.double(), torch.tensor(hand_mean, dtype=torch.float64), atol=1e-5)
    # accuracy: the true tail (first choice) has the best score
    best = lambda xs: [max(range(len(c)), key=lambda j: xs[off + j]) == 0 for off, c in _offsets(cs.choices)]
    assert sc.accuracy() == pytest.approx(sum(best(hand_sum)) / len(cs.choices))
    assert sc.accuracy(norm=True) == pytest.approx(sum(best(hand_mean)) / len(cs.choices))
    probs = []
    for off, c in _offsets(cs.choices):
        e = [math.exp(hand_sum[off + j]) for j in range(len(c))]
        probs.append(e[0] / sum(e))
    assert sc.headline()["mc_prob"] == pytest.approx(sum(probs) / len(probs), abs=1e-5)
    assert sc.headline()["mc_chance"] == pytest.approx(1 / 3)
    assert cs.rows.shape[0] < len(cs.item)  # choices that extend the same tokens shared a row


def _offsets(choices):
    off = 0
    for c in choices:
        yield off, c
        off += len(c)


def test_article_follows_the_tail_and_is_scored_in_every_choice(tiny_tokenizer):
    t = T("car", "IsA", "vehicle")
    assert with_tail(t, "animal") == "A car is an animal"
    assert with_tail(Triplet("car", "IsA", "vehicle", "A car is a kind of vehicle"), "animal") == "A car is a kind of animal"
    pool = DistractorPool([TripletSet([t, T("cat", "IsA", "animal")])])
    cs = build_choices([t], pool, tiny_tokenizer, k=2)
    assert cs.choices == [["vehicle", "animal"]]
    # the context stops before the article: " a vehicle" vs " an animal", each scored token by token
    n_tok = torch.bincount(cs.tok_choice, minlength=2)
    assert all(int(n) >= 2 for n in n_tok)


def test_distractors_same_relation_fixed_seed_and_never_true():
    facts = [
        T("cathedral", "IsA", "church"),
        T("church", "IsA", "building"),
        T("building", "IsA", "structure"),
        T("house", "IsA", "building"),
        T("car", "IsA", "vehicle"),
        T("cat", "IsA", "animal"),
        T("apple", "IsA", "fruit"),
        T("hammer", "IsA", "tool"),
        T("bread", "IsA", "food"),
        T("red", "IsA", "color"),
        Triplet("cathedral", "AtLocation", "city", "A cathedral is in a city"),
        Triplet("car", "AtLocation", "garage", "A car is in a garage"),
    ]
    pool = DistractorPool([TripletSet(facts)])
    d = pool.distractors(facts[0], k=5, seed=0)
    assert len(d) == 4 and len(set(d)) == 4
    # other IsA tails only, never one the pool says is true of the head (church, and building and
    # structure through the IsA chain) nor the head itself
    assert set(d) <= {"vehicle", "animal", "fruit", "tool", "food", "color"}
    # fixed seed: the same draw from a pool built in another order; other seeds draw others
    assert DistractorPool([TripletSet(facts[::-1])]).distractors(facts[0], k=5, seed=0) == d
    assert len({tuple(pool.distractors(facts[0], k=5, seed=s)) for s in range(6)}) > 1
    assert pool.distractors(facts[-2], k=5, seed=0) == ["garage"]  # the relation's only other tail


def test_fewer_tails_than_k_is_reported(tiny_tokenizer):
    kg = TripletSet([T("car", "IsA", "vehicle"), T("cat", "IsA", "animal"), T("tree", "IsA", "plant")])
    lonely = Triplet("car", "AtLocation", "garage", "A car is in a garage")
    pool = DistractorPool([kg, TripletSet([lonely])])
    cs = build_choices(TripletSet([*kg, lonely]), pool, tiny_tokenizer, k=5)
    assert cs.n_choices.tolist() == [3, 3, 3]  # 2 other IsA tails each
    d = cs.describe()
    assert {k: d[k] for k in ("k", "n_scored", "n_short", "n_skipped")} == {"k": 5, "n_scored": 3, "n_short": 3, "n_skipped": 1}
    assert d["chance"] == pytest.approx(1 / 3)
    assert cs.skipped == [3]


def test_discovery_records_and_selects_on_multiple_choice(tmp_path, tiny_kg, tiny_model_dir):
    from conftest import tiny_run_kwargs

    from kcs_lens.discovery.config import build_config
    from kcs_lens.discovery.runner import discover
    from kcs_lens.discovery.selection import selection_rule

    para = tmp_path / "para.jsonl"  # the TargetKG in another wording
    rows = [json.loads(x) for x in tiny_kg["target"].read_text().splitlines()]
    para.write_text("".join(json.dumps({**r, "text": r["text"].replace(" is a ", " is a kind of ")}) + "\n" for r in rows))
    kw = tiny_run_kwargs(tiny_kg, tiny_model_dir) | dict(control_test_size=4, select_min_target_ratio=0.0, paraphrases=str(para))
    s = discover(out=tmp_path / "r", **kw)
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        for k in ("target_mc", "target_mc_norm", "control_mc", "control_test_mc", "control_test_ratio", "paraphrases_mc"):
            assert 0 <= r[k] and math.isfinite(r[k]), k
        assert 0 <= r["paraphrases_top1"] <= 1 and 0 <= r["target_lens_top10_any"] <= 1
    assert s["data"]["paraphrases"] == 6 and "paraphrases_ratio" in s["ratio"]
    assert s["data"]["control_val"] == 6 and s["data"]["control_test"] == 4
    assert s["multiple_choice"]["target"]["k"] == 5 and s["multiple_choice"]["target"]["chance"] == pytest.approx(0.2)
    assert (
        {"target_mc", "control_mc", "control_test_mc", "control_test_ppl"}
        <= set(s["remaining"])
        <= set(s["original"]) | {"target_mc"}
    )
    cfg_json = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg_json["multiple_choice"]["control_test"]["n_scored"] == 4
    rule = selection_rule(build_config(**kw, select_max_target_mc=0.3, select_min_control_mc=0.9))
    assert rule["max_target_mc"] == 0.3 and rule["min_control_mc"] == 0.9 and "multiple-choice" in rule["rule"]
    assert "max_target_mc" not in selection_rule(build_config(**kw))  # unset: the rule is what it was


def test_selection_on_multiple_choice_records():
    from kcs_lens.discovery.config import build_config
    from kcs_lens.discovery.selection import meets_criteria, select_checkpoint

    base = dict(target_ratio=20.0, control_ratio=1.0, lm_ratio=1.0, target_top1=0.0)
    recs = [
        {"step": 10, "sparsity": 0.97, **base, "target_mc": 0.2, "control_mc": 1.0},
        {"step": 20, "sparsity": 0.98, **base, "target_mc": 0.6, "control_mc": 1.0},
        {"step": 30, "sparsity": 0.99, **base, "target_mc": 0.1, "control_mc": 0.8},
    ]
    assert select_checkpoint(recs, build_config(recipe="paper"))[0]["step"] == 30
    assert select_checkpoint(recs, build_config(recipe="paper", select_min_control_mc=0.95))[0]["step"] == 20
    both = build_config(recipe="paper", select_min_control_mc=0.95, select_max_target_mc=0.35)
    assert select_checkpoint(recs, both)[0]["step"] == 10
    assert not meets_criteria({"step": 1, "sparsity": 1.0, **base}, both)  # an older record cannot be checked
    with pytest.raises(Exception, match="--select-max-target-mc needs multiple choice"):
        build_config(recipe="paper", mc_choices=0, select_max_target_mc=0.3)


def test_training_distractors_follow_the_choice_rule(tiny_tokenizer):
    """The distractor term's pool (objective/distractors.py) and the multiple choice share one rule
    (data/tail_pool.py): a hypernym of the head, reached through the relation, is never a distractor
    of the term either, and every tail the rule allows is drawn from."""
    from kcs_lens.data.triplets import tokenize_triplets
    from kcs_lens.objective.distractors import DistractorPools, row_key

    target = TripletSet([T("cat", "IsA", "mammal"), T("oak", "IsA", "tree")])
    control = TripletSet([T("mammal", "IsA", "animal"), T("dog", "IsA", "pet"), T("fern", "IsA", "plant")])
    batch = tokenize_triplets(target, tiny_tokenizer)
    pools = DistractorPools.build(list(target), batch, control, tiny_tokenizer, k=9, seed=0)
    rule = DistractorPool([target, control])
    first = lambda t, tail: tiny_tokenizer.encode(f"{t.prefix} {tail}")[len(tiny_tokenizer.encode(t.prefix))]
    for i, t in enumerate(target):
        got = set(pools.pools[row_key(batch, i)].tolist())
        own = first(t, t.tail)
        assert got == {first(t, c) for c in rule.candidates(t)} - {own}
    cat = target[0]
    assert "animal" not in rule.candidates(cat) and {"pet", "plant", "tree"} <= set(rule.candidates(cat))
    assert first(cat, "animal") not in set(pools.pools[row_key(batch, 0)].tolist())
