"""ControlLM text blocks: local files and folders, the bundled text, WikiText-2 (through a stand-in)."""

from __future__ import annotations

import time

import pytest
import torch
from _kg_fixtures import tiny_tokenizer  # noqa: F401 (fixture)

from kcs_lens.data import text as text_mod
from kcs_lens.data.text import load_text_blocks, tokenize_documents, wikitext_articles
from kcs_lens.errors import KGError

# no TransformerLens code runs here: scripts/test.sh runs it on one TL line only
pytestmark = pytest.mark.tl_independent


PARAS = [f"A car is a vehicle number {i}. An apple is a fruit. The church is a building." for i in range(40)]


def test_local_file_blocks_train_heldout(tmp_path, tiny_tokenizer):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(PARAS) + "\n")
    ids = tokenize_documents(PARAS, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    assert ids.count(eos) == len(PARAS) - 1  # EOS between documents, nothing else added
    train = load_text_blocks(str(f), tiny_tokenizer, block_len=16)
    held = load_text_blocks(str(f), tiny_tokenizer, block_len=16, split="heldout")
    cut = len(ids) - round(len(ids) * 0.1)
    assert train.dtype == torch.long and train.shape == (cut // 16, 16)
    assert train.flatten().tolist() == ids[: train.numel()]  # non-overlapping windows from the start
    assert held.shape == ((len(ids) - cut) // 16, 16)
    assert held.flatten().tolist() == ids[cut : cut + held.numel()]  # the last 10% of the text
    assert load_text_blocks(str(f), tiny_tokenizer, block_len=16, max_blocks=3).shape == (3, 16)
    h2 = load_text_blocks(str(f), tiny_tokenizer, block_len=16, split="heldout", heldout_frac=0.5)
    assert h2.shape[0] > held.shape[0]


def test_local_folder(tmp_path, tiny_tokenizer):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("\n\n".join(PARAS[20:]))
    (d / "a.txt").write_text("\n\n".join(PARAS[:10]))
    (d / "sub" / "c.txt").write_text("\n\n".join(PARAS[10:20]))
    (d / "skip.md").write_text("not text")
    blocks = load_text_blocks(str(d), tiny_tokenizer, block_len=8, heldout_frac=0.2)
    ids = tokenize_documents(PARAS[:10] + PARAS[20:] + PARAS[10:20], tiny_tokenizer)  # sorted: a, b, sub/c
    assert blocks.flatten().tolist() == ids[: blocks.numel()]


def test_bundled_text(tmp_path, tiny_tokenizer, monkeypatch):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "train.txt").write_text("\n".join(PARAS[:30]) + "\n")
    (tmp_path / "text" / "heldout.txt").write_text("\n".join(PARAS[30:]) + "\n")
    monkeypatch.setenv("KCS_BUNDLED_DIR", str(tmp_path))
    train = load_text_blocks("bundled", tiny_tokenizer, block_len=32)
    held = load_text_blocks("bundled", tiny_tokenizer, block_len=32, split="heldout")
    assert train.flatten().tolist() == tokenize_documents(PARAS[:30], tiny_tokenizer)[: train.numel()]
    assert held.flatten().tolist() == tokenize_documents(PARAS[30:], tiny_tokenizer)[: held.numel()]


def test_bundled_text_missing(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("KCS_BUNDLED_DIR", str(tmp_path))
    with pytest.raises(KGError, match=r"bundled: text file .*train\.txt not found"):
        load_text_blocks("bundled", tiny_tokenizer)


WIKI = [
    "",
    " = Alpha = \n",
    "",
    " Alpha is a car . It is a vehicle . \n",
    " = = History = = \n",
    " The apple is a fruit . \n",
    " = Beta = \n",
    " Beta is a church . \n",
]


def test_wikitext_articles():
    docs = wikitext_articles(WIKI)
    assert len(docs) == 2 and docs[0].startswith("= Alpha =") and "History" in docs[0] and docs[1].startswith("= Beta =")


def test_wikitext_through_datasets_stand_in(tiny_tokenizer, monkeypatch):
    """The real code path (datasets.load_dataset('wikitext', 'wikitext-2-raw-v1')) with a stand-in."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return {"text": WIKI * 20}

    monkeypatch.setattr(text_mod, "hub_offline", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train = load_text_blocks("wikitext-2", tiny_tokenizer, block_len=16)
    load_text_blocks("wikitext-2", tiny_tokenizer, block_len=16, split="heldout")
    load_text_blocks("wikitext-2", tiny_tokenizer, block_len=16, split="heldout", heldout_split="test")
    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", "train"),
        ("wikitext", "wikitext-2-raw-v1", "validation"),
        ("wikitext", "wikitext-2-raw-v1", "test"),
    ]
    ids = tokenize_documents(wikitext_articles(WIKI * 20), tiny_tokenizer)
    assert train.flatten().tolist() == ids[: train.numel()]


def test_wikitext_offline_is_a_clear_fast_error(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(KGError, match=r"wikitext-2: .*not in the local cache and offline mode is on"):
        load_text_blocks("wikitext-2", tiny_tokenizer)
    assert time.perf_counter() - t0 < 2.0


def test_text_source_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(KGError, match=r"nowhere\.txt: no such file or directory"):
        load_text_blocks(str(tmp_path / "nowhere.txt"), tiny_tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KGError, match=r"empty: folder has no \.txt files"):
        load_text_blocks(str(tmp_path / "empty"), tiny_tokenizer)
    with pytest.raises(KGError, match=r"split must be 'train' or 'heldout'"):
        load_text_blocks(str(tmp_path), tiny_tokenizer, split="dev")
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(PARAS))
    with pytest.raises(KGError, match=r"held-out\): \d+ tokens, fewer than one block of block_len=100000"):
        load_text_blocks(str(f), tiny_tokenizer, block_len=100000, split="heldout")


def test_token_ids_are_reused_only_for_the_same_documents_and_tokenizer(tiny_tokenizer_dir, monkeypatch):
    """A process tokenizes the same documents with the same tokenizer once; a tokenizer that splits
    differently, other documents or another separator are tokenized afresh; at most a few are kept."""
    from transformers import AutoTokenizer

    monkeypatch.setattr(text_mod, "_TOKENIZED", {})
    a = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    calls = []
    real = type(a).__call__
    monkeypatch.setattr(type(a), "__call__", lambda self, *x, **k: calls.append(1) or real(self, *x, **k))
    first = tokenize_documents(PARAS, a)
    again = tokenize_documents(PARAS, AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)))  # equal tokenizer, new object
    assert again == first and len(calls) == 1
    again.append(0)  # the caller owns what it gets
    assert tokenize_documents(PARAS, a) == first and len(calls) == 1
    b = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    b.add_tokens(["vehicle number"])  # another split of the same text
    other = tokenize_documents(PARAS, b)
    assert len(calls) == 2 and other != first and len(other) < len(first)
    last_eos = len(first) - 1 - first[::-1].index(a.eos_token_id)
    assert tokenize_documents(PARAS[:-1], a) == first[:last_eos] and len(calls) == 3  # other documents
    for i in range(text_mod._TOKENIZED_KEEP + 1):
        tokenize_documents([f"document {i}"], a)
    assert len(text_mod._TOKENIZED) == text_mod._TOKENIZED_KEEP
    tokenize_documents(PARAS, a)
    assert len(calls) == 3 + text_mod._TOKENIZED_KEEP + 2  # the oldest entries were dropped: tokenized again
