"""Bad KG input: a KGError whose message names the file and line (or item / row) and the field."""

from __future__ import annotations

import json
import re
import time

import pytest
import typer
from typer.testing import CliRunner

from _kg_fixtures import load_kg_app, need_paper_data, tiny_tokenizer  # noqa: F401 (fixture)
from kcs_lens.data.loaders import load_kg, split_control
from kcs_lens.data.templates import load_templates
from kcs_lens.data.text import load_text_blocks
from kcs_lens.data.triplets import KGError, TripletSet

GOOD = '{"head": "car", "relation": "IsA", "tail": "vehicle"}'


def write(path, text):
    path.write_text(text)
    return path


def test_malformed_json_line(tmp_path):
    f = write(tmp_path / "bad.jsonl", GOOD + "\n" + '{"head": "apple", "relation": "IsA", "tail": \n')
    with pytest.raises(KGError, match=rf"{re.escape(str(f))}:2: malformed JSON line"):
        load_kg(f)


def test_malformed_json_array(tmp_path):
    f = write(tmp_path / "bad.json", "[\n" + GOOD + ",\n  {oops}\n]")
    with pytest.raises(KGError, match=rf"{re.escape(str(f))}:3: malformed JSON"):
        load_kg(f)


def test_missing_field_names_line_and_field(tmp_path):
    f = write(tmp_path / "m.jsonl", GOOD + "\n\n" + '{"head": "apple", "relation": "IsA"}\n')
    with pytest.raises(KGError, match=rf"{re.escape(str(f))}:3: missing field 'tail'"):
        load_kg(f)


def test_missing_relation_field(tmp_path):
    f = write(tmp_path / "m.jsonl", '{"head": "apple", "tail": "fruit"}\n')
    with pytest.raises(KGError, match=rf"{re.escape(str(f))}:1: missing field 'relation' or 'rel'"):
        load_kg(f)


def test_non_string_field(tmp_path):
    f = write(tmp_path / "m.jsonl", '{"head": 3, "relation": "IsA", "tail": "fruit"}\n')
    with pytest.raises(KGError, match=rf"{re.escape(str(f))}:1: field 'head' must be a non-empty string"):
        load_kg(f)


def test_missing_field_in_paper_json_names_item(tmp_path):
    rows = [{"head": "a.n.01", "tail": "b.n.01", "best_gpt2_input": "An a is a b"}, {"head": "c.n.01", "best_gpt2_input": "A c is a d"}]
    f = write(tmp_path / "x_best_format.json", json.dumps(rows))
    with pytest.raises(KGError, match=rf"{re.escape(str(f))}: item 1: missing field 'tail'"):
        load_kg(f)


def test_tail_not_suffix_of_text(tmp_path):
    f = write(tmp_path / "s.jsonl", GOOD + "\n" + '{"head": "car", "relation": "IsA", "tail": "vehicle", "text": "A car is a vehicle."}\n')
    with pytest.raises(KGError, match=rf"{re.escape(str(f))}:2: field 'text' .* does not end with the tail 'vehicle'"):
        load_kg(f)


def test_csv_missing_column_and_bad_row(tmp_path):
    f = write(tmp_path / "a.csv", "head,relation\ncar,IsA\n")
    with pytest.raises(KGError, match=rf"{re.escape(str(f))}:1: missing column\(s\) \['tail'\]"):
        load_kg(f)
    g = write(tmp_path / "b.csv", "head,relation,tail,text\ncar,IsA,vehicle,\napple,IsA,fruit,An apple is red\n")
    with pytest.raises(KGError, match=rf"{re.escape(str(g))}:3: field 'text'"):
        load_kg(g)


def test_unknown_relation_without_template(tmp_path):
    f = write(tmp_path / "u.jsonl", GOOD + "\n" + '{"head": "rose", "relation": "SmellsLike", "tail": "apple"}\n')
    with pytest.raises(KGError, match=rf"{re.escape(str(f))}:2: unknown relation 'SmellsLike' has no template"):
        load_kg(f)
    # with a text it needs no template
    g = write(tmp_path / "v.jsonl", '{"head": "rose", "relation": "SmellsLike", "tail": "apple", "text": "A rose smells like an apple"}\n')
    assert load_kg(g)[0].relation == "SmellsLike"


def test_bad_templates_file(tmp_path):
    f = write(tmp_path / "t.json", json.dumps({"IsA": ["{tail} is what {head} is"]}))
    with pytest.raises(KGError, match=rf"{re.escape(str(f))}: relation 'IsA': template .* must end with"):
        load_templates(f)
    g = write(tmp_path / "t.yaml", "IsA: [\n")
    with pytest.raises(KGError, match=rf"{re.escape(str(g))}: cannot parse"):
        load_templates(g)
    h = write(tmp_path / "t.toml", 'IsA = ["{A_head} is {bogus} {tail}"]\n')
    with pytest.raises(KGError, match=r"unknown field\(s\) \['bogus'\]"):
        load_templates(h)


def test_empty_set(tmp_path):
    f = write(tmp_path / "empty.jsonl", "\n\n")
    with pytest.raises(KGError, match=rf"{re.escape(str(f))}: no triplets"):
        load_kg(f)


def test_missing_file_and_unknown_builtin(tmp_path, monkeypatch):
    with pytest.raises(KGError, match=r"nope\.jsonl: no such file or directory"):
        load_kg(tmp_path / "nope.jsonl")
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


def test_hf_local_path_missing(tmp_path):
    with pytest.raises(KGError, match=r"local dataset path .* does not exist"):
        load_kg(f"hf:{tmp_path / 'none.jsonl'}")


def test_hf_row_errors_name_spec_and_row(tmp_path):
    f = write(tmp_path / "d.jsonl", GOOD + "\n" + '{"head": "apple", "relation": "IsA", "tail": "fruit", "text": "Apples are red"}\n')
    with pytest.raises(KGError, match=rf"hf:{re.escape(str(f))} row 1: field 'text'"):
        load_kg(f"hf:{f}")


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
