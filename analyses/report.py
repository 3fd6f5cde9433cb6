"""The self-contained HTML report: heatmaps, agreement tables and circuitsvis views, offline.

circuitsvis's ``RenderedHTML.local_src`` is ``<div id=X/>`` + ``<script type="module">`` holding
the whole library (about 1.3 MB) followed by one ``CircuitsVis.render(X, Component, props)``
call. :func:`split_view` cuts it into the library and the per-view call; :func:`page` inlines the
library ONCE, as a classic ``<script>`` (so ``CircuitsVis`` is a global the view scripts can
call), and each view becomes a ``<div>`` plus a small script. Heatmaps are PNGs embedded as
``data:`` URIs. Nothing is loaded from the network.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from jaxtyping import Float

RENDER_CALL = "CircuitsVis.render("


# ------------------------------------------------------------------------------------------
# circuitsvis, offline
# ------------------------------------------------------------------------------------------
def split_view(local_src: str) -> tuple[str, str]:
    """(library JavaScript, per-view HTML) of one circuitsvis ``local_src``."""
    head, sep, rest = local_src.partition('<script crossorigin type="module">')
    m = re.search(r'id="([^"]+)"', head)
    i = rest.rfind(RENDER_CALL)
    j = rest.rfind("</script>")
    if not sep or not m or i < 0 or j < i:
        raise ValueError("unexpected circuitsvis local_src layout (expected <div id=..> + <script> library + render call)")
    js = rest[:i].strip()
    call = rest[i:j].strip().replace("</", "<\\/")  # a token like '</' must not close the script
    view = f'<div id="{m.group(1)}" class="cv"></div>\n<script>{call}</script>'
    return js, view


class Views:
    """Collects circuitsvis views; ``library`` is the shared JavaScript (inlined once)."""

    def __init__(self) -> None:
        self.library: str | None = None

    def add(self, rendered: Any) -> str:
        js, view = split_view(rendered.local_src)
        if self.library is None:
            self.library = js
        return view

    def script_tag(self) -> str:
        if self.library is None:
            return ""
        return "<script>\n" + self.library.replace("</script", "<\\/script") + "\n</script>"


def attention_view(views: Views, tokens: list[str], patterns: Sequence, names: list[str]) -> str:
    import circuitsvis as cv

    att: Float[np.ndarray, "heads dst src"] = np.asarray(patterns, dtype=np.float32)
    return views.add(cv.attention.attention_heads(attention=att, tokens=tokens, attention_head_names=names))


def token_view(views: Views, tokens: list[str], values: list[float], bound: float) -> str:
    import circuitsvis as cv

    return views.add(
        cv.tokens.colored_tokens(
            tokens=tokens, values=values, min_value=-bound, max_value=bound, negative_color="red", positive_color="blue"
        )
    )


def views_fragment(data: dict[str, Any], set_name: str | None = None) -> str:
    """The attention and token views of one set as an HTML fragment with the library inlined once
    (for notebooks: ``IPython.display.HTML(views_fragment(data))``)."""
    v = Views()
    body = _attention_section(v, data["sets"][set_name or data["primary"]]) + _token_section(
        v, data["sets"][set_name or data["primary"]]
    )
    return v.script_tag() + body


# ------------------------------------------------------------------------------------------
# HTML pieces
# ------------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, fmt: str = "{:+.3f}") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "&ndash;"
    return fmt.format(x)


def _img(path: str | Path, alt: str) -> str:
    b64 = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    h = "".join(f"<th>{c}</th>" for c in header)
    r = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{r}</tbody></table>'


def _stat(s: dict[str, Any] | None) -> str:
    if not s or s.get("value") is None:
        return '<span class="na">n/a</span>'
    ci = s.get("ci95")
    ci_s = f' <span class="ci">[{ci[0]:+.2f}, {ci[1]:+.2f}]</span>' if ci else ""
    return f"{s['value']:+.2f}{ci_s}"


def agreement_table(res: dict[str, Any]) -> str:
    parts = []
    for scope, rows in res["agreement"].items():
        n = next(iter(rows.values()))["n_units"]
        label = {"masked_layers": "units in masked layers", "all_units": "all heads and MLP layers"}.get(scope, scope)
        parts.append(f"<h4>{_e(label)} (n = {n})</h4>")
        parts.append(
            _table(
                ["methods", "Spearman", "Kendall", "Jaccard top-5", "Jaccard top-10"],
                [
                    [_e(pair), _stat(s["spearman"]), _stat(s["kendall"]), _stat(s.get("jaccard@5")), _stat(s.get("jaccard@10"))]
                    for pair, s in rows.items()
                ],
                "agree",
            )
        )
    return "\n".join(parts)


def head_decisions_table(res: dict[str, Any]) -> str:
    """Head-granularity runs: each method's |effect| against the subnetwork's heads, and every head
    of the masked layers with its decision, mask probability and each method's mean effect."""
    hd = res.get("head_decisions")
    if not hd:
        return ""
    rows = [[_e(m), str(a["n_in_subnetwork"]), _stat(a["auroc"]), _stat(a["precision@k"])] for m, a in hd["agreement"].items()]
    return (
        "<h3>Heads in the subnetwork vs each method (head granularity, one to one)</h3>"
        f"<p>In the subnetwork: {_e(', '.join(hd['in_subnetwork']) or 'no head')}.</p>"
        + _table(["method", "heads in subnetwork", "AUROC of |effect|", "precision@k"], rows, "agree")
        + "<p>Every head of the masked layers: the subnetwork's decision, its mask probability σ(l) and each "
        "method's mean effect over the prompts.</p>"
        + _table(
            ["head", "in subnetwork", "mask prob σ(l)", "knock-out", "patching", "attribution patching", "DLA"],
            [
                [_e(h["head"]), "yes" if h["in_subnetwork"] else "no", _num(h["mask_prob"], "{:.3f}")]
                + [_num(h[m]) for m in ("knockout", "patching", "attribution", "dla")]
                for h in hd["heads"]
            ],
            "units head-decisions",
        )
    )


def _units_table(data: dict[str, Any], res: dict[str, Any], n: int = 12) -> str:
    units = data["units"]
    dens = np.concatenate([np.asarray(data["structure"]["head"], float).ravel(), np.asarray(data["structure"]["mlp"], float)])
    summ = res["unit_summary"]
    ko = np.nan_to_num(np.abs(np.asarray(summ["knockout"]["mean"], float)), nan=0.0)
    pa = np.nan_to_num(np.abs(np.asarray(summ["patching"]["mean"], float)), nan=0.0)
    masked = np.isfinite(dens)  # units outside the masked layers cannot hold the subnetwork
    order = [u for u in np.argsort(-(ko + 1e-6 * pa), kind="stable") if masked[u]][:n]

    def cell(m: str, u: int | np.integer) -> str:
        s = summ[m]
        return f'{_num(s["mean"][u])} <span class="ci">[{_num(s["ci95_low"][u], "{:+.2f}")}, {_num(s["ci95_high"][u], "{:+.2f}")}]</span>'

    rows = [
        [units[u], _num(dens[u], "{:.4f}"), cell("knockout", u), cell("patching", u), cell("attribution", u), cell("dla", u)]
        for u in order
    ]
    return _table(["unit", "density", "knock-out", "patching", "attribution patching", "DLA"], rows, "units")


def _heatmaps(data: dict[str, Any], name: str) -> str:
    from kcs_lens.analyses.figures import METHOD_TITLES

    imgs = data["files"]["heatmaps"][name]
    return '<div class="row">' + "".join(f"<figure>{_img(p, METHOD_TITLES[m])}</figure>" for m, p in imgs.items()) + "</div>"


def _attention_section(v: Views, res: dict[str, Any]) -> str:
    if not res.get("attention_views"):
        return ""
    out = ["<h3>Attention of the top heads: original vs remaining model</h3>"]
    for a in res["attention_views"]:
        text = res["prompts"][a["prompt"]]["text"]
        out.append(f"<p class='prompt'>{_e(text)} &mdash; heads {_e(', '.join(a['heads']))}</p>")
        out.append(
            '<div class="row">'
            f'<div class="col"><h4>original</h4>{attention_view(v, a["tokens"], a["original"], a["heads"])}</div>'
            f'<div class="col"><h4>remaining (subnetwork removed)</h4>{attention_view(v, a["tokens"], a["remaining"], a["heads"])}</div>'
            "</div>"
        )
    return "\n".join(out)


def _token_section(v: Views, res: dict[str, Any]) -> str:
    tv = res.get("token_views") or []
    if not tv:
        return ""
    bound = max([abs(x) for t in tv for x in t["delta_logprob"]] + [1e-6])
    out = [
        "<h3>Log-prob change of each token, remaining minus original</h3>",
        f"<p class='note'>red = less likely without the subnetwork, blue = more likely (scale &plusmn;{bound:.2f} nats); "
        "the tail starts after the last prefix token.</p>",
    ]
    for t in tv:
        out.append(f"<div class='tokens'>{token_view(v, t['tokens'], t['delta_logprob'], bound)}</div>")
    return "\n".join(out)


def _prompt_table(res: dict[str, Any], n: int = 40) -> str:
    rows = []
    for p in res["prompts"][:n]:
        d = p["logprob_remaining"] - p["logprob_original"]
        corr = (
            "&ndash;"
            if p["corrupted"] is None
            else ("<i>no aligned swap</i>" if p["corrupted"] == p["text"] else _e(p["corrupted"]))
        )
        rows.append(
            [
                _e(p["text"]),
                corr,
                _num(p["logprob_original"]),
                _num(p["logprob_remaining"]),
                _num(d),
                _num(p["logprob_corrupted"]),
            ]
        )
    return _table(
        ["prompt", "corrupted (head swap)", "log p tail: original", "remaining", "change", "corrupted"], rows, "prompts"
    )


def _set_section(v: Views, data: dict[str, Any], name: str, primary: bool) -> str:
    res = data["sets"][name]
    lp = res["logprob"]
    title = (
        f"TargetKG prompts ({_e(res['name'])})"
        if name == "target"
        else (f"ControlKG prompts ({_e(res['name'])}): specificity check" if name == "control" else f"Prompts: {_e(name)}")
    )
    c = res["corruption"]
    corr = c["mode"] + (f"; {c['n_fallback']} prompt(s) without a length-aligned swap left out" if c.get("n_fallback") else "")
    out = [
        f"<h2>{title}</h2>",
        f"<p>{res['n_prompts']} prompts (of {res['n_available']}); mean tail log-prob {lp['original_mean']:+.3f} original, "
        f"{lp['remaining_mean']:+.3f} remaining (change {lp['delta_mean']:+.3f}); corruption: {_e(corr)}.</p>",
        "<h3>Layer &times; head maps (last column: MLP layer)</h3>",
        _heatmaps(data, name),
        "<h3>Agreement (magnitudes; 95% bootstrap CI over prompts)</h3>",
        agreement_table(res),
        head_decisions_table(res),
        "<h3>Units where the subnetwork acts most (knock-out), mean [95% CI]</h3>",
        _units_table(data, res),
    ]
    if primary:
        out.append(_attention_section(v, res))
    out.append(_token_section(v, res))
    out.append("<h3>Prompts</h3>" + _prompt_table(res))
    return "\n".join(out)


def _structure_section(data: dict[str, Any]) -> str:
    st = data["structure"]
    L = data["model_shape"]["n_layers"]
    rows = []
    for l in range(L):
        hb = {m: np.asarray(st["head_by_matrix"][m], float)[l] for m in ("W_Q", "W_K", "W_V", "W_O")}
        mb = {m: float(np.asarray(st["mlp_by_matrix"][m], float)[l]) for m in ("W_in", "W_out")}
        f = lambda x: "&ndash;" if not np.isfinite(x) else f"{x:.4f}"
        rows.append(
            [f"L{l}", f(float(np.asarray(st["layer"], float)[l]))]
            + [f(float(np.nanmean(hb[m])) if np.isfinite(hb[m]).any() else np.nan) for m in hb]
            + [f(mb[m]) for m in mb]
        )
    img = data["files"].get("structure")
    return (
        "<h2>Subnetwork structure</h2>"
        "<p class='note'>Density = share of a component's masked weights in the subnetwork (grey / &ndash;: not masked). "
        "Per-head and per-neuron values are in comparison.json.</p>"
        + _table(["layer", "all masked", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"], rows, "structure")
        + (f"<figure class='wide'>{_img(img, 'subnetwork density per matrix, head and neuron')}</figure>" if img else "")
    )


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px}h2{font-size:19px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}h3{font-size:16px}h4{font-size:13px;margin:8px 0}
table{border-collapse:collapse;font-size:12px;margin:6px 0 14px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}.ci{color:#777;font-size:11px}.na{color:#aaa}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.col{flex:1 1 440px;min-width:380px;border:1px solid #eee;padding:6px}
figure{margin:0;flex:1 1 300px;max-width:440px}figure img{width:100%}.prompt{font-family:monospace;background:#f7f7f7;padding:4px}.note{color:#555;font-size:12px}
.tokens{margin:2px 0}figure.wide{max-width:100%}
"""


def page(title: str, body: str, views: Views) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style>\n{views.script_tag()}\n</head>\n<body>\n{body}\n</body></html>\n"
    )


def write_report(data: dict[str, Any], path: str | Path) -> Path:
    """Render ``report.html`` from the comparison data (figures must already be written)."""
    v = Views()
    st = data["structure"]
    head = [
        f"<h1>Knowledge-critical subnetwork vs other lenses &mdash; {_e(data['target_kg'])}</h1>",
        "<p>"
        f"run <code>{_e(data['run_dir'])}</code>; model <code>{_e(data['model_spec'])}</code> ({_e(data['backend'])} backend); "
        f"masked layers {st['masked_layers']} ({_e(st['granularity'])} masks); sparsity {100 * st['sparsity']:.2f}% of masked weights "
        f"({100 * st['sparsity_all_linear']:.2f}% of all linear weights).</p>",
        "<p class='note'>Every effect is the tail log-prob (first tail token at the last prefix position) of the original or clean "
        "run minus that of the intervened run: positive = the component supports the tail. Knock-out removes the subnetwork only "
        "inside one head (its Q, K, V, O slices) or one MLP layer. Activation patching (TransformerLens <code>patching</code>) "
        "replaces one head's output or one MLP output at all positions by its value on the corrupted prompt "
        f"({_e(data['settings']['corrupt'])}). Attribution patching is its gradient &times; activation-difference estimate; DLA is "
        "the direct effect on tail logit minus mean logit through the final LayerNorm (scale frozen). Agreement compares "
        "magnitudes.</p>",
    ]
    sections = [_set_section(v, data, name, name == data["primary"]) for name in data["sets"]]
    body = "\n".join(head + [_structure_section(data)] + sections)
    text = page(f"kcs-lens compare-circuits: {data['target_kg']}", body, v)
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)
