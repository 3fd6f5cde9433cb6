"""The run page (``kcs-lens report RUN... --html``): every section, a chart per number of
metrics.jsonl with the selected step and the thresholds, per-fact answers that agree with the
evaluation, offline rendering in headless Chromium (pixels, scripts ran, no request left the page),
and a 3-seed study group (one page, seeds overlaid)."""

from __future__ import annotations

import json
import re

import pytest
from _eval_fixtures import cli
from test_report_render import EXTERNAL, _check_not_blank, _chromium, _screenshot_pixels, needs_chromium
from test_sweep import tiny_study

pytest_plugins = ["_eval_fixtures"]  # fixtures tiny_lm, real_run (shared by the session)

SECTIONS = ("summary", "curves", "facts", "density", "config")


@pytest.fixture(scope="module")
def page(real_run, tiny_lm, tmp_path_factory):
    from kcs_lens.evaluation.paper_report import report_runs
    from kcs_lens.evaluation.paper_table import RowSettings

    out = tmp_path_factory.mktemp("page") / "run"
    res = report_runs([real_run], out, RowSettings(draws=2, lens_model=tiny_lm, log=lambda m: None), html=True)
    return res, out.with_name("run.html")


def test_page_has_every_section_and_no_external_reference(page):
    res, path = page
    assert str(path) in res["files"]
    text = path.read_text()
    for s in SECTIONS:
        assert f'<section id="{s}">' in text
    m = EXTERNAL.search(text)
    assert m is None, text[max(0, m.start() - 80) : m.end() + 80]
    assert not re.search(r"https?://", text)  # not even in a namespace: nothing to fetch


def test_a_chart_per_number_of_metrics_jsonl(page, real_run):
    from kcs_lens.discovery.rundir import RunDir
    from kcs_lens.evaluation.run_page import curves

    _, path = page
    text = path.read_text()
    records = RunDir(real_run).read_metrics()
    expected = curves(records)
    assert {"target_ratio", "sparsity", "train/suppression", "train/total", "lr"} <= set(expected)
    charted = re.findall(r'<figure data-metric="([^"]+)">', text)
    assert sorted(charted) == sorted(expected)
    # every chart has one point per evaluation, and the selected step is drawn on each
    summary = json.loads((real_run / "summary.json").read_text())
    for fig in re.findall(r'<figure data-metric="[^"]+">(.*?)</figure>', text, re.S):
        assert fig.count("<circle") == len(records)
        assert f"selected step {summary['selected_step']}" in fig
    # the three PPL-ratio thresholds of the selection rule
    cfg = json.loads((real_run / "config.json").read_text())["config"]
    for key, value in (("target_ratio", cfg["select_min_target_ratio"]), ("lm_ratio", cfg["select_max_lm_ratio"])):
        fig = re.search(rf'<figure data-metric="{key}">(.*?)</figure>', text, re.S).group(1)
        assert 'class="threshold"' in fig and f"{value:g}" in fig


def test_facts_agree_with_the_evaluation(page, real_run):
    """The per-fact answers are the evaluation's: the share of rank-0 tails is its top-1 accuracy."""
    _, path = page
    ev = json.loads((real_run / "evaluation.json").read_text())
    for s in ("target", "control"):
        facts = ev["facts"][s]
        assert len(facts) == ev["sets"][s]["n"]
        for variant in ("original", "remaining"):
            top1 = sum(f[f"rank_{variant}"] == 0 for f in facts) / len(facts)
            assert top1 == pytest.approx(ev["metrics"][variant][s]["top1"])
            rank = sum(f[f"rank_{variant}"] for f in facts) / len(facts)
            assert rank == pytest.approx(ev["metrics"][variant][s]["rank_mean"])
            picked = [f[f"mc_{variant}"] == f["tail"] for f in facts if f"mc_{variant}" in f]
            assert picked, "the run has multiple choice (mc_choices): every scored fact has its pick"
            assert sum(picked) / len(picked) == pytest.approx(ev["metrics"][variant][s]["mc"])
    text = path.read_text()
    n_rows = sum(len(v) for v in ev["facts"].values())
    assert text.count('data-rel="') == n_rows
    assert {f["head"] for f in ev["facts"]["target"]} <= set(re.findall(r"<td>([^<]*)</td>", text))


@needs_chromium
def test_page_renders_offline_and_its_script_runs(page, tmp_path):
    _, path = page
    img = _screenshot_pixels(path, tmp_path / "page.png", size="1300,1600")
    _check_not_blank(img, min_colors=50, min_ink=0.03)
    dom = _chromium(path.resolve().as_uri(), "--dump-dom").stdout
    assert 'data-ready="1"' in dom  # the inline script ran to its end
    n = path.read_text().count('data-rel="')
    assert f"{n} of {n} rows" in dom  # the filter counted every per-fact row
    for s in SECTIONS:
        assert f'id="{s}"' in dom


def test_report_html_checks_its_output_before_work(real_run, tmp_path):
    """--out under a regular file: one error line, exit 2, nothing evaluated or written."""
    (tmp_path / "file").write_text("x")
    r = cli("report", real_run, "--html", "--out", tmp_path / "file" / "page")
    assert r.exit_code == 2 and r.output.startswith("error: --out"), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_groups_and_page_paths(real_run, tmp_path):
    """Runs that differ only in the seed share a page; other settings get their own."""
    import dataclasses

    from kcs_lens.discovery.rundir import load_run
    from kcs_lens.evaluation.run_page import group_runs, page_paths

    a = load_run(real_run)
    b = dataclasses.replace(a, config=dataclasses.replace(a.config, seed=7, device="cuda"))
    c = dataclasses.replace(a, config=dataclasses.replace(a.config, ablation="no-sparsity"))
    groups = group_runs([b, c, a])
    assert [[r.config.seed for r in g.runs] for g in groups] == [[7, a.config.seed], [a.config.seed]]  # seeds sorted
    paths = page_paths(groups, tmp_path / "rep.md")
    assert [p.name for p in paths] == [f"rep-{groups[0].label}.html", f"rep-{groups[1].label}.html"]
    assert page_paths(groups[:1], tmp_path / "rep") == [tmp_path / "rep.html"]


@pytest.mark.slow
@needs_chromium
def test_study_group_page_with_three_seeds(tmp_path, tiny_kg, tiny_model_dir, monkeypatch):
    """A 3-seed study (tracked to TensorBoard and offline W&B) -> ``kcs-lens report DIR --html``:
    one page for the group, every chart with a line per seed, the per-fact table with every seed."""
    from test_tracking import wandb_records

    from kcs_lens.sweep import run_sweep

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    study = tiny_study(tmp_path, tiny_kg, tiny_model_dir, targets=("target",), seeds=(1, 2, 3), steps=6, checkpoint_every=3)
    out = tmp_path / "study"
    res = run_sweep(study, out, progress=False, log=lambda m: None, track=["tensorboard", "wandb"])
    assert not res["failed"]
    r = cli("report", out, "--html", "--draws", "1")
    assert r.exit_code == 0, r.output
    pages = sorted(out.glob("study*.html"))
    assert [p.name for p in pages] == ["study.html"]
    text = pages[0].read_text()
    for s in SECTIONS:
        assert f'<section id="{s}">' in text
    assert "seeds 1, 2, 3" in text and "mean ± sd over seeds" in text
    for fig in re.findall(r'<figure data-metric="[^"]+">(.*?)</figure>', text, re.S):
        assert fig.count('class="series"') == 3 and fig.count('class="selected"') == 3
    assert set(re.findall(r'data-seed="(\d+)"', text)) == {"1", "2", "3"}
    assert EXTERNAL.search(text) is None
    img = _screenshot_pixels(pages[0], tmp_path / "study.png", size="1300,1600")
    _check_not_blank(img, min_colors=50, min_ink=0.03)
    # tracking: one W&B run per cell, grouped by the study; a TensorBoard folder per cell
    cells = sorted(p.parent for p in out.rglob("summary.json"))
    assert len(cells) == 3
    for cell in cells:
        assert list((cell / "tensorboard").glob("events.out.tfevents.*"))
        run, history = wandb_records(cell)
        assert run["group"] == out.name and run["display_name"] == str(cell.relative_to(out))
        assert [h["step"] for h in history] == [rec["step"] for rec in map(json.loads, (cell / "metrics.jsonl").open())]
