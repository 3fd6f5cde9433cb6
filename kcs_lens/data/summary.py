"""What ``kcs-lens kg show`` reports about a triplet set: sizes, tails, templates, overlap, model fit."""

from __future__ import annotations

from collections import Counter
from typing import Any

from kcs_lens.data.triplets import TailScoring, TripletSet

__all__ = ["kg_summary", "format_summary"]


def _template_label(meta: dict[str, Any]) -> str:
    """How a triplet's text was made: its template, or where the given text came from."""
    if meta.get("template"):
        return f"template {meta['template']!r}"
    src = meta.get("text_source", "given")
    return f"field {src!r}" if src.startswith("best_") else f"{src} text"


def _tail_token_counts(kg: TripletSet, tokenizer: Any) -> dict[int, int]:
    """Histogram of the number of tail tokens (the tail with its leading space, as scored)."""
    c = Counter(len(tokenizer.encode(t.tail_str, add_special_tokens=False)) for t in kg)
    return dict(sorted(c.items()))


def kg_summary(
    kg: TripletSet,
    *,
    tokenizer: Any = None,
    control: TripletSet | None = None,
    model: Any = None,
    tail_scoring: TailScoring = "all",
    batch_size: int = 32,
    examples: int = 3,
) -> dict[str, Any]:
    """A JSON-able summary of ``kg``; ``model`` (duck-typed, see verbalize.py) adds tail PPL / accuracy."""
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    out: dict[str, Any] = {
        "name": kg.name,
        "source": kg.source,
        "n_triplets": len(kg),
        "n_unique": len(kg.keys()),
        "relations": dict(Counter(t.relation for t in kg).most_common()),
        "tail_words": dict(sorted(Counter(len(t.tail.split()) for t in kg).items())),
        "tail_tokens": _tail_token_counts(kg, tok) if tok is not None else None,
        "templates": dict(Counter(_template_label(t.meta) for t in kg).most_common()),
        "examples": [f"{t.prefix}|{t.tail_str}  ({t.head}, {t.relation}, {t.tail})" for t in kg.triplets[:examples]],
    }
    if control is not None:
        overlap = [t for t in control if t.key in kg.keys()]
        out["control"] = {
            "name": control.name,
            "source": control.source,
            "n_triplets": len(control),
            "overlap": len(overlap),
            "overlap_examples": [" | ".join(t.key) for t in overlap[:10]],
        }
    if model is not None:
        from kcs_lens.data.verbalize import score_tails

        out["model"] = {
            "spec": str(getattr(model, "spec", type(model).__name__)),
            "tail_scoring": tail_scoring,
            **score_tails(model, kg, batch_size=batch_size, tail_scoring=tail_scoring).summary(),
        }
    return out


def _counts(d: dict[Any, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in d.items())


def format_summary(s: dict[str, Any]) -> str:
    """The summary as readable lines."""
    lines = [f"{s['name']}  ({s['source']})", f"  triplets: {s['n_triplets']} ({s['n_unique']} unique)"]
    lines.append("  per relation:")
    lines += [f"    {rel:<18} {n}" for rel, n in s["relations"].items()]
    if s["tail_tokens"] is not None:
        lines.append(f"  tail tokens (count: triplets): {_counts(s['tail_tokens'])}")
    else:
        lines.append(f"  tail words (count: triplets): {_counts(s['tail_words'])}  (no tokenizer: pass --model or --tokenizer)")
    lines.append("  text from:")
    lines += [f"    {n:>6}  {label}" for label, n in s["templates"].items()]
    lines.append("  examples (prefix|tail):")
    lines += [f"    {e}" for e in s["examples"]]
    if "control" in s:
        c = s["control"]
        lines.append(
            f"  overlap with control {c['name']} ({c['n_triplets']} triplets): {c['overlap']} "
            "(dropped from the ControlKG when training)"
        )
        lines += [f"    {e}" for e in c["overlap_examples"]]
    if "model" in s:
        m = s["model"]
        lines.append(
            f"  original model {m['spec']}: tail PPL {m['tail_ppl']:.2f}, top-1 accuracy {m['top1_acc']:.3f}, "
            f"mean first-token rank {m['mean_rank']:.1f} (tail scoring: {m['tail_scoring']})"
        )
    return "\n".join(lines)
