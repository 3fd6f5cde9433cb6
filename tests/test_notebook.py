"""The notebooks in analyses/ execute top to bottom (nbclient); any failing cell fails the test.

compare_circuits.ipynb: on the bundled model when it is built (the CI case), otherwise on the tiny
test model; the run directory holds a random subnetwork written by hand, so no discovery run is
needed. discovery_to_downstream.ipynb: a few-step discovery on the bundled model, its run page,
per-fact answers, compare-circuits and the downstream experiment, with the notebook's quick settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import bundled_available, requires_bundled, tiny_run_kwargs
from test_analyses import make_run_dir

NOTEBOOK = Path(__file__).resolve().parents[1] / "analyses" / "compare_circuits.ipynb"
D2D = NOTEBOOK.with_name("discovery_to_downstream.ipynb")


@pytest.mark.parametrize("path", [NOTEBOOK, D2D], ids=lambda p: p.stem)
def test_notebook_is_shipped_clean(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"


def test_notebook_executes(tmp_path, monkeypatch, tiny_kg, tiny_model_dir):
    pytest.importorskip("ipykernel")
    import nbformat
    from nbclient import NotebookClient

    from kcs_lens.model.loading import load_model

    if bundled_available():
        lm, cfg = load_model("bundled"), {}
    else:
        lm, cfg = load_model(str(tiny_model_dir)), tiny_run_kwargs(tiny_kg, tiny_model_dir)
    run = make_run_dir(tmp_path / "run", lm, cfg, density=0.05)
    monkeypatch.setenv("KCS_RUN_DIR", str(run))
    monkeypatch.setenv("KCS_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("KCS_N_BOOTSTRAP", "50")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small models: one thread is fastest on a shared machine

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    assert (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "comparison.json").exists()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs if o.output_type == "display_data")
    assert "CircuitsVis.render(" in html and html.count("var CircuitsVis=") == 1  # views inline, library once
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")


@pytest.mark.slow
@requires_bundled
def test_discovery_to_downstream_executes(tmp_path, monkeypatch):
    """Every step writes its files and shows its numbers: the run page's summary and curves (SVG), the
    per-fact answers, the agreement table and the downstream table."""
    pytest.importorskip("ipykernel")
    import nbformat
    from nbclient import NotebookClient

    out = tmp_path / "out"
    for k, v in {"KCS_OUT": str(out), "KCS_QUICK": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("KCS_RUN_DIR", raising=False)
    nb = nbformat.read(D2D, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    for f in ("run/subnetwork.safetensors", "report.html", "compare/report.html", "downstream/downstream.json"):
        assert (out / f).exists(), f
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs if o.output_type == "display_data")
    md = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs if o.output_type == "display_data")
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert 'class="num summary"' in html and html.count('<svg class="chart"') >= 10  # summary, a chart per metric
    assert "Spearman" in html  # compare-circuits' agreement table
    assert "| head | relation | tail |" in md and "removed" in md  # per-fact answers, downstream groups
    assert "facts lost their answer" in text and "selected step" in text
