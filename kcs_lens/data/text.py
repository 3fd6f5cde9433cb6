"""ControlLM text: fixed-length token blocks whose language modelling the remaining model must keep.

Sources (``load_text_blocks(source, ...)``):

- ``wikitext-2``: ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1")`` (the paper's choice);
  train = its train split, held-out = its validation split (``heldout_split="test"`` for the test
  split). Documents are the articles (a new one starts at each ``" = Title = "`` line). Needs the
  Hugging Face Hub (or its cache).
- ``bundled``: the package's ``bundled/text/train.txt`` / ``heldout.txt`` (one paragraph per line;
  each line is a document).
- a local ``.txt`` file or a folder of ``.txt`` files (sorted, recursive): documents are separated
  by blank lines; held-out = the last ``heldout_frac`` (10%) of the tokens, train = the rest.

Documents are tokenized without special tokens and joined with the EOS token between them; the
token stream is cut into non-overlapping blocks of ``block_len`` (the remainder is dropped).
Nothing is prepended to a block (blocks are raw token windows). A process tokenizes the same
documents with the same tokenizer once (``report`` over many runs, a pack of sweep cells, a
notebook): the token ids are kept for the last few (documents, tokenizer) pairs, keyed by their
content.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from kcs_lens.data.loaders import bundled_dir, hub_offline
from kcs_lens.errors import KGError

__all__ = ["WIKITEXT_NAMES", "load_text_blocks", "text_documents", "tokenize_documents", "make_blocks"]

WIKITEXT_NAMES = ("wikitext-2", "wikitext-2-raw-v1", "wikitext")
_TRAIN = ("train",)
_HELDOUT = ("heldout", "held-out", "val", "validation", "test")
_ARTICLE_START = re.compile(r"^ = [^=].* = \s*$")


def _check_split(split: str) -> str:
    s = split.lower()
    if s not in _TRAIN + _HELDOUT:
        raise KGError(f"text split must be 'train' or 'heldout' (or 'validation'/'test'), got {split!r}")
    return s


def _wikitext_documents(split: str, heldout_split: str) -> list[str]:
    """WikiText-2 (raw) articles of one split, through ``datasets``."""
    hf_split = "train" if split == "train" else (split if split in ("validation", "test") else heldout_split)
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
    except Exception as e:  # no network and no cache
        if hub_offline():
            raise KGError(
                "wikitext-2: datasets.load_dataset('wikitext', 'wikitext-2-raw-v1') is not in the local cache and "
                "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE). Use a local .txt file/folder or 'bundled'"
            ) from None
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise KGError(f"wikitext-2 ({hf_split}): cannot load ({type(e).__name__}: {msg})") from None
    return wikitext_articles(ds["text"])


def wikitext_articles(lines: Sequence[str]) -> list[str]:
    """Group WikiText lines into articles (a top-level ``" = Title = "`` line starts one)."""
    docs: list[list[str]] = []
    for line in lines:
        if _ARTICLE_START.match(line) or not docs:
            docs.append([])
        docs[-1].append(line)
    return [d for d in ("".join(doc).strip() for doc in docs) if d]


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _read(path: Path, source: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows) is not text
    except OSError as e:
        raise KGError(f"{source}: cannot read {path} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        where = str(path) if source == str(path) else f"{source}: {path}"
        raise KGError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _local_documents(path: Path, source: str) -> list[str]:
    """Paragraphs of a .txt file, or of every .txt file of a folder (sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise KGError(f"{source}: folder has no .txt files")
    else:
        files = [path]
    return [p for f in files for p in _paragraphs(_read(f, source))]


def _bundled_documents(split: str) -> list[str]:
    name = "train.txt" if split == "train" else "heldout.txt"
    path = bundled_dir() / "text" / name
    if not path.is_file():
        raise KGError(f"bundled: text file {path} not found (the bundled data is not installed)")
    return [line.strip() for line in _read(path, "bundled").splitlines() if line.strip()]


def text_documents(source: str, split: str = "train", *, heldout_split: str = "validation") -> list[str]:
    """The documents of a source: WikiText-2 articles, bundled lines, or local paragraphs (all splits)."""
    split = _check_split(split)
    if source.lower() in WIKITEXT_NAMES:
        return _wikitext_documents(split, heldout_split)
    if source == "bundled":
        return _bundled_documents(split)
    path = Path(source).expanduser()
    if not path.exists():
        raise KGError(f"{source}: no such file or directory (text sources: 'wikitext-2', 'bundled', a .txt file or folder)")
    return _local_documents(path, source)


_TOKENIZED: dict[tuple[str, str], array] = {}  # (documents digest, tokenizer digest) -> ids, newest last
_TOKENIZED_KEEP = 4


def _tokenizer_digest(tokenizer: Any, eos: int) -> str | None:
    """A digest of a fast (``tokenizers``-backed) tokenizer's whole definition and its separator;
    None for other tokenizers (their ids are not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    return hashlib.sha256(f"{eos}\0{backend.to_str()}".encode()).hexdigest()


def _documents_digest(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode())
        h.update(b"\0")  # no document contains NUL after reading; keeps ["ab"] and ["a", "b"] apart
    return h.hexdigest()


def tokenize_documents(docs: Sequence[str], tokenizer: Any) -> list[int]:
    """Token ids of the documents joined with the EOS token between them (no special tokens else)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "bos_token_id", None)
    if eos is None:
        raise KGError("the tokenizer has no EOS (or BOS) token to separate documents")
    tok_key = _tokenizer_digest(tokenizer, eos)
    key = (_documents_digest(docs), tok_key) if tok_key is not None else None
    if key is not None and key in _TOKENIZED:
        _TOKENIZED[key] = _TOKENIZED.pop(key)  # most recently used last
        return _TOKENIZED[key].tolist()
    if callable(tokenizer) and hasattr(tokenizer, "batch_decode"):  # a HF tokenizer: batched and fast
        rows = tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]
    else:
        rows = [tokenizer.encode(d, add_special_tokens=False) for d in docs]
    ids: list[int] = []
    for i, r in enumerate(rows):
        if i:
            ids.append(eos)
        ids.extend(r)
    if key is not None:
        _TOKENIZED[key] = array("q", ids)
        while len(_TOKENIZED) > _TOKENIZED_KEEP:
            del _TOKENIZED[next(iter(_TOKENIZED))]
    return ids


def make_blocks(
    ids: Sequence[int], block_len: int, *, max_blocks: int | None = None, source: str = "text"
) -> Int[Tensor, "n block_len"]:
    """Non-overlapping ``block_len`` windows of ``ids`` (remainder dropped); KGError if none fits."""
    if block_len < 1:
        raise KGError(f"{source}: block_len must be >= 1, got {block_len}")
    n = len(ids) // block_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise KGError(
            f"{source}: {len(ids)} tokens, fewer than one block of block_len={block_len}; use more text or a smaller block_len"
        )
    return torch.tensor(list(ids[: n * block_len]), dtype=torch.long).view(n, block_len)


def load_text_blocks(
    source: str,
    tokenizer: Any,
    *,
    block_len: int = 512,
    split: str = "train",
    max_blocks: int | None = None,
    heldout_frac: float = 0.1,
    heldout_split: str = "validation",
) -> Int[Tensor, "n block_len"]:
    """ControlLM blocks ``[n, block_len]`` from ``source`` (``wikitext-2``, ``bundled``, a .txt file/folder).

    ``split``: 'train' or 'heldout'. Local text: held-out = the last ``heldout_frac`` of the tokens.
    WikiText-2: held-out = its ``heldout_split`` ('validation' or 'test').
    """
    split = _check_split(split)
    if max_blocks is not None and max_blocks < 1:
        raise KGError(f"{source}: max_blocks must be >= 1, got {max_blocks}")
    docs = text_documents(source, split, heldout_split=heldout_split)
    if not docs:
        raise KGError(f"text source {source!r}: no text (the file or folder is empty)")
    ids = tokenize_documents(docs, tokenizer)
    is_local = source.lower() not in WIKITEXT_NAMES and source != "bundled"
    if is_local:
        if not 0.0 < heldout_frac < 1.0:
            raise KGError(f"{source}: heldout_frac must be between 0 and 1, got {heldout_frac}")
        cut = len(ids) - int(round(len(ids) * heldout_frac))
        ids = ids[:cut] if split == "train" else ids[cut:]
    label = f"text source {source!r} ({'train' if split == 'train' else 'held-out'})"
    return make_blocks(ids, block_len, max_blocks=max_blocks, source=label)
