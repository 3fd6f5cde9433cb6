"""Prompts for the comparisons: BOS + prefix + tail tokens, the scored position, and corruptions.

Every analysis scores the same quantity, the *tail log-probability*: the log-probability of the
first tail token at the last prefix position (BOS-prepended exactly like
:func:`kcs_lens.data.triplets.tokenize_triplets`, so it is the first scored token of the
discovery objective).

The default corruption swaps a triplet's head entity for another head of the same KG
(:func:`head_swap`). Activation patching over all positions needs the clean and the corrupted
prompt to be aligned token by token, so a donor is accepted only when the corrupted prefix has
the same number of tokens; triplets with no such donor keep their clean prompt and are listed in
``Corruption.fallback`` (their patching values are NaN, not zero).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kcs_lens.data.templates import indefinite_article
from kcs_lens.data.triplets import Triplet, TripletSet, tokenize_triplets
from kcs_lens.discovery.run_data import load_run_data
from kcs_lens.discovery.rundir import RunInfo
from kcs_lens.model.lens import LensModel


@dataclass
class Prompts:
    """A batch of triplet prompts and where their tail log-probability is read."""

    triplets: list[Triplet]
    tokens: Int[Tensor, "batch seq"]  # BOS + prefix + tail, right-padded
    pos: Int[Tensor, " batch"]  # last prefix position (its logits predict the first tail token)
    target: Int[Tensor, " batch"]  # first tail token
    lengths: Int[Tensor, " batch"]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def str_tokens(self, tokenizer: Any, i: int, upto: int | None = None) -> list[str]:
        """Token strings of prompt i (up to position ``upto`` inclusive; default: whole prompt)."""
        n = int(self.lengths[i]) if upto is None else upto + 1
        return [tokenizer.decode([int(t)]) for t in self.tokens[i, :n]]


def build_prompts(
    triplets: Sequence[Triplet], tokenizer: Any, *, prepend_bos: bool = True, d_vocab: int | None = None
) -> Prompts:
    batch = tokenize_triplets(triplets, tokenizer, prepend_bos=prepend_bos, d_vocab=d_vocab)
    pos = batch.score_mask.to(torch.int8).argmax(1)
    rows = torch.arange(len(batch))
    return Prompts(list(triplets), batch.tokens, pos, batch.targets[rows, pos], batch.lengths)


def tail_logprob(logits: Float[Tensor, "batch seq vocab"], prompts: Prompts) -> Float[Tensor, " batch"]:
    """log p(first tail token | BOS + prefix) for each prompt."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    lp = torch.log_softmax(logits[rows, prompts.pos.to(logits.device)].float(), dim=-1)
    return lp[rows, prompts.target.to(logits.device)]


# ------------------------------------------------------------------------------------------
# Head-swap corruption
# ------------------------------------------------------------------------------------------
@dataclass
class Corruption:
    """Corrupted prompts aligned with the clean ones, and how each was made."""

    prompts: Prompts
    donors: list[str | None]  # donor head per prompt (None: fallback, prompt left clean)
    fallback: list[int] = field(default_factory=list)  # prompts with no aligned donor

    @property
    def valid(self) -> Tensor:
        """True for prompts whose corrupted version differs from the clean one."""
        return torch.tensor([d is not None for d in self.donors])

    def describe(self) -> dict[str, Any]:
        return {
            "donors": self.donors,
            "fallback": self.fallback,
            "n_fallback": len(self.fallback),
            "corrupted_text": [t.text for t in self.prompts.triplets],
        }


def swap_head(triplet: Triplet, donor: str) -> Triplet | None:
    """The triplet's sentence with its head replaced by ``donor`` (indefinite article adjusted);
    None when the head does not occur in the prefix."""
    prefix, head = triplet.prefix, triplet.head
    art = re.compile(rf"\b(an?)\s+{re.escape(head)}\b", re.IGNORECASE)
    m = art.search(prefix)
    if m:
        a = indefinite_article(donor)
        a = a[:1].upper() + a[1:] if m.group(1)[:1].isupper() else a
        new = prefix[: m.start()] + f"{a} {donor}" + prefix[m.end() :]
    else:
        m = re.search(rf"\b{re.escape(head)}\b", prefix) or re.search(re.escape(head), prefix)
        if not m:
            return None
        new = prefix[: m.start()] + donor + prefix[m.end() :]
    text = new + triplet.tail_str
    return Triplet(donor, triplet.relation, triplet.tail, text, dict(triplet.meta))


def head_swap(clean: Prompts, tokenizer: Any, *, prepend_bos: bool = True, seed: int = 0) -> Corruption:
    """Swap each triplet's head for another head of the same KG whose prefix has the same token
    count, preferring donors with a different tail (their prompt predicts something else)."""
    rng = random.Random(seed)
    trip = clean.triplets
    heads = list(dict.fromkeys(t.head for t in trip))
    n_bos = 1 if prepend_bos else 0
    out: list[Triplet] = []
    donors: list[str | None] = []
    fallback: list[int] = []
    for i, t in enumerate(trip):
        want = int(clean.pos[i]) + 1 - n_bos  # prefix tokens without BOS
        own_tails = {u.tail.lower() for u in trip if u.head == t.head}
        cands = [h for h in heads if h.lower() != t.head.lower()]
        rng.shuffle(cands)
        other_tail = [h for h in cands if not ({u.tail.lower() for u in trip if u.head == h} & own_tails)]
        chosen = None
        for h in other_tail + [h for h in cands if h not in other_tail]:
            s = swap_head(t, h)
            if s is not None and len(tokenizer.encode(s.prefix, add_special_tokens=False)) == want:
                chosen = s
                break
        if chosen is None:
            fallback.append(i)
            out.append(t)
            donors.append(None)
        else:
            out.append(chosen)
            donors.append(chosen.head)
    prompts = build_prompts(out, tokenizer, prepend_bos=prepend_bos)
    # Aligned by construction (same prefix length, same tail tokens); check it anyway.
    assert torch.equal(prompts.pos, clean.pos) and torch.equal(prompts.lengths, clean.lengths), "misaligned corruption"
    return Corruption(prompts, donors, fallback)


def kg_sets(info: RunInfo, lm: LensModel, kg: str, log: Callable[[str], None]) -> dict[str, TripletSet]:
    """The primary prompt set (``target``, ``control`` or any KG spec) and the run's ControlKG
    validation set (disjoint from the TargetKG) for the specificity check, verbalized as the run's
    data was (its ``templates`` included)."""
    from kcs_lens.data.loaders import load_kg

    data = load_run_data(info.config, lm, log, text=False)
    if kg == "target":
        return {"target": data.target, "control": data.control_val}
    if kg == "control":
        return {"control": data.control_val}
    return {kg_key(kg): load_kg(kg, model_name=lm.spec, templates=info.config.templates), "control": data.control_val}


def kg_key(kg: str) -> str:
    """A file-name-safe key for a prompt set given by spec (``building-paraphrases``, a path...)."""
    if kg in ("target", "control"):
        return kg
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(kg).stem if os.sep in kg else kg).strip("_") or "kg"
