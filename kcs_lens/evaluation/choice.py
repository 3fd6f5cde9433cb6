"""Multiple choice among tails of the same relation (docs/method.md, "Removal in other formats").

For each triplet, the true tail competes with up to ``k - 1`` *distractors*: other tails of the
same relation, drawn from a pool of triplet sets (the run's TargetKG and ControlKG, plus any
``--distractors`` KG). Each choice is scored as evaluation harnesses score multiple choice
(``acc`` / ``acc_norm``): the summed log-probability of its continuation after the shared context,
and the same per token (mean). The model picks the tail with the highest score; ``mc`` is the share
of triplets where that is the true tail (ties count for the true tail), ``mc_norm`` the same on the
per-token score, ``mc_prob`` the mean probability of the true tail normalized over the choices
(softmax of the summed log-probabilities, as TOFU's normalized probability), and ``mc_chance`` the
accuracy of a uniform guess, mean over triplets of 1 / their number of choices.

Rules (one owner, :func:`build_choices`):

- Distractors never include the true tail, the head, or a tail the pool says is true of the head
  under the same relation, directly or through a chain of that relation (for IsA: every hypernym
  of the head in the pool). Tails are compared lower-cased with whitespace collapsed.
- Each triplet's draw is seeded by ``seed`` and the triplet itself (not its position), so the same
  fact gets the same distractors in every set and wording, in every command.
- A relation with fewer than ``k - 1`` other tails gives the triplet fewer choices (counted in
  ``mc_short``); a triplet with no distractor at all is left out of the score (``mc_skipped``).
- Each choice's sentence is the triplet's text with the tail replaced; an indefinite article right
  before the tail (" a" / " an") follows the new tail. The context is the longest common prefix of a
  triplet's choice sentences cut at a word boundary, so where the article differs the article is
  part of every scored continuation (" a structure" vs " an artifact") and never a cue.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from kcs_lens.data.tail_pool import DistractorPool
from kcs_lens.data.templates import indefinite_article
from kcs_lens.data.triplets import Triplet, TripletBatch, TripletSet, tokenize_triplets
from kcs_lens.errors import KGError
from kcs_lens.evaluation.scoring import ModelFn

if TYPE_CHECKING:
    from kcs_lens.discovery.config import DiscoveryConfig
    from kcs_lens.discovery.run_data import RunData
    from kcs_lens.model.lens import LensModel

DEFAULT_CHOICES = 5
MC_SEED = 0  # the distractor draw is fixed: the same facts get the same choices in every run and command


def with_tail(t: Triplet, tail: str) -> str:
    """``t``'s sentence with ``tail`` in place of its tail; an article " a"/" an" before it follows."""
    prefix = t.prefix
    words = prefix.rsplit(" ", 1)
    if len(words) == 2 and words[1].lower() in ("a", "an"):
        art = indefinite_article(tail)
        art = art.capitalize() if words[1][0].isupper() else art
        prefix = f"{words[0]} {art}"
    return prefix + t.tail_str[: len(t.tail_str) - len(t.tail)] + tail


def _context_len(texts: Sequence[str]) -> int:
    """Length of the longest common prefix of ``texts`` cut back to before a space (a word boundary)."""
    cp = os.path.commonprefix(list(texts))
    if len(cp) == min(len(x) for x in texts):  # one text is a prefix of another: cut before its last word
        cp = cp[: cp.rfind(" ") + 1] if " " in cp else ""
    cut = cp.rfind(" ")
    return max(cut, 0)


@dataclass
class ChoiceSet:
    """The tokenized choices of a triplet set. Choices are numbered triplet by triplet, the true
    tail first. The model runs on shared ``rows``: a choice's scored logits sit at positions its
    row shares with it, so choices whose continuation is one token share their context's row and
    choices that extend the same tokens share one row (a causal model gives the same logits there)."""

    rows: Int[Tensor, "n_rows seq"]  # right-padded token ids the model runs on
    row_len: Int[Tensor, " n_rows"]
    tok_row: Int[Tensor, " n_tok"]  # per scored continuation token (sorted by row): its row,
    tok_pos: Int[Tensor, " n_tok"]  # the position whose logits predict it,
    tok_target: Int[Tensor, " n_tok"]  # the token,
    tok_choice: Int[Tensor, " n_tok"]  # and its choice
    item: Int[Tensor, " choices"]  # index (among the scored triplets) of each choice's triplet
    is_true: Bool[Tensor, " choices"]
    n_choices: Int[Tensor, " items"]  # choices per scored triplet (true tail included)
    k: int
    n_triplets: int  # triplets in the set, scored or not
    skipped: list[int]  # indices of triplets without any distractor (not scored)
    choices: list[list[str]]  # per scored triplet: the tails, true one first

    @property
    def n_items(self) -> int:
        return int(self.n_choices.numel())

    @property
    def n_short(self) -> int:
        """Scored triplets with fewer than k choices (their relation has too few other tails)."""
        return int((self.n_choices < self.k).sum())

    def describe(self) -> dict[str, Any]:
        """How the choices were drawn, for the output files."""
        return {
            "k": self.k,
            "n_rows": int(self.rows.shape[0]),
            "n_scored": self.n_items,
            "n_short": self.n_short,
            "n_skipped": len(self.skipped),
            "chance": self.chance,
        }

    @property
    def chance(self) -> float:
        return float((1.0 / self.n_choices.float()).mean()) if self.n_items else float("nan")


def build_choices(
    triplets: TripletSet | Sequence[Triplet],
    pool: DistractorPool,
    tokenizer: Any,
    *,
    k: int = DEFAULT_CHOICES,
    seed: int = 0,
    prepend_bos: bool = True,
    d_vocab: int | None = None,
    source: str = "",
) -> ChoiceSet:
    """The k-way choices of every triplet (module docstring: the rules)."""
    if k < 2:
        raise KGError(f"multiple choice needs k >= 2 choices, got {k}")
    rows: list[Triplet] = []
    item: list[int] = []
    is_true: list[bool] = []
    n_choices: list[int] = []
    skipped: list[int] = []
    all_choices: list[list[str]] = []
    ts = list(triplets)
    for i, t in enumerate(ts):
        tails = [t.tail, *pool.distractors(t, k, seed)]
        if len(tails) < 2:
            skipped.append(i)
            continue
        texts = [t.text if j == 0 else with_tail(t, c) for j, c in enumerate(tails)]
        cut = _context_len(texts)
        for j, text in enumerate(texts):
            cont = text[cut:]
            rows.append(Triplet(t.head, t.relation, cont.lstrip(" "), text))
            item.append(len(n_choices))
            is_true.append(j == 0)
        n_choices.append(len(tails))
        all_choices.append(tails)
    if not rows:
        raise KGError(f"{source or 'triplet set'}: no triplet has another tail of its relation to choose from")
    batch = tokenize_triplets(rows, tokenizer, prepend_bos=prepend_bos, tail_scoring="all", d_vocab=d_vocab, source=source)
    return ChoiceSet(
        *_shared_rows(batch, item),
        torch.tensor(item),
        torch.tensor(is_true),
        torch.tensor(n_choices),
        k,
        len(ts),
        skipped,
        all_choices,
    )


def _shared_rows(batch: TripletBatch, item: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The rows the model must run to score every choice of ``batch`` (one per choice, tokenized),
    and where each scored token's logits are; see :class:`ChoiceSet`."""
    needed: list[tuple[int, ...]] = []  # per choice: the tokens up to its last scored position
    for b in range(len(batch)):
        last = int(batch.score_mask[b].nonzero().max())
        needed.append(tuple(batch.tokens[b, : last + 1].tolist()))
    row_of: dict[tuple[int, ...], int] = {}
    rows: list[tuple[int, ...]] = []
    choice_row: list[int] = []
    b = 0
    while b < len(batch):  # the choices of one triplet: b .. e-1
        e = b
        while e < len(batch) and item[e] == item[b]:
            e += 1
        group = sorted(set(needed[b:e]), key=len, reverse=True)
        for c in range(b, e):
            cover = next(g for g in group if g[: len(needed[c])] == needed[c])  # the longest row it is a prefix of
            if cover not in row_of:
                row_of[cover] = len(rows)
                rows.append(cover)
            choice_row.append(row_of[cover])
        b = e
    pad = int(batch.tokens[0, 0])  # right padding: never read
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    pos = batch.score_mask.nonzero()  # [n_tok, 2]: (choice, position), row-major
    tok_choice, tok_pos = pos[:, 0], pos[:, 1]
    tok_target = batch.targets[tok_choice, tok_pos]
    tok_row = torch.tensor(choice_row)[tok_choice]
    order = torch.argsort(tok_row, stable=True)
    lengths = torch.tensor([len(r) for r in rows])
    return tokens, lengths, tok_row[order], tok_pos[order], tok_target[order], tok_choice[order]


@dataclass
class ChoiceScores:
    """Scores of every choice under one model."""

    sum_logprob: Float[Tensor, " rows"]  # summed log-prob of each choice's continuation
    mean_logprob: Float[Tensor, " rows"]  # the same per token
    item: Int[Tensor, " rows"]
    is_true: Bool[Tensor, " rows"]
    n_items: int
    chance: float

    def _correct(self, score: Tensor) -> Bool[Tensor, " items"]:
        best_other = torch.full((self.n_items,), float("-inf"), dtype=score.dtype)
        best_other = best_other.scatter_reduce(0, self.item[~self.is_true], score[~self.is_true], "amax")
        true = torch.empty(self.n_items, dtype=score.dtype).index_copy_(0, self.item[self.is_true], score[self.is_true])
        return true >= best_other

    def correct(self, norm: bool = False) -> Bool[Tensor, " items"]:
        """Per scored triplet: whether the true tail has the best score (ties count for it)."""
        return self._correct(self.mean_logprob if norm else self.sum_logprob)

    def accuracy(self, norm: bool = False) -> float:
        return float(self.correct(norm).float().mean())

    def true_prob(self) -> Float[Tensor, " items"]:
        """Probability of the true tail normalized over the choices (softmax of the summed log-probs)."""
        s = self.sum_logprob.double()
        mx = torch.full((self.n_items,), float("-inf"), dtype=s.dtype).scatter_reduce(0, self.item, s, "amax")
        e = (s - mx[self.item]).exp()
        tot = torch.zeros(self.n_items, dtype=s.dtype).index_add_(0, self.item, e)
        return (e[self.is_true] / tot[self.item[self.is_true]]).float()

    def headline(self) -> dict[str, float]:
        """``mc`` (summed log-prob, harnesses' acc), ``mc_norm`` (per token, acc_norm), ``mc_prob``
        (normalized probability of the true tail) and ``mc_chance`` (a uniform guess)."""
        return {
            "mc": self.accuracy(),
            "mc_norm": self.accuracy(norm=True),
            "mc_prob": float(self.true_prob().mean()),
            "mc_chance": self.chance,
        }


@torch.no_grad()
def choice_scores(model: ModelFn, choices: ChoiceSet, batch_size: int = 256) -> ChoiceScores:
    """Score every choice of ``choices`` under ``model``: the log-probability of each continuation
    token at its position (log-softmax over the vocabulary), summed per choice and averaged per token."""
    n_choices = int(choices.item.numel())
    total = torch.zeros(n_choices, dtype=torch.float64)
    bounds = torch.searchsorted(choices.tok_row, torch.arange(0, choices.rows.shape[0] + batch_size, batch_size))
    for i in range(0, choices.rows.shape[0], batch_size):
        lo, hi = int(bounds[i // batch_size]), int(bounds[i // batch_size + 1])
        rows = choices.rows[i : i + batch_size]
        rows = rows[:, : int(choices.row_len[i : i + batch_size].max())]
        logits = model(rows.to(_device(model)))
        r, p = (choices.tok_row[lo:hi] - i).to(logits.device), choices.tok_pos[lo:hi].to(logits.device)
        logp = torch.log_softmax(logits[r, p].float(), dim=-1)
        lp = logp.gather(-1, choices.tok_target[lo:hi, None].to(logp.device))[:, 0]
        total.index_add_(0, choices.tok_choice[lo:hi], lp.double().cpu())
    n_tok = torch.zeros(n_choices, dtype=torch.float64).index_add_(
        0, choices.tok_choice, torch.ones(len(choices.tok_choice), dtype=torch.float64)
    )
    return ChoiceScores(total.float(), (total / n_tok).float(), choices.item, choices.is_true, choices.n_items, choices.chance)


def _device(model: Any) -> torch.device | str:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, (torch.device, str)) else "cpu"


def choice_sets(
    sets: dict[str, TripletSet],
    pool: DistractorPool,
    tokenizer: Any,
    *,
    k: int = DEFAULT_CHOICES,
    prepend_bos: bool = True,
    d_vocab: int | None = None,
) -> dict[str, ChoiceSet]:
    """The choices of several named sets against one pool (seed :data:`MC_SEED`)."""
    return {
        name: build_choices(ts, pool, tokenizer, k=k, seed=MC_SEED, prepend_bos=prepend_bos, d_vocab=d_vocab, source=name)
        for name, ts in sets.items()
    }


def run_choice_sets(cfg: "DiscoveryConfig", data: "RunData", lm: "LensModel") -> dict[str, ChoiceSet]:
    """The multiple choice of a run (``cfg.mc_choices`` choices; none when 0) on its TargetKG,
    ControlKG validation and test parts, against the pool of all its triplets and ``cfg.distractors``,
    and on its unseen wordings (that pool and their own tails)."""
    if not cfg.mc_choices:
        return {}
    from kcs_lens.data.loaders import load_kg

    sets = {"target": data.target, "control": data.control_val}
    if data.control_test is not None:
        sets["control_test"] = data.control_test
    pool = DistractorPool([data.target, data.control, *sets.values()])
    if cfg.distractors:
        pool.add(load_kg(cfg.distractors, model_name=lm.spec, templates=cfg.templates))
    kw: dict[str, Any] = dict(k=cfg.mc_choices, prepend_bos=cfg.prepend_bos, d_vocab=lm.shape.d_vocab)
    out = choice_sets(sets, pool, lm.tokenizer, **kw)
    if data.paraphrases is not None:  # their own tails join the pool for them only
        out |= choice_sets({"paraphrases": data.paraphrases}, pool.extended(data.paraphrases), lm.tokenizer, **kw)
    return out
