"""analyses/compare_circuits.ipynb executes top to bottom (nbclient); any failing cell fails the test.

On the bundled model when it is built (the CI case), otherwise on the tiny test model. The run
directory holds a random subnetwork written by hand, so no discovery run is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import bundled_available, tiny_run_kwargs
from test_analyses import make_run_dir

NOTEBOOK = Path(__file__).resolve().parents[1] / "analyses" / "compare_circuits.ipynb"


def test_notebook_is_shipped_clean():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
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
