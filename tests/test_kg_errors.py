"""Bad KG input: a KGError whose message names the file and line (or item / row) and the field."""

from __future__ import annotations

import json
import re
import time

import pytest
import typer
from _kg_fixtures import load_kg_app, need_paper_data, tiny_tokenizer  # noqa: F401 (fixture)
from typer.testing import CliRunner

from kcs_lens.data.loaders import load_kg
from kcs_lens.data.templates import load_templates
from kcs_lens.data.text import load_text_blocks
from kcs_lens.data.triplets import TripletSet, split_control
from kcs_lens.errors import KGError

# no TransformerLens code runs here: scripts/test.sh runs it on one TL line only
pytestmark = pytest.mark.tl_independent


GOOD = '{"head": "car", "relation": "IsA", "tail": "vehicle"}'


def write(path, text):
    path.write_text(text)
    return path


PAPER_ROWS = [
    {"head": "a.n.01", "tail": "b.n.01", "best_gpt2_input": "An a is a b"},
    {"head": "c.n.01", "best_gpt2_input": "A c is a d"},
]

# (case, {file name: content}, how to load (kg, hf, templates), the file to load, the message; {f} is that file's path)
CASES = [
    (
        "malformed JSON line",
        {"bad.jsonl": GOOD + "\n" + '{"head": "apple", "relation": "IsA", "tail": \n'},
        "kg",
        "bad.jsonl",
        "{f}:2: malformed JSON line",
    ),
    ("malformed JSON array", {"bad.json": "[\n" + GOOD + ",\n  {oops}\n]"}, "kg", "bad.json", "{f}:3: malformed JSON"),
    (
        "missing field",
        {"m.jsonl": GOOD + "\n\n" + '{"head": "apple", "relation": "IsA"}\n'},
        "kg",
        "m.jsonl",
        "{f}:3: missing field 'tail'",
    ),
    (
        "missing relation",
        {"m.jsonl": '{"head": "apple", "tail": "fruit"}\n'},
        "kg",
        "m.jsonl",
        "{f}:1: missing field 'relation' or 'rel'",
    ),
    (
        "non-string field",
        {"m.jsonl": '{"head": 3, "relation": "IsA", "tail": "fruit"}\n'},
        "kg",
        "m.jsonl",
        "{f}:1: field 'head' must be a non-empty string",
    ),
    (
        "paper JSON item",
        {"x_best_format.json": json.dumps(PAPER_ROWS)},
        "kg",
        "x_best_format.json",
        "{f}: item 1: missing field 'tail'",
    ),
    (
        "tail not a suffix",
        {"s.jsonl": GOOD + "\n" + '{"head": "car", "relation": "IsA", "tail": "vehicle", "text": "A car is a vehicle."}\n'},
        "kg",
        "s.jsonl",
        "{f}:2: field 'text' .* does not end with the tail 'vehicle'",
    ),
    ("CSV missing column", {"a.csv": "head,relation\ncar,IsA\n"}, "kg", "a.csv", r"{f}:1: missing column\(s\) \['tail'\]"),
    (
        "CSV bad row",
        {"b.csv": "head,relation,tail,text\ncar,IsA,vehicle,\napple,IsA,fruit,An apple is red\n"},
        "kg",
        "b.csv",
        "{f}:3: field 'text'",
    ),
    (
        "unknown relation",
        {"u.jsonl": GOOD + "\n" + '{"head": "rose", "relation": "SmellsLike", "tail": "apple"}\n'},
        "kg",
        "u.jsonl",
        "{f}:2: unknown relation 'SmellsLike' has no template",
    ),
    ("empty set", {"empty.jsonl": "\n\n"}, "kg", "empty.jsonl", "{f}: no triplets"),
    ("missing file", {}, "kg", "nope.jsonl", "{f}: no such file or directory"),
    ("hf local path missing", {}, "hf", "none.jsonl", "local dataset path .* does not exist"),
    (
        "hf row",
        {"d.jsonl": GOOD + "\n" + '{"head": "apple", "relation": "IsA", "tail": "fruit", "text": "Apples are red"}\n'},
        "hf",
        "d.jsonl",
        "hf:{f} row 1: field 'text'",
    ),
    (
        "template without tail at end",
        {"t.json": json.dumps({"IsA": ["{tail} is what {head} is"]})},
        "templates",
        "t.json",
        "{f}: relation 'IsA': template .* must end with",
    ),
    ("templates YAML", {"t.yaml": "IsA: [\n"}, "templates", "t.yaml", "{f}:2:1: cannot parse \\(expected the node content"),
    (
        "template field",
        {"t.toml": 'IsA = ["{A_head} is {bogus} {tail}"]\n'},
        "templates",
        "t.toml",
        r"{f}: .*unknown field\(s\) \['bogus'\]",
    ),
]


@pytest.mark.parametrize("case, files, how, target, message", CASES, ids=[c[0] for c in CASES])
def test_bad_kg_input_names_the_source(tmp_path, case, files, how, target, message):
    for name, text in files.items():
        write(tmp_path / name, text)
    f = tmp_path / target
    load = {"kg": lambda: load_kg(f), "hf": lambda: load_kg(f"hf:{f}"), "templates": lambda: load_templates(f)}[how]
    with pytest.raises(KGError, match=message.replace("{f}", re.escape(str(f)))) as e:
        load()
    assert "\n" not in str(e.value)  # one line


def test_relation_with_text_needs_no_template(tmp_path):
    g = write(
        tmp_path / "v.jsonl",
        '{"head": "rose", "relation": "SmellsLike", "tail": "apple", "text": "A rose smells like an apple"}\n',
    )
    assert load_kg(g)[0].relation == "SmellsLike"


def test_missing_file_and_unknown_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("KCS_BUNDLED_DIR", str(tmp_path / "nobundle"))
    with pytest.raises(KGError, match=r"unknown built-in KG 'buildingz'; available: none"):
        load_kg("buildingz")
    (tmp_path / "nobundle" / "kg").mkdir(parents=True)
    write(tmp_path / "nobundle" / "kg" / "target_building.jsonl", GOOD + "\n")
    with pytest.raises(KGError, match=r"unknown built-in KG 'buildingz'; available: building"):
        load_kg("builtin:buildingz")


def test_wordnet_directory_missing(tmp_path):
    missing = tmp_path / "no-wordnet"
    with pytest.raises(KGError, match=rf"WordNet directory {re.escape(str(missing))} does not exist"):
        load_kg(f"wordnet:building.n.01:{missing}")


def test_hf_spec_offline_is_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(KGError, match=r"hf:someone/facts:train: dataset 'someone/facts' needs the Hugging Face Hub"):
        load_kg("hf:someone/facts:train")
    assert time.perf_counter() - t0 < 2.0


def test_text_source_without_a_full_block(tmp_path, tiny_tokenizer):
    f = write(tmp_path / "short.txt", "A car is a vehicle.")
    n = len(tiny_tokenizer.encode("A car is a vehicle."))
    with pytest.raises(KGError, match=rf"short\.txt.*\(train\): {n} tokens, fewer than one block of block_len=512"):
        load_text_blocks(str(f), tiny_tokenizer, heldout_frac=0.01)


def test_split_control_bounds():
    with pytest.raises(KGError, match=r"cannot take 5 validation triplets from a ControlKG of 0"):
        split_control(TripletSet([], "c", "c.jsonl"), 5)


# ---------------------------------------------------------------- CLI


def _app():
    app = typer.Typer()
    app.add_typer(load_kg_app(), name="kg")
    return app


def test_cli_show_bad_file_exits_2(tmp_path):
    f = write(tmp_path / "bad.jsonl", GOOD + "\n{not json}\n")
    res = CliRunner().invoke(_app(), ["kg", "show", str(f)])
    assert res.exit_code == 2
    assert f"{f}:2: malformed JSON line" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_show_paper_file():
    p = need_paper_data()
    res = CliRunner().invoke(
        _app(),
        ["kg", "show", str(p / "conceptnet_lama/targetkg/fruit.jsonl"), "--control", str(p / "conceptnet_lama/controlkg")],
    )
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "triplets: 37" in out and "AtLocation" in out and "template '{A_head} is in {a_tail}'" in out
    assert "overlap with control controlkg (6061 triplets): 10" in out


def test_cli_show_json_with_model_name():
    p = need_paper_data()
    f = p / "wordnet/targetkg/building.n.01_best_format.json"
    res = CliRunner().invoke(_app(), ["kg", "show", str(f), "--model-name", "gpt2-large", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["n_triplets"] == 11 and s["relations"] == {"IsA": 11}
    assert s["templates"] == {"field 'best_gpt2-large_input'": 11}
