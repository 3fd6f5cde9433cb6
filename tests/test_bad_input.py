"""Bad input never costs data and never shows a traceback (issues 15 and 25).

One table: every bad input found by trying the CLI as a new user; each must give exit code 2, one
``error:`` line containing the phrase, and leave every file of the workspace as it was (the run
used as input included; a discover that fails leaves no --out folder), with no progress bar
before the line (a Ray address where nothing listens: within 30 s). Rows that need a model share the tiny fixture model; the damaged
model directories and hostile files are built once (``inputs``). Then a fuzz test feeds
hostile values to every option of ``discover``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_kwargs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kcs_lens import discover
from kcs_lens.cli.main import app

HAS_PROC = Path("/proc/self").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_kg, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    kw = tiny_run_kwargs(tiny_kg, tiny_model_dir) | dict(steps=4, eval_every=2, checkpoint_every=2)
    discover(out=out, **kw)
    return out


class _Crafted:
    """Unpickling this runs ``open(path, "w")``: a state.pt that would create a file when loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, finished_run) -> Path:
    """Read-only inputs of the rows that need more than a few bytes: damaged model directories,
    hostile KG / question files, a run with a crafted state.pt (shared by the rows, never written)."""
    d = tmp_path_factory.mktemp("inputs")
    for name in ("m_trunc", "m_rand", "m_four", "m_list", "m_badjson", "m_notok", "m_vocab"):
        shutil.copytree(tiny_model_dir, d / name)
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    (d / "m_trunc" / "model.safetensors").write_bytes(weights[:50])
    (d / "m_rand" / "model.safetensors").write_bytes(bytes(range(256)) * 16)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (d / "m_four" / "config.json").write_text(json.dumps({**cfg, "n_layer": "four"}))
    (d / "m_list" / "config.json").write_text("[1, 2]")
    (d / "m_badjson" / "config.json").write_text('{"model_type": "gpt2",\n  "n_layer": }')
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        (d / "m_notok" / f).unlink(missing_ok=True)
        (d / "m_vocab" / f).unlink(missing_ok=True)
    (d / "m_vocab" / "vocab.json").write_text("not json")  # vocab.json without merges.txt
    shutil.copytree(tiny_model_dir, d / "m_bin")  # weights as a pickle that would create a file when loaded
    (d / "m_bin" / "model.safetensors").unlink()
    torch.save({"x": _Crafted(str(d / "PWNED"))}, d / "m_bin" / "pytorch_model.bin")
    row = {"head": "car0", "relation": "IsA", "tail": "vehicle"}
    (d / "long.jsonl").write_text(json.dumps({**row, "text": "A car " * 4000 + "is a vehicle"}) + "\n")
    (d / "nested.json").write_text("[" * 200_000)
    (d / "nested.jsonl").write_text("[" * 200_000 + "\n")
    (d / "object.json").write_text(json.dumps({"rows": [row]}, indent=2))
    q = {"question": "A car is a?", "choices": {"label": ["A", "B"], "text": ["vehicle", "fish"]}, "answerKey": "A"}
    (d / "q.jsonl").write_text(json.dumps({**q, "id": "q1"}) + "\n")
    (d / "id15.jsonl").write_text(json.dumps({**q, "id": 1.5}) + "\n")
    (d / "qobject.json").write_text(json.dumps({"questions": [{**q, "id": "q1"}]}, indent=2))
    crafted = d / "crafted"
    shutil.copytree(finished_run, crafted)
    torch.save({"step": _Crafted(str(d / "PWNED"))}, crafted / "checkpoints" / "state.pt")
    return d


def discover_args(tiny_kg, model_dir, **over) -> list[str]:
    kw = tiny_run_kwargs(tiny_kg, model_dir) | over
    args = ["discover", "--no-progress"]
    for k, v in kw.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under root with its size and modification time (ns); lock files
    (rewritten with the pid by every process that takes them) aside."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == ".lock":
            continue
        s = p.lstat()
        out[str(p.relative_to(root))] = (s.st_size if p.is_file() else -1, s.st_mtime_ns if p.is_file() else 0)
    return out


def workspace(ws: Path, run: Path, model: Path, kg: dict[str, Path]) -> dict[str, str]:
    """The inputs of the table's rows, built in ``ws``."""
    shutil.copytree(run, ws / "run")
    base = f'[base]\nmodel = "{model}"\ntarget_kg = "{kg["target"]}"\ncontrol_kg = "{kg["control"]}"\nsteps = 2\n'
    (ws / "study.toml").write_text(base + "[grid]\nseed = [1, 2]\n")
    (ws / "tpu.toml").write_text(base + 'device = "tpu:0"\n[grid]\nseed = [1, 2]\n')
    (ws / "noseed.toml").write_text(base + "[grid]\nseed = []\n")
    trav = ws / "trav"
    trav.mkdir()
    cfg = json.loads((run / "config.json").read_text())["config"]
    plan = {"version": 1, "study": "x", "cells": [{"name": "../trav_escape", "config": cfg}]}
    (trav / "sweep.json").write_text(json.dumps(plan))
    notrun = ws / "notrun"
    (notrun / "sub").mkdir(parents=True)
    (notrun / "thesis.txt").write_text("years of work\n")
    (notrun / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (ws / "typed.yaml").write_text("steps: abc\n")
    (ws / "list.yaml").write_text("- steps\n- 3\n")
    (ws / "latin1.toml").write_bytes(b"steps = 3\n# caf\xe9\n")
    (ws / "dir.yaml").mkdir()
    (ws / "empty.txt").write_text("")
    (ws / "templates.yaml").write_text("IsA: [a\n  b: {\n")
    (ws / "afile").write_text("x\n")
    for name, edit in {
        "badjson": lambda raw: "{not json",
        "unknownkey": lambda raw: json.dumps({**json.loads(raw), "config": {**json.loads(raw)["config"], "stepz": 3}}),
    }.items():
        shutil.copytree(run, ws / name)
        (ws / name / "config.json").write_text(edit((run / "config.json").read_text()))
    return {"ws": str(ws), "run": str(ws / "run")}


# (id, argv with {ws}/{run} placeholders or "D:" + discover overrides, phrase in the error line)
ROWS: list[tuple[str, list[str], str]] = [
    ("force-on-a-folder-that-is-not-a-run", ["D", "--out", "{ws}/notrun", "--force"], "not a kcs-lens run directory"),
    ("out-in-a-folder-that-is-not-a-run", ["D", "--out", "{ws}/notrun"], "not a kcs-lens run directory"),
    ("lr-inf", ["D", "--lr", "inf"], "--lr"),
    ("lr-nan", ["D", "--lr", "nan"], "--lr"),
    ("lr-negative", ["D", "--lr", "-0.1"], "--lr"),
    ("tau-negative", ["D", "--tau", "-1"], "--tau"),
    ("tau-zero", ["D", "--tau", "0"], "--tau"),
    ("warmup-negative", ["D", "--warmup-frac", "-1"], "--warmup-frac"),
    ("steps-not-a-number", ["D", "--steps", "abc"], "--steps"),
    ("steps-huge", ["D", "--steps", str(2**40)], "--steps"),
    ("lm-eval-blocks-zero", ["D", "--lm-eval-blocks", "0"], "--lm-eval-blocks"),
    ("lens-term-without-a-lower-masked-block", ["D", "--lens-weight", "1", "--layers", "3"], "--lens-weight"),
    (
        "distractor-term-with-last-token-scoring",
        ["D", "--distractor-weight", "1", "--tail-scoring", "last"],
        "--distractor-weight",
    ),
    ("control-val-size-too-large", ["D", "--control-val-size", "5000"], "--control-val-size"),
    ("control-lm-empty-file", ["D", "--control-lm", "{ws}/empty.txt"], "empty.txt"),
    ("templates-invalid-yaml", ["D", "--templates", "{ws}/templates.yaml"], "templates.yaml:2:"),
    ("config-wrong-type", ["D", "--config", "{ws}/typed.yaml"], "key 'steps'"),
    ("config-top-level-list", ["D", "--config", "{ws}/list.yaml"], "top level must be a table"),
    ("config-not-utf8", ["D", "--config", "{ws}/latin1.toml"], "not UTF-8"),
    ("config-is-a-directory", ["D", "--config", "{ws}/dir.yaml"], "not a file"),
    ("out-under-a-regular-file", ["D", "--out", "{ws}/afile/run"], "--out"),
    ("out-in-proc", ["D", "--out", "/proc/kcs-x"], "--out"),
    ("resume-invalid-json", ["discover", "--resume", "{ws}/badjson"], "config.json"),
    ("resume-unknown-key", ["discover", "--resume", "{ws}/unknownkey"], "unknown config keys"),
    ("resume-not-a-run", ["discover", "--resume", "{ws}/notrun"], "not a run directory"),
    ("rerun-without-force", ["D", "--out", "{run}"], "--force"),
    ("evaluate-json-in-proc", ["evaluate", "{run}", "--json", "/proc/kcs-x/e.json"], "--json"),
    ("evaluate-json-is-a-dir", ["evaluate", "{run}", "--json", "{ws}/notrun"], "--json"),
    ("baseline-json-under-a-file", ["baseline", "{run}", "--json", "{ws}/afile/b.json"], "--json"),
    ("baseline-draws-zero", ["baseline", "{run}", "--draws", "0"], "--draws"),
    ("report-out-in-proc", ["report", "{run}", "--out", "/proc/kcs-x/rep"], "--out"),
    ("export-out-in-proc", ["export", "{run}", "--out", "/proc/kcs-x"], "--out"),
    ("export-out-exists", ["export", "{run}", "--out", "{ws}/notrun"], "--out"),
    ("overlap-out-in-proc", ["overlap", "{run}", "{run}", "--out", "/proc/kcs-x"], "--out"),
    ("compare-max-prompts-negative", ["compare-circuits", "{run}", "--max-prompts", "-1"], "--max-prompts"),
    ("compare-top-heads-negative", ["compare-circuits", "{run}", "--top-heads", "-1"], "--top-heads"),
    ("compare-out-under-a-file", ["compare-circuits", "{run}", "--out", "{ws}/afile/c"], "--out"),
    ("compare-seed-negative", ["compare-circuits", "{run}", "--seed", "-1"], "--seed"),
    (
        "compare-out-a-folder-of-other-files",
        ["compare-circuits", "{run}", "--out", "{ws}/notrun"],
        "not the output of an earlier",
    ),
    ("compare-out-the-run-directory", ["compare-circuits", "{run}", "--out", "{run}"], "not the output of an earlier"),
    ("config-json-nested-too-deep", ["D", "--config", "{in}/nested.json"], "nested too deeply"),
    (
        "kg-wordnet-min-above-max",
        ["kg", "wordnet", "--root", "building.n.01", "--min-triplets", "50", "--max-triplets", "10"],
        "--min-triplets",
    ),
    ("downstream-out-in-proc", ["downstream", "{run}", "--task", "bundled", "--out", "/proc/kcs-x"], "--out"),
    ("kg-wordnet-out-in-proc", ["kg", "wordnet", "--root", "building.n.01", "--out", "/proc/kcs-x"], "--out"),
    ("unknown-command", ["discovr"], "No such command"),
    # --- issue 25: model directories (each refused before any weight is used)
    ("model-truncated-safetensors", ["D", "--model", "{in}/m_trunc"], "m_trunc/model.safetensors is not a readable"),
    ("model-random-bytes-safetensors", ["D", "--model", "{in}/m_rand"], "m_rand/model.safetensors is not a readable"),
    ("model-config-field-wrong-type", ["D", "--model", "{in}/m_four"], "config.json: StrictDataclassFieldValidationError"),
    ("model-config-a-list", ["D", "--model", "{in}/m_list"], "expected a JSON object of settings"),
    ("model-config-invalid-json", ["D", "--model", "{in}/m_badjson"], "config.json:2: not valid JSON"),
    ("model-no-tokenizer", ["D", "--model", "{in}/m_notok"], "has no tokenizer files"),
    ("model-vocab-without-merges", ["D", "--model", "{in}/m_vocab"], "cannot load the tokenizer"),
    ("model-pytorch-bin-that-runs-code", ["D", "--model", "{in}/m_bin"], "cannot load the weights"),
    # --- KG and question files
    ("kg-row-longer-than-context", ["D", "--target-kg", "{in}/long.jsonl"], "more than the model's context of 128"),
    ("kg-json-nested-too-deep", ["D", "--target-kg", "{in}/nested.json"], "nested.json: JSON nested too deeply"),
    ("kg-json-object-not-list", ["D", "--target-kg", "{in}/object.json"], "the file is one JSON object"),
    (
        "downstream-prompt-unknown-field",
        ["downstream", "{run}", "--task", "bundled", "--prompt", "Q: {question} {answer}"],
        "unknown field {answer}",
    ),
    ("downstream-prompt-single-brace", ["downstream", "{run}", "--task", "bundled", "--prompt", "Q: {question} {"], "--prompt"),
    (
        "downstream-train-jsonl-nested",
        ["downstream", "{run}", "--train", "{in}/nested.jsonl", "--test", "{in}/q.jsonl"],
        "nested.jsonl:1: JSON nested too deeply",
    ),
    (
        "downstream-train-json-nested",
        ["downstream", "{run}", "--train", "{in}/nested.json", "--test", "{in}/q.jsonl"],
        "nested.json: JSON nested too deeply",
    ),
    (
        "downstream-train-json-object",
        ["downstream", "{run}", "--train", "{in}/qobject.json", "--test", "{in}/q.jsonl"],
        "one JSON object",
    ),
    (
        "downstream-id-a-float",
        ["downstream", "{run}", "--train", "{in}/id15.jsonl", "--test", "{in}/q.jsonl"],
        "field 'id' must be a string or an integer, got 1.5",
    ),
    ("downstream-seed-overflow", ["downstream", "{run}", "--task", "bundled", "--seeds", "9" * 23], "--seeds"),
    ("downstream-val-fraction-zero", ["downstream", "{run}", "--task", "bundled", "--val-fraction", "0"], "--val-fraction"),
    # --- sweep
    (
        "sweep-device-not-torch",
        ["sweep", "{ws}/tpu.toml", "--out", "{ws}/st", "--dry-run"],
        "device = 'tpu:0': must be a torch device",
    ),
    (
        "sweep-resources-with-local",
        ["sweep", "{ws}/study.toml", "--out", "{ws}/st", "--resources", "not json at all"],
        "--resources is for --executor ray",
    ),
    ("sweep-grid-empty-list", ["sweep", "{ws}/noseed.toml", "--out", "{ws}/st"], "e.g. seed = [84]"),
    ("sweep-devices-missing-gpu", ["sweep", "{ws}/study.toml", "--out", "{ws}/st", "--devices", "cuda:9"], "--devices cuda:9"),
    (
        "sweep-devices-not-a-device",
        ["sweep", "{ws}/study.toml", "--out", "{ws}/st", "--devices", "cpu,banana"],
        "--devices 'banana'",
    ),
    ("sweep-out-a-file", ["sweep", "{ws}/study.toml", "--out", "{ws}/afile"], "is a file; expected a study directory"),
    ("sweep-out-a-run-directory", ["sweep", "{ws}/study.toml", "--out", "{run}"], "is a run directory of kcs-lens discover"),
    ("sweep-out-inside-a-run", ["sweep", "{ws}/study.toml", "--out", "{run}/study"], "is inside"),
    ("sweep-cell-name-escapes", ["sweep", "{ws}/study.toml", "--out", "{ws}/trav"], "cell '../trav_escape': not a valid cell"),
    ("sweep-status-cell-name-escapes", ["sweep", "status", "{ws}/trav"], "cell '../trav_escape': not a valid cell"),
    ("overlap-a-run-with-itself", ["overlap", "{run}", "{run}"], "is given twice"),
    ("resume-state-pt-that-runs-code", ["discover", "--resume", "{in}/crafted"], "refused to load"),
    # --- Ray (where the extra is installed; the authentication failure is in test_sweep_ray_cluster.py)
    (
        "sweep-ray-address-nothing-listening",
        ["sweep", "{ws}/study.toml", "--out", "{ws}/st", "--executor", "ray", "--ray-address", "127.0.0.1:1"],
        "--ray-address 127.0.0.1:1: nothing answers there",
    ),
    (
        "sweep-ray-address-not-host-port",
        ["sweep", "{ws}/study.toml", "--out", "{ws}/st", "--executor", "ray", "--ray-address", "headnode"],
        "expected auto or HOST:PORT",
    ),
]
HAS_RAY = importlib.util.find_spec("ray") is not None


@pytest.mark.parametrize("argv, phrase", [pytest.param(a, p, id=i) for i, a, p in ROWS])
def test_bad_input_table(argv, phrase, tmp_path, finished_run, tiny_kg, tiny_model_dir, inputs):
    if "/proc/" in " ".join(argv) and not HAS_PROC:
        pytest.skip("no /proc")
    if "ray" in argv and not HAS_RAY:
        pytest.skip("Ray is not installed (the ray extra)")
    ws = tmp_path / "ws"
    ws.mkdir()
    names = workspace(ws, finished_run, tiny_model_dir, tiny_kg)
    args = [a.replace("{ws}", names["ws"]).replace("{run}", names["run"]).replace("{in}", str(inputs)) for a in argv]
    out = str(ws / "out")
    if args[0] == "D":  # discover on the tiny model and data with these flags last
        args = discover_args(tiny_kg, tiny_model_dir) + ([] if "--out" in args else ["--out", out]) + args[1:]
    before, shared = snapshot(ws), snapshot(inputs)
    if "--ray-address" in args:
        import ray  # noqa: F401  (importing Ray takes 10-20 s on a loaded machine; the bound below is on the probe)
    t0 = time.monotonic()
    r = CliRunner().invoke(app, args)
    if "--ray-address" in args:  # an unreachable cluster fails at once, not after Ray's minutes of retries
        assert time.monotonic() - t0 < 30, r.output
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and phrase in errors[0], r.output
    assert "Loading weights" not in r.output and "it/s]" not in r.output, r.output  # no progress bar before it
    assert snapshot(ws) == before  # nothing changed, nothing left behind (no empty --out folder)
    assert snapshot(inputs) == shared and not (inputs / "PWNED").exists()  # the crafted state.pt never ran
    assert not Path(out).exists()


def test_failed_discover_leaves_an_existing_empty_out_as_it_was(tmp_path, tiny_kg, tiny_model_dir):
    out = tmp_path / "empty"
    out.mkdir()
    r = CliRunner().invoke(app, discover_args(tiny_kg, tiny_model_dir, control_val_size=5000) + ["--out", str(out)])
    assert r.exit_code == 2 and list(out.iterdir()) == []


def test_force_replaces_a_run_and_keeps_files_kcs_lens_did_not_write(tmp_path, finished_run, tiny_kg, tiny_model_dir):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "notes.txt").write_text("mine\n")
    (run / "evaluation.json").write_text("{}\n")
    r = CliRunner().invoke(
        app,
        discover_args(tiny_kg, tiny_model_dir, steps=2, eval_every=1, checkpoint_every=2, seed=7)
        + ["--out", str(run), "--force"],
    )
    assert r.exit_code == 0, r.output
    assert (run / "notes.txt").read_text() == "mine\n" and not (run / "evaluation.json").exists()
    assert json.loads((run / "config.json").read_text())["config"]["seed"] == 7


# ------------------------------------------------------------------------------------------
# Fuzz: hostile values for every option of discover
# ------------------------------------------------------------------------------------------
def _value_options() -> list[str]:
    from dataclasses import fields

    from kcs_lens.discovery.config import DiscoveryConfig

    return ["--" + f.name.replace("_", "-") for f in fields(DiscoveryConfig) if not f.metadata.get("flag")] + ["--stop-after"]


def _numeric(flag: str) -> bool:
    from kcs_lens.discovery.config import FIELD_TYPES

    name = flag[2:].replace("-", "_")
    return name == "stop_after" or FIELD_TYPES.get(name) in (int, float)


HOSTILE = ["-1", "0", "nan", "inf", "-inf", "1e300", str(10**20), "abc", "", "-0.5"]


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(_value_options()), value=st.sampled_from(HOSTILE))
def test_fuzz_discover_options(option, value, tiny_kg, tiny_model_dir):
    """Every option with a hostile value: a successful run, or exit 2 with one error line that
    names the option (numeric options) and no traceback, and no --out folder left behind."""
    base = discover_args(tiny_kg, tiny_model_dir, steps=2, eval_every=1, checkpoint_every=2, lm_eval_blocks=2)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        args = [a for a in base]
        if option in args:  # replace the base value
            i = args.index(option)
            del args[i : i + 2]
        args += ["--out", str(out), "--stop-after", "2"] if option != "--stop-after" else ["--out", str(out)]
        r = CliRunner().invoke(app, [*args, option, value])
        note = f"{option} {value!r}:\n{r.output}"
        assert r.exit_code in (0, 2), note
        assert "Traceback" not in r.output and "internal error" not in r.output, note
        if r.exit_code == 2:
            errors = [line for line in r.output.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, note
            if _numeric(option):
                assert option in errors[0], note
            assert not out.exists() or (out / "config.json").exists(), note
        sys.stdout.flush()


# ------------------------------------------------------------------------------------------
# Issue 25, second round: valid input that was refused, outputs never written under an unchecked
# name, the unsafe state.pt, Ctrl-C, permissions, warnings on stderr
# ------------------------------------------------------------------------------------------
def test_utf8_bom_and_crlf_files_load_like_plain_ones(tmp_path, tiny_kg):
    """KG files saved on Windows (a UTF-8 byte-order mark, CRLF line ends) give the same triplets;
    so do question files and study files."""
    from kcs_lens.data.loaders import load_kg
    from kcs_lens.downstream.tasks import load_questions
    from kcs_lens.sweep.plan import read_study

    plain = load_kg(str(tiny_kg["target"]))
    lines = tiny_kg["target"].read_text().splitlines()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    rows = [json.loads(x) for x in lines]
    csv_text = "head,relation,tail,text\r\n" + "".join(f"{r['head']},{r['relation']},{r['tail']},{r['text']}\r\n" for r in rows)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + csv_text.encode())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=1).replace("\n", "\r\n").encode())
    for name in ("bom.jsonl", "bom.csv", "bom.json"):
        got = load_kg(str(tmp_path / name))
        assert [(t.head, t.relation, t.tail, t.text) for t in got] == [(t.head, t.relation, t.tail, t.text) for t in plain]
    q = {"id": "q1", "question": "A car is a?", "choices": {"label": ["A", "B"], "text": ["vehicle", "fish"]}, "answerKey": "A"}
    (tmp_path / "q.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(q).encode() + b"\r\n")
    assert [x.id for x in load_questions(str(tmp_path / "q.jsonl"))] == ["q1"]
    (tmp_path / "s.toml").write_bytes(b"\xef\xbb\xbf[grid]\r\nseed = [1, 2]\r\n")
    assert read_study(tmp_path / "s.toml")[1] == {"seed": [1, 2]}
    from kcs_lens.data.text import _read

    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfA car is a vehicle.\r\n")
    assert _read(tmp_path / "t.txt", "--control-lm").startswith("A car")  # no U+FEFF in the ControlLM text


def test_report_with_a_dotted_out_never_touches_another_file(tmp_path, finished_run):
    """`report RUN --out rep/results-v1.2` writes results-v1.2.md/.csv/.png; a hand-written
    results-v1.md beside it (what `with_suffix` used to replace) stays as it was."""
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "results-v1.md").write_text("mine\n")
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    r = CliRunner().invoke(app, ["report", str(run), "--out", str(rep / "results-v1.2"), "--draws", "1"])
    assert r.exit_code == 0, r.output
    assert (rep / "results-v1.md").read_text() == "mine\n"
    assert sorted(p.name for p in rep.iterdir()) == ["results-v1.2.csv", "results-v1.2.md", "results-v1.2.png", "results-v1.md"]


def test_study_report_with_a_dotted_out_and_an_unwritable_name(tmp_path, tiny_kg, tiny_model_dir):
    """The study report (pending cells only: no evaluation) to a dotted --out writes exactly its
    five names; a name it cannot write is refused before anything is written."""
    from kcs_lens.sweep.plan import expand, write_plan

    study = tmp_path / "study.toml"
    study.write_text(
        f'[base]\nmodel = "{tiny_model_dir}"\ntarget_kg = "{tiny_kg["target"]}"\ncontrol_kg = "{tiny_kg["control"]}"\n'
        "[grid]\nseed = [1, 2]\n"
    )
    sdir = tmp_path / "s"
    write_plan(expand(study), sdir)
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "results-v1.md").write_text("mine\n")
    r = CliRunner().invoke(app, ["report", str(sdir), "--out", str(rep / "results-v1.2")])
    assert r.exit_code == 0, r.output
    assert (rep / "results-v1.md").read_text() == "mine\n"
    assert sorted(p.name for p in rep.iterdir()) == ["results-v1.2.csv", "results-v1.2.json", "results-v1.2.md", "results-v1.md"]
    (rep / "x.csv").mkdir()  # one of the names is a folder: refused, nothing else written
    r = CliRunner().invoke(app, ["report", str(sdir), "--out", str(rep / "x")])
    assert r.exit_code == 2 and "x.csv: is a directory" in r.output, r.output
    assert not (rep / "x.md").exists()


def test_sweep_refuses_a_state_pt_that_would_run_code(tmp_path, inputs):
    """The sweep reads a partial cell's state.pt (the step it resumes from) with weights_only: a
    crafted file is refused with a RunError and its code does not run."""
    from kcs_lens.discovery.rundir import RunDir
    from kcs_lens.errors import RunError
    from kcs_lens.sweep.cells import resumed_step

    with pytest.raises(RunError, match="refused to load"):
        resumed_step(RunDir(inputs / "crafted"))
    assert not (inputs / "PWNED").exists()
    assert resumed_step(RunDir(inputs / "m_list")) is None  # no state.pt: nothing to resume from


def test_state_pt_holds_only_tensors_numbers_and_lists(finished_run):
    """What discovery writes loads with weights_only=True (the resume test of test_run_safety
    checks that it continues bit-identically)."""
    state = torch.load(finished_run / "checkpoints" / "state.pt", weights_only=True)
    assert {"step", "logits", "opt", "sched", "generator", "original"} <= set(state)

    def plain(x) -> bool:
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (torch.Tensor, bool, int, float, str))

    assert plain(state)


def test_ctrl_c_while_the_model_loads_is_one_line_exit_130(tmp_path, tiny_kg, tiny_model_dir, monkeypatch):
    """A Ctrl-C inside transformers' from_pretrained (simulated: the loader raises KeyboardInterrupt
    as Python does on SIGINT) exits 130 with one line and leaves no --out folder."""
    import transformers

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", interrupted)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, discover_args(tiny_kg, tiny_model_dir) + ["--out", str(out)])
    assert r.exit_code == 130, r.output
    assert [x for x in r.output.splitlines() if x.startswith("error:")] == [
        "error: interrupted (Ctrl-C); no file was left half-written"
    ]
    assert not out.exists()


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")]}


def test_export_and_overlap_outputs_get_umask_permissions(tmp_path, finished_run):
    """Folders 0755 and files 0644 under umask 022 (mkdtemp alone gave the folders 0700)."""
    import os

    old = os.umask(0o022)
    try:
        shutil.copytree(finished_run, tmp_path / "a")
        shutil.copytree(finished_run, tmp_path / "b")
        r = CliRunner().invoke(app, ["overlap", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ov")])
        assert r.exit_code == 0, r.output
        assert _modes(tmp_path / "ov") == {("d", 0o755), ("f", 0o644)}
        r = CliRunner().invoke(app, ["export", str(tmp_path / "a"), "--out", str(tmp_path / "hf")])
        assert r.exit_code == 0, r.output
        assert _modes(tmp_path / "hf") == {("d", 0o755), ("f", 0o644)}
    finally:
        os.umask(old)


@pytest.mark.slow
def test_damaged_state_warning_goes_to_stderr(tmp_path, tiny_kg, tiny_model_dir):
    """`discover --resume` of a run whose state.pt is truncated: the fallback is a `note:` line on
    stderr, stdout keeps the results only."""
    import subprocess

    out = tmp_path / "run"
    discover(out=out, stop_after=8, log=lambda _: None, **tiny_run_kwargs(tiny_kg, tiny_model_dir))
    state = out / "checkpoints" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    p = subprocess.run(
        [sys.executable, "-m", "kcs_lens.cli.main", "discover", "--resume", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "state.pt is damaged" in p.stderr and "state.pt is damaged" not in p.stdout
    assert [x for x in p.stderr.splitlines() if "damaged" in x][0].startswith("note: ")
