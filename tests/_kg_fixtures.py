"""Shared helpers for the KG data-layer tests: paper-data location, a tiny BPE tokenizer and models."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def paper_data() -> Path:
    """../shared/paper-data next to the repository (or $KCS_PAPER_DATA)."""
    env = os.environ.get("KCS_PAPER_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "paper-data"


def need_paper_data() -> Path:
    p = paper_data()
    if not p.is_dir():
        pytest.skip(f"the paper's released data is not at {p} (set KCS_PAPER_DATA); it is not shipped with the project")
    return p


def load_kg_app():
    """``kg_app`` from the installed package, or from cli/kg.py when the package is not installed."""
    try:
        from kcs_lens.cli.kg import kg_app
    except ImportError:
        spec = importlib.util.spec_from_file_location("_kcs_cli_kg", REPO / "cli" / "kg.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        kg_app = mod.kg_app
    return kg_app


_TRAIN_TEXT = (
    "A car is a vehicle. A car is a kind of vehicle. A truck is a type of vehicle. "
    "An apple is a fruit. An apple is a kind of fruit. A pear is an example of a fruit. "
    "A house is a building. The church is a building. A bank is a kind of building. "
    "A knife is used for cutting. A wine is made of grapes. A bird can fly. "
    "The kind of thing. A type of thing. An example of it. "
)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer trained on a few sentences (" vehicle" is one token)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [_TRAIN_TEXT] * 40, vocab_size=420, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False
    )
    d = tmp_path_factory.mktemp("tok")
    bpe.save(str(d / "tokenizer.json"))
    tok = GPT2TokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    assert len(tok) > 256
    assert len(tok.encode(" vehicle")) == 1 and len(tok.encode(" of")) == 1
    return tok


class TinyLM:
    """The duck type the data layer expects: ``.tokenizer`` and ``model(tokens) -> logits``."""

    def __init__(self, hf, tokenizer):
        self.hf = hf
        self.tokenizer = tokenizer
        self.spec = "tiny-gpt2"

    def __call__(self, tokens):
        return self.hf(tokens).logits


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """A 1-layer random GPT-2 over the tiny tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(tiny_tokenizer), n_positions=128)
    return TinyLM(GPT2LMHeadModel(cfg).eval(), tiny_tokenizer)


class RuleLM:
    """Logits that favour ``target`` (by 10) after ``after`` (any token when None), else flat."""

    def __init__(self, tokenizer, target: str, after: str | None = None):
        self.tokenizer = tokenizer
        self.target = tokenizer.encode(target)[-1]
        self.after = tokenizer.encode(after)[-1] if after else None
        self.vocab = len(tokenizer)

    def __call__(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        hit = torch.ones_like(tokens, dtype=torch.bool) if self.after is None else tokens == self.after
        logits[..., self.target] += 10.0 * hit
        logits[..., 0] += 0.5  # a fixed runner-up, so every other token has a defined rank
        return logits
