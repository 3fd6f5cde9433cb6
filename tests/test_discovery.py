"""Discovery runs end to end on a tiny model: artifacts, resume, selection, bad input, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import requires_bundled, tiny_run_kwargs
from typer.testing import CliRunner

from kcs_lens import Subnetwork, discover, load_model
from kcs_lens.data.loaders import load_kg
from kcs_lens.data.triplets import tokenize_triplets
from kcs_lens.discovery.config import ConfigError, build_config
from kcs_lens.discovery.selection import select_checkpoint
from kcs_lens.errors import KGError, MaskError, NonFiniteLoss, OutputError, RunError


def test_run_directory_artifacts(tmp_path, tiny_kg, tiny_model_dir):
    out = tmp_path / "run"
    s = discover(out=out, **tiny_run_kwargs(tiny_kg, tiny_model_dir))
    for f in ("config.json", "metrics.jsonl", "subnetwork.safetensors", "summary.json", "checkpoints/state.pt"):
        assert (out / f).exists(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["steps"] == 12 and "torch" in cfg["versions"] and cfg["selection"]["min_target_ratio"] == 10.0
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 6, 9, 12]
    assert {"suppression", "control_kg", "control_lm", "sparsity"} <= set(metrics[0]["train"])
    sub = Subnetwork.load(out)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert "step_000012.safetensors" in ckpts and len(ckpts) <= 2  # pruned to latest + best qualifying
    lm = load_model(str(tiny_model_dir))
    sub.check_model(lm)
    assert sub.meta["model_fingerprint"] == lm.fingerprint() and sub.meta["step"] == s["selected_step"]
    assert sub.mask_config.layers == (2, 3)  # top half of 4 blocks
    assert math.isclose(s["sparsity"], sub.sparsity)
    # the summary's remaining-model numbers are those of the saved subnetwork
    from kcs_lens.discovery.run_data import load_run_data
    from kcs_lens.discovery.run_metrics import evaluate_split

    data = load_run_data(build_config(**tiny_run_kwargs(tiny_kg, tiny_model_dir)), lm)
    with sub.applied(lm):
        rem = evaluate_split(lm, data)
    assert math.isclose(rem["target_ppl"], s["remaining"]["target_ppl"], rel_tol=1e-6)


def test_training_moves_toward_suppression(tmp_path, tiny_kg, tiny_model_dir):
    """Without the sparsity term the mask moves to suppress the TargetKG (and keep the controls):
    the suppression loss KL(U || q) falls and a subnetwork forms. (The random tiny model assigns its
    tails less than 1/V, so making q uniform lowers their PPL; the loss is what must move.)"""
    kw = tiny_run_kwargs(tiny_kg, tiny_model_dir) | dict(steps=30, eval_every=10, checkpoint_every=10, ablation="no-sparsity")
    s = discover(out=tmp_path / "r", **kw)
    metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    supp = [m["train"]["suppression"] for m in metrics]
    assert supp[-1] < 0.9 * supp[0], supp
    assert s["sparsity"] < 1.0


def test_resume_is_bit_identical(tmp_path, tiny_kg, tiny_model_dir):
    kw = tiny_run_kwargs(tiny_kg, tiny_model_dir) | {"keep_all_checkpoints": True}
    discover(out=tmp_path / "full", **kw)
    assert len(list((tmp_path / "full" / "checkpoints").glob("step_*"))) == 2
    assert discover(out=tmp_path / "part", stop_after=5, **kw) is None  # stopped between checkpoints
    assert discover(resume=tmp_path / "part", stop_after=3) is None
    discover(resume=tmp_path / "part")
    a, b = (
        Subnetwork.load(tmp_path / "full" / "checkpoints" / "step_000012.safetensors"),
        Subnetwork.load(tmp_path / "part" / "checkpoints" / "step_000012.safetensors"),
    )
    for n in a.logits:
        assert torch.equal(a.logits[n], b.logits[n]), n
    ma = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in mb] == [3, 6, 9, 12]
    assert [json.loads(l)["target_ppl"] for l in ma] == [json.loads(l)["target_ppl"] for l in mb]


def _cli_args(kw: dict) -> list[str]:
    """`kcs-lens discover` flags for discover() keyword arguments."""
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--" + ("no-" if k != "keep_all_checkpoints" else "prune-") + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resumes_bit_identically(tmp_path, tiny_kg, tiny_model_dir):
    """SIGINT to a running `kcs-lens discover`: one-line message, exit 2, state saved between steps;
    --resume then ends exactly where an uninterrupted run ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    kw = tiny_run_kwargs(tiny_kg, tiny_model_dir) | {"steps": 120, "keep_all_checkpoints": True}
    out = tmp_path / "int"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-c",
        "from kcs_lens.cli.main import app; app()",
        "discover",
        *_cli_args(kw),
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # mid-run, past a checkpoint
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run did not get going"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, (stdout, stderr)
    assert "interrupted at step" in stderr + stdout and f"--resume {out}" in stderr + stdout
    assert "Traceback" not in stderr
    stopped = torch.load(out / "checkpoints" / "state.pt", weights_only=False)["step"]
    assert 6 <= stopped < 120
    assert all(json.loads(l)["step"] <= stopped for l in metrics.read_text().splitlines())
    discover(resume=out)
    discover(out=tmp_path / "full", **kw)
    a, b = Subnetwork.load(tmp_path / "full"), Subnetwork.load(out)
    for n in a.logits:
        assert torch.equal(a.logits[n], b.logits[n]), n
    steps_ppl = lambda d: [(r["step"], r["target_ppl"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert steps_ppl(out) == steps_ppl(tmp_path / "full")


def test_ctrl_c_during_an_evaluation_finishes_the_step_first(tmp_path, tiny_kg, tiny_model_dir, monkeypatch):
    """A Ctrl-C that lands in the evaluation/checkpoint of step 6 is held until both are written."""
    import os
    import signal

    from kcs_lens.discovery.runner import Run

    kw = tiny_run_kwargs(tiny_kg, tiny_model_dir) | {"keep_all_checkpoints": True}
    evaluate = Run.evaluate

    def evaluate_and_ctrl_c(self):
        if self.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(self)

    monkeypatch.setattr(Run, "evaluate", evaluate_and_ctrl_c)
    with pytest.raises(RunError, match="interrupted at step 6; resume with"):
        discover(out=tmp_path / "int", **kw, progress=False)
    monkeypatch.setattr(Run, "evaluate", evaluate)
    assert (tmp_path / "int" / "checkpoints" / "step_000006.safetensors").exists()
    discover(resume=tmp_path / "int")
    discover(out=tmp_path / "full", **kw)
    read = lambda d: [(r["step"], r["target_ppl"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert read(tmp_path / "int") == read(tmp_path / "full")
    a, b = Subnetwork.load(tmp_path / "full"), Subnetwork.load(tmp_path / "int")
    assert all(torch.equal(a.logits[n], b.logits[n]) for n in a.logits)

    def ctrl_c_twice(self):
        if self.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(self)

    monkeypatch.setattr(Run, "evaluate", ctrl_c_twice)  # the second press stops at once, saving nothing
    with pytest.raises(RunError, match="stopped at once inside step 6's update; its state was not saved"):
        discover(out=tmp_path / "twice", **kw, progress=False)
    assert not (tmp_path / "twice" / "checkpoints" / "state.pt").exists()  # the first save is at step 6


def test_fast_and_reference_objectives_give_the_same_run(tmp_path, tiny_kg, tiny_model_dir):
    """--objective fast (default) and reference: the same training losses, step for step."""
    kw = tiny_run_kwargs(tiny_kg, tiny_model_dir) | {"steps": 6, "checkpoint_every": 3}
    discover(out=tmp_path / "fast", **kw)
    discover(out=tmp_path / "ref", **(kw | {"objective": "reference"}))
    read = lambda d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "fast" / "config.json").read_text())["config"]["objective"] == "fast"
    fast, ref = read("fast"), read("ref")
    assert [r["step"] for r in fast] == [r["step"] for r in ref] == [3, 6]
    for a, b in zip(fast, ref):
        for term in ("suppression", "control_kg", "control_lm", "sparsity"):
            assert a["train"][term] == pytest.approx(b["train"][term], rel=1e-4), (a["step"], term)
    with pytest.raises(ConfigError, match="--autocast bf16 needs .*CUDA"):
        build_config(**(kw | {"autocast": "bf16"}))
    with pytest.raises(ConfigError, match="--objective 'quick'"):
        build_config(**(kw | {"objective": "quick"}))


def test_distractor_and_lens_terms_in_a_run(tmp_path, tiny_kg, tiny_model_dir):
    """--distractor-weight / --lens-weight (issue 22): the run trains them in both objectives
    alike, logs them, and records the distractor draw's size in config.json."""
    kw = tiny_run_kwargs(tiny_kg, tiny_model_dir) | {
        "steps": 4,
        "eval_every": 2,
        "checkpoint_every": 2,
        "distractor_weight": 1.0,
        "distractor_k": 3,
        "lens_weight": 0.5,
    }
    discover(out=tmp_path / "fast", **kw)
    discover(out=tmp_path / "ref", **(kw | {"objective": "reference"}))
    read = lambda d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(read("fast"), read("ref")):
        for term in ("suppression", "distractor", "lens", "control_kg"):
            assert a["train"][term] == pytest.approx(b["train"][term], rel=1e-4), (a["step"], term)
    data = json.loads((tmp_path / "fast" / "config.json").read_text())["data"]
    assert data["distractor_k"] == 3 and data["distractor_pool_min"] >= 3


@requires_bundled
def test_robust_recipe_trains_the_distractor_term_on_two_wordings(tmp_path):
    """--recipe robust: the bundled recipe plus the distractor term on templates 0-1 (2-4 unseen),
    λ 90 -> 120; flags still win over it; a short run trains the term and holds the other wordings out."""
    from kcs_lens.discovery.recipes import BUNDLED_RECIPE

    cfg = build_config(model="bundled", recipe="robust")
    assert (cfg.distractor_weight, cfg.train_templates, cfg.sparsity_start, cfg.sparsity_end) == (1.0, ["0", "1"], 90.0, 120.0)
    assert (cfg.steps, cfg.tail_weight, cfg.control_test_size) == tuple(
        BUNDLED_RECIPE[k] for k in ("steps", "tail_weight", "control_test_size")
    )
    assert build_config(model="bundled", recipe="robust", distractor_weight=0.5).distractor_weight == 0.5
    assert build_config(model="bundled").distractor_weight == 0.0  # the bundled default is unchanged
    from kcs_lens.cli.main import app

    r = CliRunner().invoke(
        app,
        ["discover", "--recipe", "robust", "--steps", "2", "--eval-every", "2", "--out", str(tmp_path / "r"), "--no-progress"],
    )
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["config"]["recipe"] == "robust" and saved["data"]["distractor_k"] == 4
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["data"]["target"] == 60 and s["data"]["paraphrases"] == 60  # 30 facts x 2 trained / 2 unseen wordings
    assert [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][-1]["train"]["distractor"] >= 0


def test_bad_input(tmp_path, tiny_kg, tiny_model_dir):
    kw = tiny_run_kwargs(tiny_kg, tiny_model_dir)
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("x")
    for force in (False, True):  # --force never deletes a folder that is not a run directory
        with pytest.raises(OutputError, match="not a kcs-lens run directory"):
            discover(out=out, force=force, **kw)
    assert sorted(p.name for p in out.iterdir()) == ["x"]
    with pytest.raises(MaskError, match="out of range"):
        discover(out=tmp_path / "a", **(kw | {"layers": "3-7"}))
    with pytest.raises(ConfigError, match="--granularity 'block'"):
        discover(out=tmp_path / "b", **(kw | {"granularity": "block"}))
    with pytest.raises(RunError, match="no such run directory"):
        discover(resume=tmp_path / "nothing")
    with pytest.raises(ConfigError, match="multiple of --eval-every"):
        build_config(**(kw | {"checkpoint_every": 4}))
    lm = load_model(str(tiny_model_dir))
    with torch.no_grad():
        lm.site("blocks.0.mlp.W_in").native_weight()[0, 0] = float("nan")  # below the masked blocks
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 0"):
        discover(out=tmp_path / "nan", lens_model=lm, **kw)


def test_kg_that_does_not_match_the_tokenizer(tmp_path, tiny_kg, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    small = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=64))
    d = tmp_path / "small_vocab_model"
    small.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)  # 320 tokens, the model has 50
    kw = tiny_run_kwargs(tiny_kg, d)
    with pytest.raises(RunError, match="tokenizes to ids outside the model's vocabulary"):
        discover(out=tmp_path / "r", **kw)
    with pytest.raises(KGError, match="token id .* >= the model's vocabulary size 50"):
        tokenize_triplets(load_kg(str(tiny_kg["target"])), tiny_tokenizer, d_vocab=50)


def test_selection_rule():
    from kcs_lens.discovery.config import DiscoveryConfig

    cfg = DiscoveryConfig()
    rec = lambda step, sp, t, c, l: dict(step=step, sparsity=sp, target_ratio=t, control_ratio=c, lm_ratio=l)
    rs = [rec(200, 0.99, 12, 1.0, 1.0), rec(400, 0.995, 15, 1.1, 1.01), rec(600, 0.999, 30, 1.5, 1.0)]
    chosen, ok = select_checkpoint(rs, cfg)
    assert ok and chosen["step"] == 400  # sparsest that meets all bounds
    chosen, ok = select_checkpoint([rec(200, 0.99, 2, 1.0, 1.0), rec(400, 0.99, 3, 1.0, 1.0)], cfg)
    assert not ok and chosen["step"] == 400  # none qualifies: the last, flagged


def test_selection_rule_target_top1():
    from kcs_lens.discovery.config import DiscoveryConfig
    from kcs_lens.discovery.selection import meets_criteria, selection_rule

    rec = lambda step, sp, top1: dict(step=step, sparsity=sp, target_ratio=20, control_ratio=1.0, lm_ratio=1.0, target_top1=top1)
    rs = [rec(200, 0.99, 0.1), rec(400, 0.995, 0.6)]
    assert select_checkpoint(rs, DiscoveryConfig())[0]["step"] == 400  # no top-1 criterion by default
    cfg = DiscoveryConfig(select_max_target_top1=0.2)
    assert select_checkpoint(rs, cfg) == (rs[0], True)  # the sparser one still names the tail
    assert select_checkpoint([rec(200, 0.99, 0.5), rec(400, 0.995, 0.6)], cfg) == (rec(400, 0.995, 0.6), False)
    old = {k: v for k, v in rec(200, 0.99, 0.1).items() if k != "target_top1"}  # an older run's record
    assert meets_criteria(old, DiscoveryConfig()) and not meets_criteria(old, cfg)
    assert selection_rule(cfg)["max_target_top1"] == 0.2 and "top-1" in selection_rule(cfg)["rule"]
    assert selection_rule(DiscoveryConfig())["max_target_top1"] is None
    with pytest.raises(ConfigError, match="--select-max-target-top1 1.5: must be a number in \\[0, 1\\]"):
        build_config(select_max_target_top1=1.5)


@requires_bundled
def test_top1_criterion_no_checkpoint_qualifies(tmp_path):
    """On the bundled model (which knows its TargetKG: top-1 near 1), a few steps cannot take the
    TargetKG top-1 to 0: with every other bound loose, no checkpoint qualifies, the last is kept and
    flagged, and config.json, summary.json and the CLI table say so, with top-1 and rank."""
    from kcs_lens.cli.main import app

    out = tmp_path / "r"
    args = ["discover", "--steps", "4", "--eval-every", "2", "--checkpoint-every", "2", "--select-min-target-ratio", "0"]
    args += ["--select-max-control-ratio", "100", "--select-max-lm-ratio", "100", "--select-max-target-top1", "0"]
    r = CliRunner().invoke(app, args + ["--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert (
        "NOT met (last checkpoint)" in r.output
        and "top-1" in r.output
        and "original (orig.) → remaining" in r.output
        and "tail rank" in r.output
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["meets_criteria"] is False and s["selected_step"] == 4
    assert s["selection"]["max_target_top1"] == 0.0
    assert json.loads((out / "config.json").read_text())["selection"]["max_target_top1"] == 0.0
    assert s["original"]["target_top1"] > 0.5 and s["remaining"]["target_top1"] > 0  # the answers survive
    assert {"target_rank", "control_rank", "control_top1"} <= set(s["remaining"]) & set(s["original"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["target_top1"] > 0 for m in metrics)
    # the same run with the bound at its TargetKG top-1 qualifies: the top-1 bound alone failed it
    cfg = build_config(select_min_target_ratio=0, select_max_control_ratio=100, select_max_lm_ratio=100, select_max_target_top1=1)
    assert select_checkpoint(metrics, cfg)[1]


def test_config_file_and_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("steps = 77\nseed = 5\nlr = 0.1\n")
    cfg = build_config(f, seed=9)
    assert (cfg.steps, cfg.seed, cfg.lr) == (77, 9, 0.1)  # CLI flags win over the file
    y = tmp_path / "c.yaml"
    y.write_text("discover:\n  granularity: neuron\n")
    with pytest.warns(FutureWarning, match="'neuron' is deprecated"):
        assert build_config(y).granularity == "row"  # the old name of row granularity
    assert build_config(model="gpt2-medium").steps == 40_000  # the paper's recipe for GPT-2
    assert build_config().recipe == "bundled"
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    with pytest.raises(ConfigError, match="bad.toml: unknown keys \\['stepz'\\]"):
        build_config(bad)


def test_bundled_recipe_sparsity_weight_per_granularity():
    """At head granularity the bundled recipe uses its own sparsity weight (75 -> 100 empties a
    head-granularity subnetwork); other granularities, the paper's recipe and user values are untouched."""
    from kcs_lens.discovery.recipes import BUNDLED_RECIPE, BUNDLED_RECIPE_BY_GRANULARITY

    head = BUNDLED_RECIPE_BY_GRANULARITY["head"]
    cfg = build_config(granularity="head")
    assert (cfg.sparsity_start, cfg.sparsity_end) == (head["sparsity_start"], head["sparsity_end"])
    assert cfg.steps == BUNDLED_RECIPE["steps"] and cfg.tail_weight == BUNDLED_RECIPE["tail_weight"]
    for g in ("weight", "row"):
        c = build_config(granularity=g)
        assert (c.sparsity_start, c.sparsity_end) == (BUNDLED_RECIPE["sparsity_start"], BUNDLED_RECIPE["sparsity_end"])
    assert build_config(granularity="head", sparsity_start=9.0).sparsity_start == 9.0  # the user's value wins
    paper = build_config(granularity="head", model="gpt2-medium")
    assert (paper.sparsity_start, paper.sparsity_end) == (2.0, 3.0)


def test_cli_discover(tmp_path, tiny_kg, tiny_model_dir):
    from kcs_lens.cli.main import app

    kw = tiny_run_kwargs(tiny_kg, tiny_model_dir)
    args = [
        "discover",
        "--model",
        kw["model"],
        "--target-kg",
        kw["target_kg"],
        "--control-kg",
        kw["control_kg"],
        "--control-val-kg",
        "",
        "--control-val-size",
        "10",
        "--control-lm",
        kw["control_lm"],
        "--lm-block-len",
        "32",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "3",
        "--control-batch",
        "8",
        "--lm-batch",
        "2",
        "--out",
        str(tmp_path / "cli"),
        "--no-progress",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "TargetKG" in r.output and "sparsity" in r.output
    r = CliRunner().invoke(app, args)  # exists now
    assert r.exit_code == 2 and "exists" in r.output
    r = CliRunner().invoke(app, args[:-3] + ["--layers", "9", "--out", str(tmp_path / "x"), "--no-progress"])
    assert r.exit_code == 2 and "out of range" in r.output


def test_every_config_value_has_a_cli_flag():
    from dataclasses import fields

    from kcs_lens.cli.main import app
    from kcs_lens.discovery.config import DiscoveryConfig

    r = CliRunner().invoke(app, ["discover", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    flags = {f.name.replace("_", "-") for f in fields(DiscoveryConfig)}
    missing = sorted(f for f in flags if f"--{f}" not in r.output)
    assert missing == [], f"config fields without a CLI flag: {missing}"
