"""The compare-circuits report is self-contained: no external URL, circuitsvis inlined once, and it
renders offline in headless Chromium (pixels checked, and every circuitsvis view drawn)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_kwargs
from test_analyses import make_run_dir

CHROMIUM = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")

# Anything that would make a browser fetch from the network.
EXTERNAL = re.compile(
    r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//"""  # <script src=..>, <link href=..>, <img src=..>
    r"""|@import\s+(?:url\()?\s*["']?(?:https?:)?//"""  # CSS imports
    r"""|url\(\s*["']?(?:https?:)?//"""  # CSS url(...)
    r"""|\bimport\b[^;]{0,200}?\bfrom\s*["'](?:https?:)?//"""  # ES module imports (circuitsvis cdn_src)
    r"""|\bimport\(\s*["'](?:https?:)?//""",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_kg, tiny_model_dir):
    from kcs_lens.analyses.compare import compare_circuits
    from kcs_lens.model.loading import load_model

    base = tmp_path_factory.mktemp("report")
    lm = load_model(str(tiny_model_dir))
    run = make_run_dir(base / "run", lm, tiny_run_kwargs(tiny_kg, tiny_model_dir))
    data = compare_circuits(run, out=base / "out", n_bootstrap=20, lens_model=lm, log=lambda m: None)
    return data, base / "out" / "report.html"


def test_external_url_pattern_catches_cdn_output():
    import circuitsvis as cv

    h = cv.tokens.colored_tokens(["a", "b"], [0.1, -0.2])
    assert EXTERNAL.search(h.cdn_src)  # the CDN variant would be caught
    assert EXTERNAL.search('<script src="https://unpkg.com/x.js"></script>')
    assert EXTERNAL.search('<link rel="stylesheet" href="//cdn.example.org/a.css">')
    assert not EXTERNAL.search('<img src="data:image/png;base64,AAAA">')


def test_report_has_no_external_url(report):
    _, path = report
    html = path.read_text()
    m = EXTERNAL.search(html)
    assert m is None, f"external reference in the report: {html[max(0, m.start() - 80) : m.end() + 80]!r}"
    assert "unpkg.com" not in html and "cdn.jsdelivr" not in html


def test_circuitsvis_library_is_inlined_once(report):
    _, path = report
    html = path.read_text()
    n_views = html.count('class="cv"')
    assert n_views >= 4
    assert html.count("var CircuitsVis=") == 1 and html.count("CircuitsVis.render(") == n_views
    # one library (~1.3 MB) plus small views, not one library per view
    assert len(html) < 1.3e6 + 200_000 * n_views / 4


def test_split_view_separates_library_and_call():
    import circuitsvis as cv

    from kcs_lens.analyses.report import split_view

    src = cv.attention.attention_heads(attention=np.ones((2, 3, 3)) / 3, tokens=["a", "</b", "c"]).local_src
    js, view = split_view(src)
    assert "var CircuitsVis=" in js and "CircuitsVis.render(" not in js[-2000:]
    assert view.startswith('<div id="circuits-vis-') and "CircuitsVis.AttentionHeads" in view
    assert "</b" not in view  # escaped so that a token cannot end the script element
    assert len(view) < 2000


def _chromium(url: str, *extra: str, timeout: int = 120) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="kcs-chromium-")
    try:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: nothing can come from the network
                "--virtual-time-budget=10000",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _screenshot_pixels(html_path: Path, png: Path, size: str = "1200,2000") -> np.ndarray:
    import matplotlib.image as mpimg

    r = _chromium(html_path.resolve().as_uri(), f"--screenshot={png}", f"--window-size={size}")
    assert png.exists(), f"chromium wrote no screenshot (rc={r.returncode}): {r.stderr[-2000:]}"
    img = mpimg.imread(str(png))[..., :3]
    return (img * 255).round().astype(np.uint8) if img.dtype != np.uint8 else img


def _check_not_blank(img: np.ndarray, min_colors: int, min_ink: float) -> None:
    colors = np.unique(img.reshape(-1, 3), axis=0)
    ink = (img.min(-1) < 235).mean()  # share of clearly non-white pixels
    assert len(colors) >= min_colors, f"only {len(colors)} distinct colours: blank render?"
    assert ink >= min_ink, f"only {ink:.1%} non-white pixels: blank render?"


@needs_chromium
def test_report_renders_offline_in_headless_chromium(report, tmp_path):
    _, path = report
    img = _screenshot_pixels(path, tmp_path / "report.png")
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    _check_not_blank(img, min_colors=500, min_ink=0.05)


@needs_chromium
def test_every_circuitsvis_view_is_drawn_offline(report, tmp_path):
    """After the scripts run, each view's <div> holds the component (no network needed)."""
    _, path = report
    r = _chromium(path.resolve().as_uri(), "--dump-dom")
    dom = r.stdout
    views = re.findall(r'<div id="(circuits-vis-[^"]+)" class="cv">(.{0,60})', dom, re.S)
    assert len(views) >= 4, r.stderr[-2000:]
    empty = [v for v, body in views if not body.startswith("<")]
    assert not empty, f"views not rendered: {empty}"


@needs_chromium
def test_views_alone_draw_pixels(report, tmp_path):
    """A page with only the circuitsvis views (attention heads, coloured tokens) is not blank:
    the pixels come from the inlined JavaScript, not from PNGs."""
    from kcs_lens.analyses.report import Views, page, views_fragment

    data, _ = report
    html = tmp_path / "views.html"
    html.write_text(page("views", views_fragment(data), Views()))
    img = _screenshot_pixels(html, tmp_path / "views.png", size="1200,1400")
    _check_not_blank(img, min_colors=50, min_ink=0.02)
