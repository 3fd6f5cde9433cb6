"""Finetuning a model (original, remaining or random removal) on a multiple-choice task.

Three styles (``--finetune``):

- ``head``: the model frozen; a linear multiple-choice head (d_model -> 1) on the final-position,
  final-LayerNorm hidden state of each "prompt + choice" sequence, softmax over a question's
  choices (GPT-2's double-heads model without the LM loss). The hidden states are computed once.
- ``full``: the same head, every model weight trainable too.
- ``lm``: every weight trainable with a causal-LM loss on "prompt + correct choice"; a choice's
  score is its tokens' log-likelihood after the prompt (sum, or mean per token).

A removal (a :class:`~kcs_lens.masks.subnetwork.Subnetwork`) is applied exactly as ``evaluate`` applies
it (``Subnetwork.applied``: theta * (1 - m) through a parametrization) and stays attached while
training, so a removed weight's effective value is 0 * theta = 0 after every step: its gradient
is masked by the product itself. Every model sees the same batches: the head's initialization and
the data order come from one generator seeded by ``seed`` only. Every epoch ends with the
validation and test predictions; the test predictions of the epoch with the best validation
accuracy are kept (early stopping without changing the number of steps).
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from kcs_lens.downstream.tasks import Question
from kcs_lens.errors import TaskError
from kcs_lens.masks.subnetwork import Subnetwork
from kcs_lens.model.lens import LensModel
from kcs_lens.model.loading import BUNDLED_NAMES
from kcs_lens.settings import int_at_least, non_negative, opt, validate_fields

Mode = Literal["head", "full", "lm"]
MODES: tuple[str, ...] = ("head", "full", "lm")
DEFAULT_LR = {"head": 1e-3, "full": 5e-5, "lm": 5e-5}  # GPT-2 conventions
BUNDLED_LR = {"head": 1e-3, "full": 1e-3, "lm": 1e-3}  # the small bundled model (trained at 2e-3)
DEFAULT_EPOCHS = {"head": 20, "full": 3, "lm": 3}
PROMPT = "Question: {question}\nAnswer:"


def _has_question(x: Any) -> str | None:
    return None if isinstance(x, str) and "{question}" in x else "a text containing {question}"


@dataclass
class FinetuneSettings:
    """How every model is finetuned (the same for all of them); typed settings (:mod:`kcs_lens.settings`)."""

    mode: Mode = opt("head", "head (MC head on the frozen model), full, or lm (causal LM)", flag="--finetune")
    epochs: int = opt(0, "epochs (0: head 20, full 3, lm 3)", check=int_at_least(0))
    lr: float = opt(0.0, "AdamW learning rate (0: head 1e-3, full and lm 5e-5; 1e-3 for the bundled model)", check=non_negative)
    batch_size: int = opt(16, "questions per step", check=int_at_least(1))
    weight_decay: float = opt(0.0, "AdamW weight decay", check=non_negative)
    lm_score: Literal["sum", "mean"] = opt("sum", "lm: a choice's score is its tokens' log-likelihood, sum or mean")
    prompt: str = opt(PROMPT, "text before each choice; {question} is the question", check=_has_question)
    eval_batch: int = opt(64, "questions per forward pass when predicting", check=int_at_least(1))

    def resolved(self, bundled: bool = False) -> "FinetuneSettings":
        """Checked, with 0 replaced by the defaults (``bundled``: the bundled model's learning rates)."""
        validate_fields(self)
        try:
            self.prompt.format(question="")
        except (KeyError, IndexError, ValueError) as e:
            what = f"unknown field {{{e.args[0]}}}" if isinstance(e, (KeyError, IndexError)) else str(e)
            raise TaskError(
                f"--prompt {self.prompt!r}: {what}; only {{question}} is filled in (write {{{{ and }}}} for literal braces)"
            ) from None
        out = FinetuneSettings(**{f.name: getattr(self, f.name) for f in fields(FinetuneSettings)})
        out.epochs = self.epochs or DEFAULT_EPOCHS[self.mode]
        out.lr = self.lr or (BUNDLED_LR if bundled else DEFAULT_LR)[self.mode]
        return out


# ------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Every "prompt + choice" sequence of a question list, question-major.

    ``tokens[s]`` = BOS + prompt + " choice" (right-padded); ``n_prompt[s]`` tokens of it are the
    prompt (with BOS); ``question[s]`` = the sequence's question; ``answers[q]`` = the right
    choice's index; ``first[q]`` = the question's first sequence; ``n_choices[q]``."""

    tokens: Int[Tensor, "n_seq seq"]
    lengths: Int[Tensor, " n_seq"]
    n_prompt: Int[Tensor, " n_seq"]
    question: Int[Tensor, " n_seq"]
    first: Int[Tensor, " n_q"]
    n_choices: Int[Tensor, " n_q"]
    answers: Int[Tensor, " n_q"]

    def __len__(self) -> int:
        return int(self.answers.shape[0])

    def seqs_of(self, qs: Int[Tensor, " b"]) -> Int[Tensor, " s"]:
        return torch.cat([torch.arange(int(self.first[q]), int(self.first[q] + self.n_choices[q])) for q in qs.tolist()])

    def answer_seqs(self, qs: Int[Tensor, " b"]) -> Int[Tensor, " b"]:
        return self.first[qs] + self.answers[qs]


def encode(questions: list[Question], lm: LensModel, prompt: str = PROMPT) -> Encoded:
    """Tokenize every question's choice sequences for ``lm`` (BOS first, as kcs-lens scores facts)."""
    tok, bos = lm.tokenizer, lm.bos_id
    rows: list[list[int]] = []
    n_prompt: list[int] = []
    qidx: list[int] = []
    first: list[int] = []
    n_ch: list[int] = []
    answers: list[int] = []
    for i, q in enumerate(questions):
        pre = [bos] + tok.encode(prompt.format(question=q.question), add_special_tokens=False)
        first.append(len(rows))
        n_ch.append(len(q.choices))
        answers.append(q.answer)
        for c in q.choices:
            ids = pre + tok.encode(" " + c.strip(), add_special_tokens=False)
            if len(ids) > lm.shape.n_ctx:
                raise TaskError(
                    f"{q.where}: question {q.id!r} is {len(ids)} tokens long, over the model's context {lm.shape.n_ctx}"
                )
            rows.append(ids)
            n_prompt.append(len(pre))
            qidx.append(i)
    n = max(len(r) for r in rows)
    tokens = torch.full((len(rows), n), bos, dtype=torch.long)
    for s, r in enumerate(rows):
        tokens[s, : len(r)] = torch.tensor(r)
    t = lambda xs: torch.tensor(xs, dtype=torch.long)
    return Encoded(tokens, t([len(r) for r in rows]), t(n_prompt), t(qidx), t(first), t(n_ch), t(answers))


# ------------------------------------------------------------------------------------------
# Forward pieces
# ------------------------------------------------------------------------------------------
def final_hidden(lm: LensModel, tokens: Int[Tensor, "b seq"], lengths: Int[Tensor, " b"]) -> Float[Tensor, "b d_model"]:
    """The final-LayerNorm hidden state at each sequence's last token (what GPT-2's MC head reads)."""
    n = int(lengths.max())
    x = lm.final_norm(lm.run_blocks(lm.resid_pre(tokens[:, :n].to(lm.device), 0), 0))
    return x[torch.arange(x.shape[0], device=x.device), lengths.to(x.device) - 1]


def choice_logprob(lm: LensModel, enc: Encoded, seqs: Int[Tensor, " s"], mean: bool) -> Float[Tensor, " s"]:
    """Log-likelihood of each sequence's choice tokens after its prompt (sum, or mean per token)."""
    lengths = enc.lengths[seqs]
    n = int(lengths.max())
    tokens = enc.tokens[seqs, :n].to(lm.device)
    logp = torch.log_softmax(lm(tokens)[:, :-1].float(), dim=-1)
    tok_lp = logp.gather(-1, tokens[:, 1:, None])[..., 0]
    pos = torch.arange(n - 1, device=lm.device)[None]
    scored = (pos >= enc.n_prompt[seqs, None].to(lm.device) - 1) & (pos < lengths[:, None].to(lm.device) - 1)
    total = (tok_lp * scored).sum(1)
    return total / scored.sum(1) if mean else total


def lm_loss(lm: LensModel, enc: Encoded, seqs: Int[Tensor, " s"]) -> Tensor:
    """Mean next-token cross-entropy over every token after BOS of the sequences."""
    lengths = enc.lengths[seqs]
    n = int(lengths.max())
    tokens = enc.tokens[seqs, :n].to(lm.device)
    logits = lm(tokens)[:, :-1].float()
    valid = torch.arange(n - 1, device=lm.device)[None] < lengths[:, None].to(lm.device) - 1
    return torch.nn.functional.cross_entropy(logits[valid], tokens[:, 1:][valid])


def per_question(scores: Float[Tensor, " s"], enc: Encoded, qs: Int[Tensor, " b"]) -> Float[Tensor, "b c"]:
    """Sequence scores of the questions ``qs`` (in ``enc.seqs_of(qs)`` order) as [question, choice],
    padded with -inf where a question has fewer choices."""
    c = int(enc.n_choices[qs].max())
    out = torch.full((len(qs), c), -math.inf, device=scores.device, dtype=scores.dtype)
    i = 0
    for row, q in enumerate(qs.tolist()):
        k = int(enc.n_choices[q])
        out[row, :k] = scores[i : i + k]
        i += k
    return out


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
@contextmanager
def trainable(lm: LensModel) -> Iterator[LensModel]:
    """Every weight of ``lm`` trainable inside; the original weights (and frozen state) come back after."""
    saved = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    for p in lm.model.parameters():
        p.requires_grad_(True)
    try:
        yield lm
    finally:
        for p in lm.model.parameters():
            p.requires_grad_(False)
            p.grad = None
        lm.model.load_state_dict(saved)
        lm.model.eval()


def removed(lm: LensModel, removal: Subnetwork | None):
    """The remaining model of ``removal`` (as ``evaluate`` builds it), or the model itself."""
    return nullcontext(lm) if removal is None else removal.applied(lm, keep="remaining")


@torch.no_grad()
def hidden_features(lm: LensModel, enc: Encoded, batch: int = 64) -> Float[Tensor, "n_seq d_model"]:
    """:func:`final_hidden` of every sequence (the frozen features of ``head`` finetuning)."""
    out = [final_hidden(lm, enc.tokens[i : i + batch], enc.lengths[i : i + batch]) for i in range(0, len(enc.tokens), batch)]
    return torch.cat(out).float()


def order_sha(batches: list[list[int]]) -> str:
    return hashlib.sha256(repr(batches).encode()).hexdigest()[:16]


@dataclass
class Split:
    """Encoded train / validation / test questions (and, for ``head``, their frozen features)."""

    train: Encoded
    val: Encoded
    test: Encoded


def finetune(
    lm: LensModel,
    data: Split,
    settings: FinetuneSettings,
    seed: int,
    removal: Subnetwork | None = None,
    *,
    features: dict[str, Tensor] | None = None,
    on_step: Callable[[float], None] | None = None,
    inspect: Callable[[LensModel], None] | None = None,
) -> dict[str, Any]:
    """Finetune ``lm`` (with ``removal`` removed) on ``data.train``; ``lm`` is unchanged afterwards.

    Returns the test correctness (0/1 per question) of the best-validation epoch, the validation
    accuracy and mean training loss per epoch, and the data order's hash. ``features``: the
    precomputed ``hidden_features`` of train/val/test for ``head`` (computed here when absent).
    ``inspect`` is called with the finetuned model before it is restored (tests)."""
    s = settings.resolved(lm.spec in BUNDLED_NAMES)
    gen = torch.Generator().manual_seed(seed)
    d = lm.shape.d_model
    head = nn.Linear(d, 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn((1, d), generator=gen) * 0.02)
        head.bias.zero_()
    head = head.to(lm.device)
    if s.mode == "head":
        if features is None:
            with removed(lm, removal):
                features = {k: hidden_features(lm, getattr(data, k), s.eval_batch) for k in ("train", "val", "test")}
        feats = {k: v.to(lm.device) for k, v in features.items()}
        return _loop(None, head, data, s, gen, lambda split, seqs: head(feats[split][seqs])[:, 0], on_step)
    with trainable(lm), removed(lm, removal):
        if s.mode == "full":
            score = lambda split, seqs: head(
                final_hidden(lm, getattr(data, split).tokens[seqs], getattr(data, split).lengths[seqs])
            )[:, 0]
        else:
            score = lambda split, seqs: choice_logprob(lm, getattr(data, split), seqs, s.lm_score == "mean")
        out = _loop(lm, head if s.mode == "full" else None, data, s, gen, score, on_step)
        if inspect is not None:
            inspect(lm)
    return out


def _loop(lm, head, data: Split, s: FinetuneSettings, gen: torch.Generator, score, on_step) -> dict[str, Any]:
    params = ([] if lm is None else [p for p in lm.model.parameters() if p.requires_grad]) + (
        [] if head is None else list(head.parameters())
    )
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    n = len(data.train)
    batches: list[list[int]] = []
    history: list[dict[str, float]] = []
    best: tuple[float, int, np.ndarray] | None = None
    for epoch in range(1, s.epochs + 1):
        perm = torch.randperm(n, generator=gen)
        losses = []
        for i in range(0, n, s.batch_size):
            qs = perm[i : i + s.batch_size]
            batches.append(qs.tolist())
            if s.mode == "lm":
                loss = lm_loss(lm, data.train, data.train.answer_seqs(qs))
            else:
                logits = per_question(score("train", data.train.seqs_of(qs)), data.train, qs)
                loss = torch.nn.functional.cross_entropy(logits, data.train.answers[qs].to(logits.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if on_step:
                on_step(losses[-1])
        val = predict(data.val, lambda seqs: score("val", seqs), s.eval_batch) if len(data.val) else None
        test = predict(data.test, lambda seqs: score("test", seqs), s.eval_batch)
        val_acc = float(val.mean()) if val is not None else math.nan
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_accuracy": val_acc})
        key = val_acc if val is not None else float(epoch)  # no validation split: the last epoch
        if best is None or key > best[0]:
            best = (key, epoch, test)
    assert best is not None
    return {"correct": best[2], "best_epoch": best[1], "history": history, "order_sha": order_sha(batches), "steps": len(batches)}


def before_finetuning(lm: LensModel, enc: Encoded, settings: FinetuneSettings, removal: Subnetwork | None) -> np.ndarray:
    """``lm`` style only: test correctness of the model as it is (``removal`` removed), before any
    finetuning, by the choices' log-likelihood after the prompt: whether the questions can see the
    removal at all, and how much of it finetuning gives back."""
    s = settings.resolved(lm.spec in BUNDLED_NAMES)
    with removed(lm, removal):
        return predict(enc, lambda seqs: choice_logprob(lm, enc, seqs, s.lm_score == "mean"), s.eval_batch)


@torch.no_grad()
def predict(enc: Encoded, score: Callable[[Tensor], Tensor], batch: int) -> np.ndarray:
    """0/1 correctness per question: the top-scoring choice is the answer."""
    out = []
    n = len(enc)
    qs_all = torch.arange(n)
    q_per_batch = max(1, batch // max(1, int(enc.n_choices.max())))
    for i in range(0, n, q_per_batch):
        qs = qs_all[i : i + q_per_batch]
        pred = per_question(score(enc.seqs_of(qs)), enc, qs).argmax(-1).cpu()
        out.append((pred == enc.answers[qs]).numpy())
    return np.concatenate(out).astype(np.int8)
