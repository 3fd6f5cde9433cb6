"""kcs-lens downstream (issue 10): question formats, links and groups, finetuning on identical
batches with removed weights kept at zero, the statistics, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _eval_fixtures import cli, write_run
from conftest import requires_bundled

from kcs_lens.downstream import FinetuneSettings, downstream, load_questions
from kcs_lens.downstream.finetune import Split, encode, finetune, removed
from kcs_lens.downstream.groups import assign
from kcs_lens.downstream.stats import mcnemar
from kcs_lens.downstream.tasks import link, load_links
from kcs_lens.errors import TaskError
from kcs_lens.model.loading import available_backends
from kcs_lens.stats import bootstrap_ci, bootstrap_indices

pytest_plugins = ["_eval_fixtures"]  # tiny_lm (session)

PAPER_CSQA = Path(__file__).resolve().parents[2] / "shared" / "paper-data" / "csqa"
if not PAPER_CSQA.is_dir():
    PAPER_CSQA = Path("/work/shared/paper-data/csqa")
LABELS = ["A", "B", "C", "D"]
WORDS = ["vehicle", "building", "animal", "thing", "plant", "bird", "fish", "tree"]


def hf_row(qid, head, tail, *, triplet=True, answer_at=0):
    others = [w for w in WORDS if w != tail][:3]
    texts = others[:answer_at] + [tail] + others[answer_at:]
    row = {
        "id": qid,
        "question": f"Which category does a {head} belong to?",
        "question_concept": head,
        "choices": {"label": LABELS, "text": texts},
        "answerKey": LABELS[answer_at],
    }
    if triplet:
        row["triplet"] = {"head": head, "relation": "IsA", "tail": tail}
    return row


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory, tiny_kg) -> dict[str, Path]:
    """Questions about the tiny KGs: train from ControlKG-train facts, test from the TargetKG, the
    ControlKG validation part (its first 10 facts) and 4 unlinked questions."""
    d = tmp_path_factory.mktemp("task")
    kg = lambda k: [json.loads(x) for x in tiny_kg[k].read_text().splitlines()]
    target, control = kg("target"), kg("control")
    mk = lambda prefix, rows: [hf_row(f"{prefix}{i}", r["head"], r["tail"], answer_at=i % 4) for i, r in enumerate(rows)]
    train = mk("tr", control[10:])
    test = mk("t", target) + mk("k", control[:10]) + [hf_row(f"u{i}", f"car{i}x", "thing", answer_at=i % 4) for i in range(4)]
    return {"train": write_jsonl(d / "train.jsonl", train), "test": write_jsonl(d / "test.jsonl", test)}


# ------------------------------------------------------------------------------------------
# Formats
# ------------------------------------------------------------------------------------------
def test_hf_schema_and_original_schema_load_the_same_question(tmp_path):
    hf = hf_row("q1", "cathedral", "church", answer_at=2)
    orig = {
        "answerKey": "C",
        "id": "q1",
        "question": {
            "question_concept": "cathedral",
            "choices": [{"label": l, "text": t} for l, t in zip(hf["choices"]["label"], hf["choices"]["text"])],
            "stem": hf["question"],
        },
    }
    a = load_questions(write_jsonl(tmp_path / "hf.jsonl", [hf]))[0]
    b = load_questions(write_jsonl(tmp_path / "orig.jsonl", [orig]))[0]
    assert (a.id, a.question, a.choices, a.labels, a.answer, a.concept) == (
        b.id,
        b.question,
        b.choices,
        b.labels,
        b.answer,
        b.concept,
    )
    assert a.choices[a.answer] == "church" and a.answer == 2
    assert a.keys == {("cathedral", "IsA".lower(), "church")} and b.keys == frozenset()
    # a JSON array file is read too
    (tmp_path / "arr.json").write_text(json.dumps([hf]))
    assert load_questions(tmp_path / "arr.json")[0].answer == 2


def test_hf_spec_local_file_and_offline_hub_error(tmp_path):
    f = write_jsonl(tmp_path / "v.jsonl", [hf_row("a", "car", "vehicle"), hf_row("b", "cat", "animal")])
    qs = load_questions(f"hf:{f}:validation")
    assert [q.id for q in qs] == ["a", "b"]
    with pytest.raises(TaskError, match=r"hf:tau/commonsense_qa:validation.*offline"):
        load_questions("hf:tau/commonsense_qa:validation")


@pytest.mark.parametrize(
    "row, match",
    [
        ({**hf_row("x", "car", "vehicle"), "answerKey": "Z"}, r"bad\.jsonl:2: answerKey 'Z' is not one of the labels"),
        ({**hf_row("x", "car", "vehicle"), "answerKey": ""}, r"bad\.jsonl:2: answerKey '' .*unlabelled"),
        (
            {**hf_row("x", "car", "vehicle"), "choices": {"label": ["A", "B", "C"], "text": ["a", "b"]}},
            r"bad\.jsonl:2: choices has 2 texts but 3 labels",
        ),
        ({k: v for k, v in hf_row("x", "car", "vehicle").items() if k != "question"}, r"bad\.jsonl:2: missing field 'question'"),
        ({**hf_row("x", "car", "vehicle"), "triplet": {"head": "car"}}, r"bad\.jsonl:2: triplet: missing field 'tail'"),
        (hf_row("ok", "cat", "animal"), r"bad\.jsonl:2: duplicate question id 'ok' \(first at .*bad\.jsonl:1\)"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, match):
    f = write_jsonl(tmp_path / "bad.jsonl", [hf_row("ok", "cat", "animal"), row])
    with pytest.raises(TaskError, match=match):
        load_questions(f)


def test_malformed_line_and_missing_file(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(hf_row("a", "car", "vehicle")) + "\n{not json\n")
    with pytest.raises(TaskError, match=r"bad\.jsonl:2: malformed JSON line"):
        load_questions(f)
    with pytest.raises(TaskError, match="no such question file"):
        load_questions(tmp_path / "missing.jsonl")
    with pytest.raises(TaskError, match="bundled:train or bundled:test"):
        load_questions("bundled:dev")


@pytest.mark.paperdata
@pytest.mark.skipif(not PAPER_CSQA.is_dir(), reason="../shared/paper-data/csqa is absent")
def test_paper_csqa_files_link_questions_by_id(tmp_path):
    from kcs_lens.data.loaders import load_kg
    from kcs_lens.data.templates import canonical_relation
    from kcs_lens.data.triplets import triplet_key
    from kcs_lens.downstream.groups import kg_links

    rows = json.loads((PAPER_CSQA / "csqa1_targetkg_best_format.json").read_text())[:3]
    qs = [hf_row(r["id"], "x", "vehicle", triplet=False) for r in rows] + [hf_row("unknown-id", "y", "vehicle", triplet=False)]
    questions = load_questions(write_jsonl(tmp_path / "q.jsonl", qs))
    links = load_links([str(PAPER_CSQA / "csqa1_targetkg_best_format.json")])
    linked = link(questions, links)
    for q, r in zip(linked, rows):
        assert triplet_key(r["head"], canonical_relation(r["rel"]), r["tail"]) in q.keys
    assert linked[-1].keys == frozenset()
    # a run whose TargetKG is the paper file links its questions by the rows' ids, no --links needed
    ts = load_kg(str(PAPER_CSQA / "csqa1_targetkg_best_format.json"))
    own = kg_links(ts)
    assert all(r["id"] in own for r in rows) and assign(link(questions, own), ts.keys(), set())[:3] == ["removed"] * 3
    # the paper's ControlKG rows carry no question ids: a clear error, not silence
    with pytest.raises(TaskError, match="no row carries a question 'id'"):
        load_links([str(PAPER_CSQA / "csqa_controlkg_best_format_val.json")])


def test_groups_compare_facts_like_disjoint(tmp_path):
    from kcs_lens.data.triplets import triplet_key

    qs = load_questions(
        write_jsonl(
            tmp_path / "q.jsonl",
            [
                {**hf_row("r", "car", "vehicle"), "triplet": {"head": " Car ", "rel": "isa", "tail": "VEHICLE"}},
                hf_row("k", "cat", "animal"),
                hf_row("u", "tree", "plant"),
                hf_row("n", "fish", "animal", triplet=False),
            ],
        )
    )
    target = {triplet_key("car", "IsA", "vehicle")}
    control = {triplet_key("cat", "IsA", "animal"), triplet_key("car", "IsA", "vehicle")}
    assert assign(qs, target, control) == ["removed", "kept", "unlinked", "unlinked"]


# ------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------
def test_mcnemar_exact_on_a_hand_computed_table():
    # 10 questions: 2 right->wrong (b), 8 wrong->right (c) (+ 3 right both, 1 wrong both)
    before = np.array([1, 1] + [0] * 8 + [1, 1, 1, 0])
    after = np.array([0, 0] + [1] * 8 + [1, 1, 1, 0])
    r = mcnemar(before, after)
    assert (r["b"], r["c"]) == (2, 8)
    assert r["p"] == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 2 * P(Bin(10, .5) <= 2) = 0.109375
    assert mcnemar(before, before)["p"] == 1.0
    assert mcnemar(np.ones(6), np.zeros(6))["p"] == pytest.approx(2 / 64)


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    v = (np.random.default_rng(0).random(53) < 0.7).astype(float)
    a = bootstrap_ci(v, bootstrap_indices(len(v), 1000, 7))
    b = bootstrap_ci(v, bootstrap_indices(len(v), 1000, 7))
    assert a == b and not np.array_equal(bootstrap_indices(len(v), 1000, 7), bootstrap_indices(len(v), 1000, 8))
    assert a[0] <= v.mean() <= a[1] and 0 <= a[0] < a[1] <= 1
    assert bootstrap_ci(np.ones(5), bootstrap_indices(5, 200, 0)) == [1.0, 1.0]


# ------------------------------------------------------------------------------------------
# Finetuning
# ------------------------------------------------------------------------------------------
def _split(lm, tiny_task) -> Split:
    train = load_questions(tiny_task["train"])
    test = load_questions(tiny_task["test"])
    return Split(encode(train[:24], lm), encode(train[24:], lm), encode(test, lm))


def _sub(lm, density, seed=0):
    from kcs_lens.masks.granularity import mask_shape
    from kcs_lens.masks.mask_config import MaskConfig
    from kcs_lens.masks.subnetwork import Subnetwork

    mc = MaskConfig((2, 3))
    g = torch.Generator().manual_seed(seed)
    logits = {
        n: torch.where(torch.rand(mask_shape(lm.shape, n.split(".")[-1], "weight"), generator=g) < density, 3.0, -3.0)
        for n in mc.model_names(lm.shape)
    }
    return Subnetwork(logits, mc, lm.shape, {"model_fingerprint": lm.fingerprint()})


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("mode", ["head", "lm"])
def test_same_seed_same_result_and_same_batches_across_models(make_tiny_lm, tiny_task, backend, mode):
    lm = make_tiny_lm(backend)
    data = _split(lm, tiny_task)
    s = FinetuneSettings(mode=mode, epochs=2, batch_size=8, lr=1e-3)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    a = finetune(lm, data, s, seed=1)
    b = finetune(lm, data, s, seed=1)
    assert np.array_equal(a["correct"], b["correct"]) and a["history"] == b["history"] and a["best_epoch"] == b["best_epoch"]
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "finetuning must leave the model as it was"
    rem = finetune(lm, data, s, seed=1, removal=_sub(lm, 0.3))
    other = finetune(lm, data, s, seed=2)
    assert a["order_sha"] == rem["order_sha"] != other["order_sha"]
    assert a["steps"] == rem["steps"] == 2 * 3  # 24 questions, batches of 8, 2 epochs


@pytest.mark.parametrize("backend", available_backends())
def test_full_finetuning_keeps_removed_weights_at_zero(make_tiny_lm, tiny_task, backend):
    lm = make_tiny_lm(backend)
    sub = _sub(lm, 0.2)
    data = _split(lm, tiny_task)
    orig = {n: lm.weight(n) for n in sub.logits}
    seen = {}

    def inspect(m):
        for n, b in sub.full_binary().items():
            site = m.site(n)
            eff = site.from_native(getattr(site.module, site.attr).detach())  # the weight the forward uses
            seen[n] = (eff[b].abs().max().item(), (eff[~b] - orig[n][~b]).abs().max().item())

    finetune(lm, data, FinetuneSettings(mode="full", epochs=1, batch_size=8, lr=1e-2), seed=0, removal=sub, inspect=inspect)
    assert seen and all(zero == 0.0 for zero, _ in seen.values())
    assert any(moved > 0 for _, moved in seen.values()), "the other weights were trained"
    assert all(torch.equal(lm.weight(n), orig[n]) for n in orig)


def test_remaining_model_is_evaluates_removal(tiny_lm, tiny_kg, tiny_model_dir, tmp_path):
    from kcs_lens.discovery.rundir import load_run

    run = write_run(tmp_path / "r", tiny_lm, tiny_kg, tiny_model_dir, density=0.1)
    sub = load_run(run).subnetwork
    tokens = tiny_lm.to_tokens(["A car is a vehicle", "A cat is an animal"])
    with sub.applied(tiny_lm, keep="remaining"):  # what evaluate's Evaluator.scores uses
        ref = tiny_lm(tokens)
        for n, b in sub.full_binary().items():
            site = tiny_lm.site(n)
            eff = site.from_native(getattr(site.module, site.attr).detach())
            assert torch.equal(eff, torch.where(b, 0.0, tiny_lm.weight(n)))
    with removed(tiny_lm, sub):
        got = tiny_lm(tokens)
    assert torch.equal(ref, got) and not torch.allclose(got, tiny_lm(tokens))


# ------------------------------------------------------------------------------------------
# The experiment
# ------------------------------------------------------------------------------------------
def test_zero_subnetwork_gives_the_original_accuracies_exactly(tiny_lm, tiny_kg, tiny_model_dir, tiny_task, tmp_path):
    run = write_run(tmp_path / "r", tiny_lm, tiny_kg, tiny_model_dir, density=0.0)
    res = downstream(
        [run],
        train=str(tiny_task["train"]),
        test=str(tiny_task["test"]),
        epochs=3,
        batch_size=8,
        seeds="1,2",
        baseline_draws=1,
        lens_model=tiny_lm,
        log=lambda m: None,
    )
    assert res["groups"] == {"removed": 6, "kept": 10, "unlinked": 4}
    for g in ("removed", "kept", "unlinked"):
        o, r, x = (res["models"][m][g] for m in ("original", "remaining", "random"))
        assert o["per_seed"] == r["per_seed"]
        assert [e["accuracy"] for e in x["per_seed"]] == [e["accuracy"] for e in o["per_seed"]]  # nothing removed either
        assert o["accuracy"] == r["accuracy"] == x["accuracy"] and o["ci"][0] <= o["accuracy"] <= o["ci"][1]
        assert res["differences"]["remaining"][g]["difference"] == 0.0
        assert all(e["mcnemar"] == {"b": 0, "c": 0, "p": 1.0} for e in res["differences"]["remaining"][g]["per_seed"])
    assert res["same_batches"] and not res["headline"]["held"]
    saved = json.loads((run / "downstream.json").read_text())
    assert set(saved["models"]) == {"original", "remaining", "random"} and set(saved["models"]["original"]) == {
        "removed",
        "kept",
        "unlinked",
    }
    assert saved["settings"]["mode"] == "head" and saved["settings"]["seeds"] == [1, 2] and saved["settings"]["lr"] == 1e-3
    assert (run / "downstream.md").read_text().startswith("# downstream")


def test_refuses_when_no_test_question_needs_the_target(tiny_lm, tiny_kg, tiny_model_dir, tiny_task, tmp_path):
    run = write_run(tmp_path / "r", tiny_lm, tiny_kg, tiny_model_dir)
    rows = [json.loads(x) for x in tiny_task["test"].read_text().splitlines() if not x.startswith('{"id": "t')]
    test = write_jsonl(tmp_path / "test.jsonl", [r for r in rows if not r["id"].startswith("t")])
    with pytest.raises(TaskError, match=r"no question of --test .*test\.jsonl is linked to the TargetKG"):
        downstream([run], train=str(tiny_task["train"]), test=str(test), lens_model=tiny_lm, log=lambda m: None)
    assert not (run / "downstream.json").exists()


def test_cli_end_to_end_and_bad_options(tiny_lm, tiny_kg, tiny_model_dir, tiny_task, tmp_path):
    run = write_run(tmp_path / "r", tiny_lm, tiny_kg, tiny_model_dir, density=0.05)
    common = ["--train", tiny_task["train"], "--test", tiny_task["test"], "--no-progress"]
    r = cli(
        "downstream",
        run,
        *common,
        "--finetune",
        "lm",
        "--epochs",
        "1",
        "--seeds",
        "3",
        "--baseline-draws",
        "1",
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "o" / "downstream.json").read_text())
    assert res["groups"]["removed"] == 6 and res["settings"]["mode"] == "lm" and len(res["training"]["random"]) == 1
    assert "| remaining - original |" in r.output and ("HELD" in r.output)
    # lm style: the models as they are, before finetuning, scored on the same test questions
    from kcs_lens.discovery.rundir import load_run
    from kcs_lens.downstream.finetune import choice_logprob, predict

    assert "| remaining, before finetuning |" in r.output
    qs = load_questions(str(tiny_task["test"]))
    assert [q.id for q in qs] == [e["id"] for e in res["questions"]]
    groups = np.array([e["group"] for e in res["questions"]])
    enc = encode(qs, tiny_lm, FinetuneSettings().prompt)
    for model, sub in (("original", None), ("remaining", load_run(run).subnetwork)):
        with removed(tiny_lm, sub):
            right = predict(enc, lambda seqs: choice_logprob(tiny_lm, enc, seqs, False), 64)
        for g in ("removed", "kept", "unlinked"):
            assert res["before_finetuning"][model][g] == pytest.approx(float(right[groups == g].mean())), (model, g)
    bad = [
        (["--finetune", "adapter"], "--finetune 'adapter'"),
        (["--seeds", "1,x"], "--seeds '1,x'"),
        (["--seeds", "1,1"], "distinct"),
        (["--val-fraction", "1.5"], "--val-fraction"),
        (["--task", "bundled"], "--task and --train/--test"),
        (["--lm-score", "max"], "--lm-score"),
        (["--bootstrap", "10"], "--bootstrap"),
    ]
    for extra, msg in bad:
        r = cli("downstream", run, *common, *extra)
        assert r.exit_code == 2 and r.output.strip().startswith("error:") and msg in r.output, (extra, r.output)
    r = cli("downstream", run, run, *common)
    assert r.exit_code == 2 and "--out" in r.output
    r = cli("downstream", tmp_path / "nope", *common)
    assert r.exit_code == 2 and "no such run directory" in r.output
    r = cli("downstream", run, "--train", tmp_path / "missing.jsonl", "--test", tiny_task["test"])
    assert r.exit_code == 2 and "missing.jsonl" in r.output


@requires_bundled
def test_bundled_task_is_shipped():
    from kcs_lens.data.loaders import load_kg
    from kcs_lens.downstream.tasks import bundled_task_dir

    train, test = load_questions("bundled:train"), load_questions("bundled:test")
    manifest = json.loads((bundled_task_dir() / "MANIFEST.json").read_text())
    assert len(train) == manifest["train"]["control"] and len(test) == sum(manifest["test"].values())
    assert all(q.keys and len(q.choices) == 5 for q in train + test)
    templates = (" is a kind of ", " is a type of ", " is an example of ")
    assert not any(t in q.question for q in test for t in templates)
    control, val = load_kg("control").keys(), load_kg("control-val").keys()
    assert all(q.keys <= control for q in train)  # train questions: ControlKG-train facts only
    targets = set().union(*(load_kg(n).keys() for n in ("building", "location", "change", "communication", "fruit")))
    assert set().union(*(q.keys for q in test)) == targets | val


@requires_bundled
@pytest.mark.slow
def test_bundled_task_runs_offline(tmp_path):
    from kcs_lens.discovery.config import build_config
    from kcs_lens.masks.granularity import mask_shape
    from kcs_lens.masks.mask_config import MaskConfig, resolve_layers
    from kcs_lens.masks.subnetwork import Subnetwork
    from kcs_lens.model.loading import load_model

    test = load_questions("bundled:test")
    lm = load_model("bundled")
    cfg = build_config(model="bundled", target_kg="building", seed=84)
    mc = MaskConfig(resolve_layers(cfg.layers, lm.shape.n_layers), tuple(cfg.matrices), cfg.granularity)
    g = torch.Generator().manual_seed(0)
    logits = {
        n: torch.where(torch.rand(mask_shape(lm.shape, n.split(".")[-1], "weight"), generator=g) < 0.02, 3.0, -3.0)
        for n in mc.model_names(lm.shape)
    }
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "model_fingerprint": lm.fingerprint()}))
    Subnetwork(logits, mc, lm.shape, {"model_fingerprint": lm.fingerprint()}).save(run / "subnetwork.safetensors")
    r = cli("downstream", run, "--task", "bundled", "--epochs", "1", "--seeds", "1", "--baseline-draws", "1", "--no-progress")
    assert r.exit_code == 0, r.output
    res = json.loads((run / "downstream.json").read_text())
    kept = cfg.control_test_size  # every ControlKG test fact of the bundled KG has a question
    assert res["groups"] == {"removed": 30, "kept": kept, "unlinked": len(test) - 30 - kept}
