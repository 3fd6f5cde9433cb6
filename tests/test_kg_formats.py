"""Every KG format loads: canonical JSONL/CSV, the paper's files, LAMA, hf: datasets, built-in sets."""

from __future__ import annotations

import json
import warnings

import pytest
from _kg_fixtures import need_paper_data, tiny_tokenizer  # noqa: F401 (fixture)

from kcs_lens.data.loaders import (
    KGFallbackWarning,
    builtin_names,
    bundled_dir,
    load_kg,
    model_field_name,
    parse_hf_spec,
)
from kcs_lens.data.templates import (
    ISA_TEMPLATES,
    TEMPLATES,
    article_variants,
    fill,
    load_templates,
    merge_templates,
)
from kcs_lens.data.triplets import disjoint, split_control, tokenize_triplets

# no TransformerLens code runs here: scripts/test.sh runs it on one TL line only
pytestmark = pytest.mark.tl_independent


CONCEPTNET_RELATIONS = {
    "AtLocation", "CapableOf", "Causes", "CausesDesire", "Desires", "HasA", "HasPrerequisite", "HasProperty",
    "HasSubevent", "IsA", "MadeOf", "MotivatedByGoal", "NotDesires", "PartOf", "ReceivesAction", "UsedFor",
}  # fmt: skip


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"head": "car", "relation": "IsA", "tail": "vehicle", "text": "A car is a vehicle", "source": "manual"},
    {"head": "apple", "relation": "IsA", "tail": "fruit"},
    {"head": "knife", "relation": "UsedFor", "tail": "cutting", "text": "A knife is used for cutting"},
]


# ---------------------------------------------------------------- canonical JSONL / CSV


def test_canonical_jsonl(tmp_path):
    kg = load_kg(write_jsonl(tmp_path / "toy.jsonl", ROWS))
    assert kg.name == "toy" and len(kg) == 3
    car, apple, knife = kg
    assert car.text == "A car is a vehicle" and car.meta["source"] == "manual"  # extra field kept
    assert apple.text == "An apple is a fruit"  # verbalized by the first IsA template, article by next word
    assert apple.meta["template"] == ISA_TEMPLATES[0] and apple.meta["text_source"] == "template"
    assert knife.relation == "UsedFor" and knife.prefix == "A knife is used for" and knife.tail_str == " cutting"


def test_canonical_accepts_rel_alias_and_json_array(tmp_path):
    rows = [{"head": "car", "rel": "isa", "tail": "vehicle"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    kg = load_kg(tmp_path / "a.json")
    assert kg[0].relation == "IsA" and kg[0].text == "A car is a vehicle"


def test_csv_and_tsv(tmp_path):
    (tmp_path / "kg.csv").write_text("head,relation,tail,text,note\ncar,IsA,vehicle,A car is a vehicle,x\napple,IsA,fruit,,y\n")
    kg = load_kg(tmp_path / "kg.csv")
    assert [t.text for t in kg] == ["A car is a vehicle", "An apple is a fruit"]
    assert kg[1].meta["note"] == "y"
    (tmp_path / "kg.tsv").write_text("head\trelation\ttail\ncar\tIsA\tvehicle\n")
    assert load_kg(tmp_path / "kg.tsv")[0].text == "A car is a vehicle"


def test_directory_concatenates_sorted_files(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    kg = load_kg(tmp_path)
    assert [t.head for t in kg] == ["car", "apple", "knife"] and kg.name == tmp_path.name


# ---------------------------------------------------------------- tokenization of tails


def test_multi_token_tails_all_and_last(tmp_path, tiny_tokenizer):
    rows = [
        {"head": "car", "relation": "IsA", "tail": "vehicle"},
        {"head": "zq", "relation": "IsA", "tail": "zyxwvut"},  # unseen word: several tokens
    ]
    kg = load_kg(write_jsonl(tmp_path / "t.jsonl", rows))
    n_tail = [len(tiny_tokenizer.encode(t.tail_str)) for t in kg]
    assert n_tail[0] == 1 and n_tail[1] > 1
    all_b = tokenize_triplets(kg, tiny_tokenizer)
    assert all_b.score_mask.sum(1).tolist() == n_tail
    last_b = tokenize_triplets(kg, tiny_tokenizer, tail_scoring="last")
    assert last_b.score_mask.sum(1).tolist() == [1, 1]
    # the last scored position predicts the last tail token in both modes
    for b in (all_b, last_b):
        pos = [int(r.nonzero().max()) for r in b.score_mask]
        assert [int(b.targets[i, p]) for i, p in enumerate(pos)] == [tiny_tokenizer.encode(t.tail_str)[-1] for t in kg]


def test_bpe_leading_space_belongs_to_tail(tmp_path, tiny_tokenizer):
    kg = load_kg(write_jsonl(tmp_path / "t.jsonl", ROWS[:1]))
    t = kg[0]
    assert t.prefix == "A car is a" and t.tail_str == " vehicle"
    batch = tokenize_triplets(kg, tiny_tokenizer)
    first = int(batch.score_mask[0].nonzero().min())
    first_tail = int(batch.targets[0, first])
    assert tiny_tokenizer.decode([first_tail]) == " vehicle"  # the space is in the tail's first token
    prefix_ids = batch.tokens[0, 1 : first + 1].tolist()  # after BOS, up to the last prefix token
    assert tiny_tokenizer.decode(prefix_ids) == "A car is a"
    assert not tiny_tokenizer.decode(prefix_ids[-1:]).endswith(" ")


def test_paper_leading_space_text(tmp_path, tiny_tokenizer):
    """The paper's texts sometimes start with a space; prefix and tail split the same way."""
    p = need_paper_data()
    kg = load_kg(p / "wordnet/targetkg/building.n.01_best_format.json", model_name="gpt2-medium")
    t = kg[0]
    assert t.text == " A structure is an artifact" and t.prefix == " A structure is an" and t.tail_str == " artifact"


# ---------------------------------------------------------------- templates


def test_builtin_templates_cover_conceptnet_relations():
    p = need_paper_data()
    used = set()
    for f in (p / "conceptnet_lama").rglob("*_best_format.json"):
        used |= {r["rel"] for r in json.loads(f.read_text())}
    used |= {json.loads(line)["pred"] for line in (p / "conceptnet_lama/targetkg/fruit.jsonl").open()}
    assert used == CONCEPTNET_RELATIONS
    assert used <= set(TEMPLATES)


def test_templates_end_with_tail_and_articles():
    for rel, ts in TEMPLATES.items():
        for t in ts:
            for v in article_variants(t):
                assert fill(v, "apple", "egg").endswith("egg"), (rel, v)
    assert fill("{A_head} is {a_tail}", "hour", "apple") == "An hour is an apple"
    assert fill("{A_head} is {a_tail}", "unicorn", "horse") == "A unicorn is a horse"
    assert TEMPLATES["IsA"][: len(ISA_TEMPLATES)] == ISA_TEMPLATES  # the canonical IsA stays first
    assert set(article_variants("{A_head} is {a_tail}")) == {
        "{A_head} is {a_tail}", "{A_head} is {tail}", "{Head} is {a_tail}", "{Head} is {tail}",
    }  # fmt: skip


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_user_templates_extend_and_replace(tmp_path, suffix):
    body = {
        ".json": json.dumps(
            {"SmellsLike": ["{A_head} smells like {a_tail}"], "IsA": {"templates": ["{Head} = {tail}"], "replace": True}}
        ),
        ".toml": 'SmellsLike = ["{A_head} smells like {a_tail}"]\n[IsA]\ntemplates = ["{Head} = {tail}"]\nreplace = true\n',
        ".yaml": "SmellsLike: ['{A_head} smells like {a_tail}']\nIsA: {templates: ['{Head} = {tail}'], replace: true}\n",
    }[suffix]
    f = tmp_path / f"tpl{suffix}"
    f.write_text(body)
    reg = merge_templates(f)
    assert reg["SmellsLike"] == ["{A_head} smells like {a_tail}"] and reg["IsA"] == ["{Head} = {tail}"]
    assert reg["UsedFor"] == TEMPLATES["UsedFor"]
    rows = [{"head": "rose", "relation": "SmellsLike", "tail": "apple"}, {"head": "car", "relation": "IsA", "tail": "vehicle"}]
    kg = load_kg(write_jsonl(tmp_path / "k.jsonl", rows), templates=f)
    assert [t.text for t in kg] == ["A rose smells like an apple", "Car = vehicle"]
    assert load_templates(f)["SmellsLike"]["replace"] is False


# ---------------------------------------------------------------- the paper's files


def test_paper_best_format_picks_model_field():
    p = need_paper_data()
    f = p / "wordnet/targetkg/building.n.01_best_format.json"
    raw = json.loads(f.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", KGFallbackWarning)  # the field exists: no fallback
        med = load_kg(f, model_name="gpt2-medium")
        hub = load_kg(f, model_name="openai-community/gpt2-medium")
    assert len(med) == 11 and med.name == "building.n.01"
    assert [t.text for t in med] == [r["best_gpt2-medium_input"] for r in raw] == [t.text for t in hub]
    assert [t.text for t in load_kg(f)] == [r["best_gpt2_input"] for r in raw]  # default: gpt2
    assert med[0].head == "structure" and med[0].tail == "artifact" and med[0].relation == "IsA"
    assert med[0].meta["head_synset"] == "structure.n.01" and med[0].meta["text_source"] == "best_gpt2-medium_input"
    assert model_field_name("gpt2-xl") == "best_gpt2-xl_input"


def test_paper_best_format_falls_back_to_gpt2_field():
    p = need_paper_data()
    f = p / "conceptnet_lama/targetkg/fruit_best_format.json"
    raw = json.loads(f.read_text())
    with pytest.warns(KGFallbackWarning, match=r"best_gpt2-medium_input.*best_gpt2_input"):
        kg = load_kg(f, model_name="gpt2-medium")
    assert [t.text for t in kg] == [r["best_gpt2_input"] for r in raw]
    assert kg[0].relation == "HasPrerequisite"


def test_paper_worse_format_is_paraphrases():
    p = need_paper_data()
    para = load_kg(p / "wordnet/targetkg/building.n.01_worse_format.json", model_name="gpt2-medium")
    best = load_kg(p / "wordnet/targetkg/building.n.01_best_format.json")
    assert para.name == "building.n.01-paraphrases" and len(para) == 194
    assert all(t.meta["paraphrase"] for t in para)
    assert para.keys() == best.keys()  # the same triplets, other wordings
    assert len({t.text for t in para}) > len(best)


def test_lama_jsonl_verbalized_by_templates():
    p = need_paper_data()
    kg = load_kg(p / "conceptnet_lama/targetkg/fruit.jsonl")
    raw = [json.loads(line) for line in (p / "conceptnet_lama/targetkg/fruit.jsonl").open()]
    assert len(kg) == 37 and kg.name == "fruit"
    assert [(t.head, t.relation, t.tail) for t in kg] == [(r["sub"], r["pred"], r["obj"]) for r in raw]
    for t in kg:
        assert t.meta["text_source"] == "template" and t.meta["template"] == TEMPLATES[t.relation][0]
        assert t.text == fill(TEMPLATES[t.relation][0], t.head, t.tail)
    assert kg[0].text == "An eating requires an appetite" and kg[0].meta["uuid"]


def test_conceptnet_control_overlaps_fruit_in_exactly_10():
    p = need_paper_data()
    target = load_kg(p / "conceptnet_lama/targetkg/fruit.jsonl")
    control = load_kg(p / "conceptnet_lama/controlkg")  # train + val
    assert len(control) == 5455 + 606
    expected = [t.key for t in control if t.key in target.keys()]
    assert len(expected) == 10
    kept, n = disjoint(target, control)
    assert n == 10 and len(kept) == len(control) - 10
    assert not (kept.keys() & target.keys())
    assert {t.key for t in control} - {t.key for t in kept} == set(expected)
    # the best-format TargetKG gives the same overlap
    assert disjoint(load_kg(p / "conceptnet_lama/targetkg/fruit_best_format.json"), control)[1] == 10


def test_wordnet_control_first_50_are_validation():
    p = need_paper_data()
    control = load_kg(p / "wordnet/controlkg/controlkg_val_best_format.json", model_name="gpt2")
    assert len(control) == 400
    train, val = split_control(control, 50)
    assert len(val) == 50 and len(train) == 350
    assert val.triplets == control.triplets[:50] and train.triplets == control.triplets[50:]
    raw = json.loads((p / "wordnet/controlkg/controlkg_val_best_format.json").read_text())
    assert [t.meta["head_synset"] for t in val] == [r["head"] for r in raw[:50]]


def test_csqa_files_load():
    p = need_paper_data()
    kg = load_kg(p / "csqa/csqa1_targetkg_best_format.json")
    assert len(kg) == 181 and "id" in kg[0].meta


# ---------------------------------------------------------------- Hugging Face datasets (local files)


def test_hf_local_jsonl_file(tmp_path):
    f = write_jsonl(tmp_path / "toy.jsonl", ROWS)
    kg = load_kg(f"hf:{f}:train")
    assert [t.text for t in kg] == ["A car is a vehicle", "An apple is a fruit", "A knife is used for cutting"]
    assert kg.source == f"hf:{f}:train"


def test_hf_local_folder_with_splits(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    write_jsonl(d / "train.jsonl", ROWS[:2])
    write_jsonl(d / "test.jsonl", ROWS[2:])
    assert len(load_kg(f"hf:{d}")) == 2
    test = load_kg(f"hf:{d}:test")
    assert len(test) == 1 and test[0].head == "knife"
    assert len(load_kg(f"hf:{d}", split="test")) == 1


def test_hf_local_paper_file():
    p = need_paper_data()
    kg = load_kg(f"hf:{p / 'wordnet/targetkg/building.n.01_best_format.json'}", model_name="gpt2-medium")
    assert len(kg) == 11 and kg[0].text == " A structure is an artifact"


def test_parse_hf_spec():
    assert parse_hf_spec("hf:owner/name") == ("owner/name", "train")
    assert parse_hf_spec("hf:owner/name:validation") == ("owner/name", "validation")
    assert parse_hf_spec("hf:/a/b.jsonl:test") == ("/a/b.jsonl", "test")
    assert parse_hf_spec("hf:/a/b.jsonl", split="x") == ("/a/b.jsonl", "x")


# ---------------------------------------------------------------- built-in sets


def _fake_bundle(root):
    kg = root / "kg"
    kg.mkdir(parents=True)
    write_jsonl(kg / "target_building.jsonl", ROWS[:1])
    write_jsonl(kg / "target_building_paraphrases.jsonl", [dict(ROWS[0], text="A car is a kind of vehicle")])
    write_jsonl(kg / "control_train.jsonl", ROWS[1:])
    write_jsonl(kg / "control_val.jsonl", ROWS[2:])
    return root


def test_builtin_names_with_a_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("KCS_BUNDLED_DIR", str(_fake_bundle(tmp_path / "bundle")))
    assert set(builtin_names()) == {"building", "building-paraphrases", "control", "control-val"}
    assert load_kg("building")[0].text == "A car is a vehicle"
    assert load_kg("builtin:building").name == "building"
    assert len(load_kg("control")) == 2 and len(load_kg("builtin:control-val")) == 1
    para = load_kg("building-paraphrases")
    assert para[0].text == "A car is a kind of vehicle" and para[0].meta.get("paraphrase")


def test_real_bundle_if_present():
    names = builtin_names()
    if not names:
        pytest.skip(f"no bundled KGs yet in {bundled_dir() / 'kg'}")
    for name in names:
        assert len(load_kg(name)) > 0


def test_wordnet_spec_builds_a_target_kg():
    from pathlib import Path

    try:
        import nltk

        nltk.data.find("corpora/wordnet")
    except (ImportError, LookupError):
        if not Path("/usr/share/wordnet/data.noun").is_file():
            pytest.skip("WordNet is not installed (nltk.download('wordnet') or apt-get install wordnet-base)")
    kg = load_kg("wordnet:building.n.01")
    assert kg.name == "building.n.01" and 10 <= len(kg) <= 40
    assert all(t.relation == "IsA" and t.text.endswith(t.tail) for t in kg)
