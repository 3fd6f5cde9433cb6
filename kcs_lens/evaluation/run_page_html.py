"""The run page's HTML (:mod:`kcs_lens.evaluation.run_page` gathers its data): the summary, curves,
per-fact, density and config sections, the inline CSS and JavaScript; the charts are
:mod:`kcs_lens.evaluation.svg_chart`. Nothing is loaded from the network when the page is viewed."""

from __future__ import annotations

import json
from typing import Any, Sequence

from kcs_lens.evaluation.paper_table import ANSWER_SETS, KEYS, before_after, short
from kcs_lens.evaluation.svg_chart import esc, line_chart
from kcs_lens.stats import flat_numbers

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"),
    ("curves", "Training curves"),
    ("facts", "Per-fact answers"),
    ("density", "Density"),
    ("config", "Configuration"),
)
# Curves first in this order; every other number of metrics.jsonl follows in the order it appears.
FIRST = (
    "target_ratio",
    "control_ratio",
    "lm_ratio",
    "target_top1",
    "target_mc",
    "control_mc",
    "sparsity",
    "control_top1",
    "target_rank",
    "control_rank",
)


# ------------------------------------------------------------------------------------------
# HTML sections
# ------------------------------------------------------------------------------------------
def _table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "", attrs: Sequence[str] = ()) -> str:
    h = "".join(f"<th>{c}</th>" for c in head)
    body = "".join(
        f"<tr{(' ' + attrs[i]) if attrs else ''}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for i, r in enumerate(rows)
    )
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def _g(x: Any, spec: str = ".4g") -> str:
    return "&ndash;" if x is None else format(x, spec)


def _pm(x: float | None, sd: float | None) -> str:
    return "&ndash;" if x is None else f"{x:+.4g}" + ("" if sd is None else f' <span class="sd">± {sd:.2g}</span>')


def summary_section(d: dict[str, Any]) -> str:
    runs, mean = d["runs"], d["mean"]
    head = ["seed", "selected step", "criteria met", "sparsity %"]
    head += [f"dPPL {label} (random)" for _, label in KEYS] + [f"PPL ratio {label}" for _, label in KEYS]
    head += [f"top-1 {label} (orig → rem)" for _, label in ANSWER_SETS] + ["rank TargetKG (orig → rem)"]
    rows = []
    for r in [x["row"] for x in runs] + ([mean] if mean else []):
        is_mean = r["seed"] == "mean"
        sd = (lambda k, r=r: r.get(f"{k}_seed_std")) if is_mean else (lambda k: None)
        step = "" if is_mean else _g(next(x["selected_step"] for x in runs if x["row"] is r), "d")
        cells = [
            "<b>mean ± sd over seeds</b>" if is_mean else esc(r["seed"]),
            step,
            "yes" if r["meets_criteria"] else "no",
            f"{100 * r['sparsity']:.2f}" + (f' <span class="sd">± {100 * (sd("sparsity") or 0):.2f}</span>' if is_mean else ""),
        ]
        for k, _ in KEYS:
            rnd = r.get(f"random_dppl_{k}")
            rnd_sd = r.get(f"random_dppl_{k}_std") if not is_mean else sd(f"random_dppl_{k}")
            cells.append(f'{_pm(r[f"dppl_{k}"], sd(f"dppl_{k}"))}<br><span class="rnd">random {_pm(rnd, rnd_sd)}</span>')
        cells += [_pm(r[f"ratio_{k}"], sd(f"ratio_{k}")).lstrip("+") for k, _ in KEYS]
        cells += [before_after(r.get(f"top1_original_{k}"), r.get(f"top1_remaining_{k}")) for k, _ in ANSWER_SETS]
        cells.append(before_after(r.get("rank_original_target"), r.get("rank_remaining_target"), ".1f"))
        rows.append(cells)
    draws = runs[0]["baseline_draws"]
    sel = d["selection"]
    note = (
        f"<p class='note'>dPPL = PPL(remaining) &minus; PPL(original) on TargetKG, ControlKG (validation) and held-out "
        f"ControlLM text; random = the same number of weights removed at random in every masked matrix (mean ± sd over "
        f"{draws} draws). Top-1 = share of triplets whose tail's first token is the model's answer; rank = its mean rank "
        f"(0 = top). Checkpoint selection: {esc(sel.get('rule', ''))}.</p>"
    )
    keys = list(dict.fromkeys(k for x in runs for k in flat_numbers(x["summary"])))
    extra = _table(
        ["summary.json"] + [f"seed {x['seed']}" for x in runs],
        [[esc(k)] + [_g(flat_numbers(x["summary"]).get(k), ".5g") for x in runs] for k in keys],
        "num",
    )
    return (
        _table(head, rows, "num summary")
        + note
        + f"<details><summary>every number of summary.json ({len(keys)})</summary>{extra}</details>"
    )


def _label(metric: str) -> str:
    return metric.replace("_", " ").replace("/", ": ")


def curves_section(d: dict[str, Any]) -> str:
    runs = d["runs"]
    keys = list(dict.fromkeys(k for x in runs for k in x["curves"]))
    keys = [k for k in FIRST if k in keys] + [k for k in keys if k not in FIRST]
    charts = []
    for k in keys:
        series = [(f"seed {x['seed']}", COLORS[i % len(COLORS)], x["curves"].get(k, [])) for i, x in enumerate(runs)]
        vlines = [
            (x["selected_step"], COLORS[i % len(COLORS)], f"seed {x['seed']}: selected step {x['selected_step']}")
            for i, x in enumerate(runs)
            if x["selected_step"] is not None
        ]
        th = d["thresholds"].get(k)
        hline = None if th is None else (th[0], f"selection: {th[1]} {th[0]:g}")
        charts.append(f'<figure data-metric="{esc(k)}">{line_chart(_label(k), series, vlines=vlines, hline=hline)}</figure>')
    legend = " ".join(
        f'<span class="key" style="border-color:{COLORS[i % len(COLORS)]}">seed {esc(x["seed"])}</span>'
        for i, x in enumerate(runs)
    )
    return (
        f"<p class='note'>Every number of metrics.jsonl (one point per evaluation of the deterministic mask; "
        f"<code>train: ...</code> = the training loss terms averaged since the previous evaluation). Dashed vertical "
        f"line: the step each seed's selection picked; dotted grey line: a selection threshold. {legend}</p>"
        f'<div class="charts">{"".join(charts)}</div>'
    )


SET_NAMES = {"target": "TargetKG", "control": "ControlKG (val)", "paraphrases": "paraphrases"}


def facts_section(d: dict[str, Any]) -> str:
    runs = d["runs"]
    rows, attrs = [], []
    relations, sets = set(), []
    has_mc = any("mc_original" in f for x in runs for fs in x["facts"].values() for f in fs)
    for x in runs:
        for s, facts in x["facts"].items():
            if s not in sets:
                sets.append(s)
            for f in facts:
                relations.add(f["relation"])
                lost = f["rank_original"] == 0 and f["rank_remaining"] > 0
                changed = f["answer_original"] != f["answer_remaining"]
                rows.append(
                    [
                        esc(SET_NAMES.get(s, s)),
                        esc(x["seed"]),
                        esc(f["head"]),
                        esc(f["relation"]),
                        esc(f["tail"]),
                        f"<code>{esc(repr(f['answer_original']))}</code>",
                        f"<code>{esc(repr(f['answer_remaining']))}</code>",
                        str(f["rank_original"]),
                        str(f["rank_remaining"]),
                        f"{f['logprob_original']:.2f}",
                        f"{f['logprob_remaining']:.2f}",
                    ]
                    + ([esc(f.get("mc_original", "")), esc(f.get("mc_remaining", ""))] if has_mc else [])
                )
                attrs.append(
                    f'data-set="{esc(s)}" data-rel="{esc(f["relation"])}" data-seed="{esc(x["seed"])}" '
                    f'class="{"lost" if lost else ""}{" changed" if changed else ""}"'
                )
    if not rows:
        return "<p>No per-fact answers in the evaluation.</p>"
    opt = lambda vals, names=None: "".join(f'<option value="{esc(v)}">{esc((names or {}).get(v, v))}</option>' for v in vals)
    controls = (
        '<div class="filters">'
        f'<label>set <select id="f-set"><option value="">all</option>{opt(sets, SET_NAMES)}</select></label> '
        f'<label>relation <select id="f-rel"><option value="">all</option>{opt(sorted(relations))}</select></label> '
        f'<label>seed <select id="f-seed"><option value="">all</option>{opt([str(x["seed"]) for x in runs])}</select></label> '
        '<label><input type="checkbox" id="f-changed"> only answers that changed</label> '
        '<label>search <input type="search" id="f-text" size="14"></label> '
        '<span id="f-count"></span></div>'
    )
    head = ["set", "seed", "head", "relation", "tail", "answer: original", "answer: remaining"]
    head += ["tail rank: original", "tail rank: remaining", "log p tail: original", "log p tail: remaining"]
    head += ["multiple choice: original", "multiple choice: remaining"] if has_mc else []
    n_lost = sum("lost" in a for a in attrs)
    n_target = sum('data-set="target"' in a for a in attrs)
    n_lost_t = sum("lost" in a and 'data-set="target"' in a for a in attrs)
    return (
        f"<p class='note'>The answer is the model's top token at the tail's first position; rank 0 = the tail is the "
        f"answer. Multiple choice (when the run has it): the tail the model scores best among the set's choices. Rows in red lost their answer (rank 0 before, not after): {n_lost_t} of {n_target} TargetKG rows, "
        f"{n_lost} of {len(rows)} in all. Click a column to sort.</p>" + controls + _table(head, rows, "num facts", attrs)
    )


def density_section(d: dict[str, Any]) -> str:
    runs = d["runs"]
    layers = sorted({int(k) for x in runs for k in x["density"]["per_layer"]})
    series = [
        (f"seed {x['seed']}", COLORS[i % len(COLORS)], [(l, 100 * x["density"]["per_layer"][str(l)]) for l in layers])
        for i, x in enumerate(runs)
    ]
    chart = line_chart("density per layer (% of masked weights)", series, width=420).replace(">step<", ">layer<")
    tables = []
    for x in runs:
        d_ = x["density"]
        mats = list(d_["per_matrix"])
        rows = []
        for l, row in d_["per_layer_matrix"].items():
            rows.append([f"L{esc(l)}"] + [_cell(row.get(m)) for m in mats] + [_cell(d_["per_layer"].get(l))])
        rows.append(["all"] + [_cell(d_["per_matrix"][m]) for m in mats] + [_cell(x["row"]["sparsity"], invert=True)])
        tables.append(f"<div><h4>seed {esc(x['seed'])}</h4>{_table(['layer', *mats, 'all'], rows, 'num density')}</div>")
    return (
        "<p class='note'>Density = share of a layer's or matrix's masked weights that are in the subnetwork (%).</p>"
        f'<div class="row"><figure>{chart}</figure>{"".join(tables)}</div>'
    )


def _cell(v: float | None, invert: bool = False) -> str:
    if v is None:
        return "&ndash;"
    v = 1 - v if invert else v
    a = min(1.0, max(0.0, v)) ** 0.5
    return f'<span class="dens" style="background:rgba(31,119,180,{a:.2f})">{100 * v:.2f}</span>'


def config_section(d: dict[str, Any]) -> str:
    runs = d["runs"]
    cfgs = [x["config"]["config"] for x in runs]
    keys = list(dict.fromkeys(k for c in cfgs for k in c))
    same = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in cfgs}) == 1]
    diff = [k for k in keys if k not in same]
    rows = [[esc(k), f"<code>{esc(json.dumps(cfgs[0].get(k), default=str))}</code>"] for k in same]
    out = _table(["setting", "value"], rows, "config")
    if diff:
        out += "<h4>Settings that differ between the seeds</h4>" + _table(
            ["setting"] + [f"seed {x['seed']}" for x in runs],
            [[esc(k)] + [f"<code>{esc(json.dumps(c.get(k), default=str))}</code>" for c in cfgs] for k in diff],
            "config",
        )
    for x in runs:
        out += (
            f"<details><summary>{esc(x['dir'])}/config.json</summary>"
            f"<pre>{esc(json.dumps(x['config'], indent=2, default=str))}</pre></details>"
        )
    return out


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:20px;color:#222;max-width:1600px}
h1{font-size:21px;margin:0 0 4px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}h4{margin:6px 0}
nav a{margin-right:14px}table{border-collapse:collapse;font-size:12px;margin:6px 0 12px}td,th{border:1px solid #ddd;padding:3px 6px}
th{background:#f3f3f3;position:sticky;top:0}table.num td{text-align:right}table.num td:first-child{text-align:left}
.sd,.rnd{color:#777;font-size:11px}.note{color:#555;font-size:12px;max-width:1200px}.charts{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0}.ct{font-size:12px;font-weight:600}.tk{font-size:10px;fill:#555}.key{border-left:12px solid;padding-left:4px;margin-right:8px}
table.facts th{cursor:pointer;user-select:none}table.facts th.asc:after{content:" \\25B2"}table.facts th.desc:after{content:" \\25BC"}
tr.lost td{background:#fde8e8}tr.changed td:nth-child(7){font-weight:600}.filters{margin:6px 0;font-size:13px}.filters label{margin-right:10px}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.dens{display:inline-block;min-width:44px}
pre{background:#f7f7f7;padding:6px;font-size:11px;max-height:400px;overflow:auto}table.config td{text-align:left}
"""

# Sorting (click a header; numbers sort as numbers) and filtering of the per-fact table.
JS = """
(function(){
  var t=document.querySelector('table.facts'); if(!t) return;
  var body=t.tBodies[0], rows=Array.prototype.slice.call(body.rows);
  var f={set:document.getElementById('f-set'),rel:document.getElementById('f-rel'),seed:document.getElementById('f-seed'),
         ch:document.getElementById('f-changed'),tx:document.getElementById('f-text'),n:document.getElementById('f-count')};
  function apply(){
    var q=f.tx.value.toLowerCase(), shown=0;
    rows.forEach(function(r){
      var ok=(!f.set.value||r.dataset.set===f.set.value)&&(!f.rel.value||r.dataset.rel===f.rel.value)&&
             (!f.seed.value||r.dataset.seed===f.seed.value)&&(!f.ch.checked||r.classList.contains('changed'))&&
             (!q||r.textContent.toLowerCase().indexOf(q)>=0);
      r.style.display=ok?'':'none'; if(ok) shown++;
    });
    f.n.textContent=shown+' of '+rows.length+' rows';
  }
  [f.set,f.rel,f.seed,f.ch].forEach(function(e){e.addEventListener('change',apply);});
  f.tx.addEventListener('input',apply);
  Array.prototype.forEach.call(t.tHead.rows[0].cells,function(th,i){
    th.addEventListener('click',function(){
      var asc=!th.classList.contains('asc');
      Array.prototype.forEach.call(t.tHead.rows[0].cells,function(h){h.classList.remove('asc','desc');});
      th.classList.add(asc?'asc':'desc');
      var key=function(r){var s=r.cells[i].textContent, x=parseFloat(s); return isNaN(x)?s.toLowerCase():x;};
      rows.sort(function(a,b){var x=key(a),y=key(b); return (x<y?-1:x>y?1:0)*(asc?1:-1);});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
  apply();
  document.body.dataset.ready='1';
})();
"""


def render(d: dict[str, Any]) -> str:
    """The page's HTML (self-contained: inline CSS, SVG and JavaScript)."""
    seeds = ", ".join(str(x["seed"]) for x in d["runs"])
    title = f"kcs-lens run: {short(d['model'])} / {short(d['target_kg'])}" + (
        "" if d["ablation"] == "full" else f" / {d['ablation']}"
    )
    bodies = {
        "summary": summary_section(d),
        "curves": curves_section(d),
        "facts": facts_section(d),
        "density": density_section(d),
        "config": config_section(d),
    }
    nav = "".join(f'<a href="#{k}">{v}</a>' for k, v in SECTIONS)
    parts = [
        f"<h1>{esc(title)}</h1>",
        f"<p>model <code>{esc(d['model'])}</code>; TargetKG <code>{esc(d['target_kg'])}</code>; ablation {esc(d['ablation'])}; "
        f"seed{'s' if len(d['runs']) > 1 else ''} {esc(seeds)}; runs: "
        + ", ".join(f"<code>{esc(x['dir'])}</code>" for x in d["runs"])
        + "</p>",
        f"<nav>{nav}</nav>",
    ]
    parts += [f'<section id="{k}"><h2>{v}</h2>{bodies[k]}</section>' for k, v in SECTIONS]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)} (seeds {esc(seeds)})</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(parts)
        + f"\n<script>{JS}</script>\n</body></html>\n"
    )
