"""Model-dependent KG preparation: tail scores, best-template choice, known-fact filter.

``model`` is any object with ``.tokenizer`` and ``model(tokens) -> logits [batch seq vocab]``
(a ``kcs_lens.model.loading.LensModel``, a HookedTransformer, or a small adapter around an HF model;
an output with a ``.logits`` attribute is accepted too). Triplets are tokenized with
:func:`kcs_lens.data.triplets.tokenize_triplets`, so the prefix/tail split (the tail's leading
space belongs to its first token) and the BOS token are handled in one place.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kcs_lens.data.templates import article_variants, fill, merge_templates, templates_for
from kcs_lens.data.triplets import TailScoring, Triplet, TripletSet, tokenize_triplets
from kcs_lens.errors import KGError
from kcs_lens.evaluation.scoring import TailScores, tail_scores

__all__ = ["score_tails", "candidate_texts", "choose_templates", "filter_known", "model_logits"]

log = logging.getLogger(__name__)


def _device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, (torch.device, str)):
        return torch.device(dev)
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def model_logits(model: Any, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq vocab"]:
    """Logits of a duck-typed model (callable or ``.forward``; ``.logits`` outputs unwrapped)."""
    fn = model if callable(model) else model.forward
    out = fn(tokens.to(_device(model)))
    return getattr(out, "logits", out)


@torch.no_grad()
def score_tails(
    model: Any,
    triplets: Sequence[Triplet] | TripletSet,
    *,
    batch_size: int = 32,
    tail_scoring: TailScoring = "all",
    prepend_bos: bool = True,
) -> TailScores:
    """Tail scores (:class:`kcs_lens.evaluation.scoring.TailScores`) of every triplet under a duck-typed ``model``."""
    trip = list(triplets)
    if not trip:
        raise KGError("no triplets to score")
    d_vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    batch = tokenize_triplets(trip, model.tokenizer, prepend_bos=prepend_bos, tail_scoring=tail_scoring, d_vocab=d_vocab)
    device = _device(model)
    return tail_scores(lambda toks: model_logits(model, toks.to(device)), batch, batch_size=batch_size)


def candidate_texts(
    t: Triplet,
    templates: Mapping[str, list[str]] | None = None,
    *,
    variants: bool = True,
    space_variants: bool = False,
    where: str = "",
) -> list[tuple[str, str]]:
    """(template, text) candidates for a triplet: each template of its relation, with and without
    articles (``variants``) and optionally with a leading space (as in the paper's data)."""
    out: dict[str, str] = {}
    for base in templates_for(t.relation, templates, where=where):
        for tpl in article_variants(base) if variants else [base]:
            text = fill(tpl, t.head, t.tail)
            out.setdefault(text, tpl)
            if space_variants:
                out.setdefault(" " + text, " " + tpl)
    return [(tpl, text) for text, tpl in out.items()]


def choose_templates(
    kg: TripletSet,
    model: Any,
    templates: Mapping[str, list[str]] | str | None = None,
    *,
    variants: bool = True,
    space_variants: bool = False,
    only_templated: bool = True,
    batch_size: int = 32,
    tail_scoring: TailScoring = "all",
) -> TripletSet:
    """Re-verbalize each triplet with the candidate that gives ``model`` the lowest tail PPL.

    ``only_templated``: keep triplets whose text was given in the data (only those verbalized
    from templates are re-chosen). Articles follow the word after them (a/an).
    """
    reg = merge_templates(templates) if not isinstance(templates, Mapping) else templates
    todo = [i for i, t in enumerate(kg) if not only_templated or t.meta.get("text_source") == "template"]
    cands: list[tuple[int, str, Triplet]] = []
    for i in todo:
        t = kg[i]
        for tpl, text in candidate_texts(
            t, reg, variants=variants, space_variants=space_variants, where=f"{kg.source or kg.name} #{i}"
        ):
            cands.append((i, tpl, Triplet(t.head, t.relation, t.tail, text, t.meta)))
    out = list(kg.triplets)
    if not cands:
        return TripletSet(out, kg.name, kg.source)
    scores = score_tails(model, [c[2] for c in cands], batch_size=batch_size, tail_scoring=tail_scoring)
    best: dict[int, int] = {}
    for j, (i, _, _) in enumerate(cands):
        if i not in best or scores.nll[j] < scores.nll[best[i]]:
            best[i] = j
    for i, j in best.items():
        _, tpl, c = cands[j]
        meta = {**c.meta, "template": tpl, "text_source": "best_template", "tail_ppl": float(scores.nll[j].exp())}
        out[i] = Triplet(c.head, c.relation, c.tail, c.text, meta)
    return TripletSet(out, kg.name, kg.source)


def filter_known(
    kg: TripletSet,
    model: Any,
    *,
    max_rank: int = 0,
    batch_size: int = 32,
) -> tuple[TripletSet, int]:
    """Keep triplets whose first tail token has rank <= ``max_rank`` (0 = top-1) under ``model``.

    Returns (kept set, number dropped); the drop is logged. KGError if nothing is left.
    """
    if max_rank < 0:
        raise KGError(f"max_rank must be >= 0 (0 = the tail's first token is the top prediction), got {max_rank}")
    scores = score_tails(model, kg, batch_size=batch_size)
    keep = (scores.first_rank <= max_rank).tolist()
    kept = [t for t, k in zip(kg, keep) if k]
    dropped = len(kg) - len(kept)
    if not kept:
        raise KGError(
            f"{kg.source or kg.name}: the known-fact filter (first tail token rank <= {max_rank}) dropped all "
            f"{len(kg)} triplets; raise max_rank or use a model that knows these facts"
        )
    log.info("known-fact filter (rank <= %d) dropped %d of %d triplets of %s", max_rank, dropped, len(kg), kg.name)
    return TripletSet(kept, kg.name, kg.source), dropped
