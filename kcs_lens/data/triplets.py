"""Triplets, triplet sets, and their tokenization into scored batches.

A triplet (head, relation, tail) is verbalized as one sentence that ends exactly with the tail.
The model is scored on the tail tokens given the prefix. With GPT-2 byte-level BPE the space
before the tail belongs to the tail's first token, so the split is
``prefix = text[:-len(tail)].rstrip(" ")`` and ``tail_str = text[len(prefix):]`` (e.g. " vehicle").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from kcs_lens.errors import KGError

_log = logging.getLogger("kcs_lens.data")
TailScoring = Literal["all", "last"]


def normalized(s: str) -> str:
    """``s`` lower-cased, with runs of whitespace collapsed: how heads, relations and tails compare."""
    return " ".join(s.lower().split())


def triplet_key(head: str, relation: str, tail: str) -> tuple[str, str, str]:
    """The identity of a triplet wherever triplets are compared (``disjoint``, downstream links):
    head, relation and tail, :func:`normalized`."""
    return (normalized(head), normalized(relation), normalized(tail))


@dataclass(frozen=True)
class Triplet:
    head: str
    relation: str
    tail: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.tail.strip():
            raise KGError(f"empty tail in triplet {self.head!r} {self.relation!r}")
        if not self.text.endswith(self.tail):
            raise KGError(f"text {self.text!r} does not end with the tail {self.tail!r}")

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity used for overlap checks: case- and space-insensitive (head, relation, tail)."""
        return triplet_key(self.head, self.relation, self.tail)

    @property
    def prefix(self) -> str:
        """The sentence without the tail and without the space that belongs to the tail."""
        return self.text[: len(self.text) - len(self.tail)].rstrip(" ")

    @property
    def tail_str(self) -> str:
        """The tail as it follows the prefix, with its leading space when there is one."""
        return self.text[len(self.prefix) :]

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "relation": self.relation, "tail": self.tail, "text": self.text, **self.meta}


@dataclass
class TripletSet:
    """A named, ordered list of triplets (a TargetKG, a ControlKG, a paraphrase set...)."""

    triplets: list[Triplet]
    name: str = "kg"
    source: str = ""

    def __len__(self) -> int:
        return len(self.triplets)

    def __iter__(self):
        return iter(self.triplets)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TripletSet(self.triplets[i], self.name, self.source)
        return self.triplets[i]

    def keys(self) -> set[tuple[str, str, str]]:
        return {t.key for t in self.triplets}

    def without(self, other: "TripletSet") -> tuple["TripletSet", int]:
        """This set minus any triplet whose key is in ``other``; returns (set, number dropped)."""
        drop = other.keys()
        kept = [t for t in self.triplets if t.key not in drop]
        return TripletSet(kept, self.name, self.source), len(self.triplets) - len(kept)


def concat(sets: Iterable[TripletSet], *, name: str = "kg", source: str = "") -> TripletSet:
    """One set with the triplets of all ``sets`` in order."""
    sets = list(sets)
    triplets = [t for s in sets for t in s.triplets]
    return TripletSet(triplets, name, source or " + ".join(s.source for s in sets))


def disjoint(target: TripletSet, control: TripletSet) -> tuple[TripletSet, int]:
    """The ControlKG without any triplet of the TargetKG (same key); returns (control, n_dropped).

    The drop is logged (warning) when it removes anything: the method needs disjoint sets.
    """
    kept, n = control.without(target)
    if n:
        _log.warning("dropped %d ControlKG triplet(s) of %s that are also in the TargetKG %s", n, control.name, target.name)
    return kept, n


def split_control(control: TripletSet, n_val: int = 50) -> tuple[TripletSet, TripletSet]:
    """(train, val): the first ``n_val`` triplets are validation (the paper: the first 50 WordNet items)."""
    if n_val < 0 or n_val >= len(control):
        raise KGError(
            f"{control.source or control.name}: cannot take {n_val} validation triplets from a ControlKG "
            f"of {len(control)} (need 0 <= n_val < {len(control)})"
        )
    val = TripletSet(control.triplets[:n_val], f"{control.name}-val", control.source)
    train = TripletSet(control.triplets[n_val:], f"{control.name}-train", control.source)
    return train, val


@dataclass
class TripletBatch:
    """Right-padded token ids of BOS + prefix + tail, with the positions that score tail tokens.

    ``score_mask[b, p]`` is True where the logits at position p predict a scored tail token,
    which is ``targets[b, p] = tokens[b, p + 1]``. Triplet b's loss averages over its scored
    positions. Right padding needs no attention mask in a causal model: padded positions
    come after every scored one.
    """

    tokens: Int[Tensor, "batch seq"]
    targets: Int[Tensor, "batch seq"]
    score_mask: Bool[Tensor, "batch seq"]
    lengths: Int[Tensor, " batch"]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> "TripletBatch":
        return TripletBatch(*(getattr(self, f).to(device) for f in ("tokens", "targets", "score_mask", "lengths")))

    def select(self, idx: Int[Tensor, " n"] | Sequence[int]) -> "TripletBatch":
        idx = torch.as_tensor(idx, dtype=torch.long)
        n = int(self.lengths[idx].max())
        return TripletBatch(self.tokens[idx, :n], self.targets[idx, :n], self.score_mask[idx, :n], self.lengths[idx])

    def shifted_to_tail_token(self) -> "TripletBatch":
        """The released code's off-by-one: score the logits AT the tail tokens (one position late).

        Only for fidelity comparisons (``tail_position = "released"``); the targets are not
        meaningful for these positions, only the distributions are.
        """
        mask = torch.zeros_like(self.score_mask)
        mask[:, 1:] = self.score_mask[:, :-1]
        return TripletBatch(self.tokens, self.targets, mask, self.lengths)


def tokenize_triplets(
    triplets: Iterable[Triplet],
    tokenizer: Any,
    *,
    prepend_bos: bool = True,
    tail_scoring: TailScoring = "all",
    d_vocab: int | None = None,
    pad_id: int | None = None,
    source: str = "",
    n_ctx: int | None = None,
) -> TripletBatch:
    """Tokenize the prefix and the whole text; the tail's tokens are the text's tokens after the
    prefix's (KGError where the prefix's tokens are not a prefix of the text's). The BOS token (or
    EOS where the tokenizer has no BOS, as Qwen's) is placed here, never by the tokenizer, so
    tokenizers that add ``<s>`` themselves (Llama's) do not get it twice. ``n_ctx``: the model's
    context; a longer triplet is a KGError naming it."""
    if tail_scoring not in ("all", "last"):
        raise KGError(f"tail_scoring must be 'all' or 'last', got {tail_scoring!r}")
    rows: list[list[int]] = []
    n_prefix: list[int] = []
    n_tail: list[int] = []
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for i, t in enumerate(triplets):
        pre = tokenizer.encode(t.prefix, add_special_tokens=False)
        full = tokenizer.encode(t.prefix + t.tail_str, add_special_tokens=False)
        if full[: len(pre)] != pre:
            raise KGError(
                f"{source or 'triplet'} #{i} ({t.text!r}): the tokens of the prefix {t.prefix!r} are not the first "
                f"tokens of the whole text, so the tail cannot be scored token by token with this tokenizer "
                f"(prefix {pre}, text {full}); rephrase the template so that the tail starts a new word"
            )
        tail = full[len(pre) :]  # the tail's tokens as they are in the whole text (SentencePiece spaces included)
        if prepend_bos:
            pre = [bos] + pre
        if not pre:
            raise KGError(f"{source or 'triplet'} #{i} ({t.text!r}): empty prefix and no BOS token to condition on")
        if not tail:
            raise KGError(f"{source or 'triplet'} #{i} ({t.text!r}): tail {t.tail!r} tokenizes to nothing")
        ids = pre + tail
        if d_vocab is not None and max(ids) >= d_vocab:
            raise KGError(
                f"{source or 'triplet'} #{i} ({t.text!r}): token id {max(ids)} >= the model's vocabulary size "
                f"{d_vocab}; the tokenizer does not match the model"
            )
        if n_ctx is not None and len(ids) > n_ctx:
            raise KGError(
                f"{source or 'triplet'} #{i} ({t.text[:60]!r}{'...' if len(t.text) > 60 else ''}): {len(ids)} tokens, "
                f"more than the model's context of {n_ctx} tokens"
            )
        rows.append(ids)
        n_prefix.append(len(pre))
        n_tail.append(len(tail))
    if not rows:
        raise KGError(f"{source or 'triplet set'} is empty")
    seq = max(len(r) for r in rows)
    pad = pad_id if pad_id is not None else (bos if bos is not None else 0)
    tokens = torch.full((len(rows), seq), pad, dtype=torch.long)
    score = torch.zeros((len(rows), seq), dtype=torch.bool)
    for b, (ids, p, k) in enumerate(zip(rows, n_prefix, n_tail)):
        tokens[b, : len(ids)] = torch.tensor(ids)
        first = p - 1 if tail_scoring == "all" else p + k - 2
        score[b, first : p + k - 1] = True
    targets = torch.full_like(tokens, pad)
    targets[:, :-1] = tokens[:, 1:]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return TripletBatch(tokens, targets, score, lengths)
