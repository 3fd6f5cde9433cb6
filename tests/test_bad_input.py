"""Bad input never costs data and never shows a traceback (issue 15).

One table: every bad input found by trying the CLI as a new user; each must give exit code 2, one
``error:`` line containing the phrase, and leave every file of the workspace as it was (the run
used as input included; a discover that fails leaves no --out folder). Then a fuzz test feeds
hostile values to every option of ``discover``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
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


def workspace(ws: Path, run: Path) -> dict[str, str]:
    """The inputs of the table's rows, built in ``ws``."""
    shutil.copytree(run, ws / "run")
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
        "kg-wordnet-min-above-max",
        ["kg", "wordnet", "--root", "building.n.01", "--min-triplets", "50", "--max-triplets", "10"],
        "--min-triplets",
    ),
    ("downstream-out-in-proc", ["downstream", "{run}", "--task", "bundled", "--out", "/proc/kcs-x"], "--out"),
    ("kg-wordnet-out-in-proc", ["kg", "wordnet", "--root", "building.n.01", "--out", "/proc/kcs-x"], "--out"),
    ("unknown-command", ["discovr"], "No such command"),
]


@pytest.mark.parametrize("argv, phrase", [pytest.param(a, p, id=i) for i, a, p in ROWS])
def test_bad_input_table(argv, phrase, tmp_path, finished_run, tiny_kg, tiny_model_dir):
    if "/proc/" in " ".join(argv) and not HAS_PROC:
        pytest.skip("no /proc")
    ws = tmp_path / "ws"
    ws.mkdir()
    names = workspace(ws, finished_run)
    args = [a.format(**names) for a in argv]
    out = str(ws / "out")
    if args[0] == "D":  # discover on the tiny model and data with these flags last
        args = discover_args(tiny_kg, tiny_model_dir) + ([] if "--out" in args else ["--out", out]) + args[1:]
    before = snapshot(ws)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and phrase in errors[0], r.output
    assert snapshot(ws) == before  # nothing changed, nothing left behind (no empty --out folder)
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
