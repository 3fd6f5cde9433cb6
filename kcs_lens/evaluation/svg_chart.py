"""SVG line charts written by hand (no plotting library, nothing loaded when viewed), for the run page."""

from __future__ import annotations

import html
import math
from typing import Any, Sequence


def esc(x: Any) -> str:
    return html.escape(str(x))


def _nice(x: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``x``."""
    if x <= 0:
        return 1.0
    p = 10 ** math.floor(math.log10(x))
    return next(m * p for m in (1, 2, 5, 10) if m * p >= x * (1 - 1e-9))


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        every = max(1, math.ceil((b - a) / 5))
        return [10.0**k for k in range(a, b + 1, every)]
    step = _nice((hi - lo) / 4 if hi > lo else abs(hi) or 1.0)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _fmt_tick(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:.4g}"


def line_chart(
    title: str,
    series: list[tuple[str, str, list[tuple[int, float]]]],
    *,
    vlines: Sequence[tuple[float, str, str]] = (),
    hline: tuple[float, str] | None = None,
    width: int = 330,
    height: int = 200,
) -> str:
    """An SVG line chart: ``series`` = (label, colour, [(x, y)]); ``vlines`` = (x, colour, label)
    (selected steps, dashed); ``hline`` = (y, label) (a threshold, grey). Log y where the values
    are positive and span more than 50x."""
    xs = [x for _, _, pts in series for x, _ in pts] + [v for v, _, _ in vlines]
    ys = [y for _, _, pts in series for _, y in pts] + ([hline[0]] if hline else [])
    if not xs or not ys:
        return ""
    log = min(ys) > 0 and max(ys) / min(ys) > 50
    tr = (lambda y: math.log10(y)) if log else (lambda y: y)
    ylo, yhi = min(ys), max(ys)
    if not log and ylo == yhi:
        ylo, yhi = ylo - 0.5 * (abs(ylo) or 1), yhi + 0.5 * (abs(yhi) or 1)
    ticks = _ticks(ylo, yhi, log)
    t_lo, t_hi = tr(min(ticks[0], ylo)), tr(max(ticks[-1], yhi))
    x_lo, x_hi = min(xs), max(xs)
    x_hi = x_hi if x_hi > x_lo else x_lo + 1
    L, R, T, B = 52, 16, 22, 28
    px = lambda x: L + (x - x_lo) / (x_hi - x_lo) * (width - L - R)
    py = lambda y: T + (1 - (tr(y) - t_lo) / ((t_hi - t_lo) or 1)) * (height - T - B)
    out = [
        f'<svg class="chart" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img"><title>{esc(title)}</title>',
        f'<text x="{L}" y="14" class="ct">{esc(title)}{" (log scale)" if log else ""}</text>',
        f'<rect x="{L}" y="{T}" width="{width - L - R}" height="{height - T - B}" fill="none" stroke="#ccc"/>',
    ]
    for t in ticks:
        if t_lo - 1e-12 <= tr(t) <= t_hi + 1e-12:
            y = py(t)
            out.append(f'<line x1="{L}" x2="{width - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{L - 4}" y="{y + 3:.1f}" text-anchor="end" class="tk">{_fmt_tick(t)}</text>')
    for x in _ticks(x_lo, x_hi, False):
        if x_lo <= x <= x_hi:
            out.append(f'<text x="{px(x):.1f}" y="{height - 14}" text-anchor="middle" class="tk">{_fmt_tick(x)}</text>')
    out.append(f'<text x="{(L + width - R) / 2:.0f}" y="{height - 2}" text-anchor="middle" class="tk">step</text>')
    if hline is not None:
        y = py(hline[0])
        out.append(
            f'<line class="threshold" x1="{L}" x2="{width - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#555" '
            f'stroke-dasharray="2,3"><title>{esc(hline[1])}</title></line>'
            f'<text x="{width - R - 2}" y="{y - 3:.1f}" text-anchor="end" class="tk">{esc(hline[1])}</text>'
        )
    for x, color, label in vlines:
        out.append(
            f'<line class="selected" x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{T}" y2="{height - B}" stroke="{color}" '
            f'stroke-dasharray="5,3" opacity="0.8"><title>{esc(label)}</title></line>'
        )
    for label, color, pts in series:
        pts = sorted(pts)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline class="series" points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        out += [
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2" fill="{color}"><title>{esc(label)} step {x}: {y:.6g}</title></circle>'
            for x, y in pts
        ]
    out.append("</svg>")
    return "".join(out)
