"""The prefix/tail split (issue 12, "Data") for the tokenizer kinds of the supported families:
GPT-2's byte-level BPE (BOS = EOS, never added by the tokenizer), a Qwen-like one with no BOS
token at all, a SentencePiece-like (Metaspace) one that adds ``<s>`` itself as Llama's does, and
one where the prefix's tokens are not a prefix of the whole text's (an error naming the triplet).

Rule: tail tokens = tokens(prefix + tail) minus tokens(prefix); exactly one BOS (or EOS when the
tokenizer has no BOS) first, placed by kcs-lens.
"""

from __future__ import annotations

import pytest
from _family_fixtures import make_tokenizer

from kcs_lens.data.triplets import Triplet, tokenize_triplets
from kcs_lens.errors import KGError

# no TransformerLens code runs here: scripts/test.sh runs it on one TL line only
pytestmark = pytest.mark.tl_independent


TRIP = [Triplet("dog", "IsA", "animal", "A dog is an animal"), Triplet("rose", "IsA", "flower", "A rose is a flower")]


def _rows(batch):
    return [batch.tokens[i, : int(n)].tolist() for i, n in enumerate(batch.lengths)]


def _tail_ids(batch, i):
    """Token ids at the scored target positions of row i (what the model must predict)."""
    return batch.targets[i][batch.score_mask[i]].tolist()


def _check(tok, bos_id):
    b = tokenize_triplets(TRIP, tok)
    for i, t in enumerate(TRIP):
        row = _rows(b)[i]
        assert row[0] == bos_id and bos_id not in row[1:]  # one BOS, ours
        full = tok.encode(t.text, add_special_tokens=False)
        assert row[1:] == full  # prefix + tail tokens are the whole text's tokens
        tail = _tail_ids(b, i)
        assert tok.decode(tail).strip() == t.tail
        assert row[1 : len(row) - len(tail)] == tok.encode(t.prefix, add_special_tokens=False)
    return b


def test_byte_level_bpe_space_belongs_to_the_tail(tmp_path):
    tok = make_tokenizer("bytelevel", tmp_path)
    _check(tok, tok.bos_token_id)
    b = tokenize_triplets(TRIP[:1], tok)
    first = tok.convert_ids_to_tokens(_tail_ids(b, 0))[0]
    assert first.startswith("\u0120")  # GPT-2's 'Ġ': the space is part of the tail's first token


def test_tokenizer_without_bos_uses_eos(tmp_path):
    from transformers import AutoTokenizer

    tok = make_tokenizer("bytelevel", tmp_path)
    tok.bos_token = None  # as Qwen's: no BOS token, only <|endoftext|> as EOS
    tok.save_pretrained(tmp_path / "nobos")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "nobos"))
    assert tok.bos_token_id is None
    _check(tok, tok.eos_token_id)


def test_sentencepiece_tokenizer_that_adds_bos_itself(tmp_path):
    tok = make_tokenizer("metaspace", tmp_path)
    assert tok.encode("A dog")[0] == tok.bos_token_id  # it adds <s> by itself...
    b = _check(tok, tok.bos_token_id)  # ...and the batch still has exactly one
    # the space before the tail is part of the tail's first token ('▁animal'), not of the prefix
    first = tok.convert_ids_to_tokens(_tail_ids(b, 0))[0]
    assert first.startswith("\u2581") and tok.convert_ids_to_tokens(b.tokens[0, 1:].tolist())[0] == "\u2581A"


def test_sentencepiece_with_a_separate_space_token(tmp_path):
    """A tokenizer whose '▁' before the tail is a token of its own: it is scored as the tail's first."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "\u2581": 2, "A": 3, "dog": 4, "is": 5, "an": 6, "animal": 7}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never"), pre_tokenizers.Split("\u2581", "isolated")]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>")
    t = Triplet("dog", "IsA", "animal", "A dog is an animal")
    b = tokenize_triplets([t], tok)
    assert tok.convert_ids_to_tokens(_tail_ids(b, 0)) == ["\u2581", "animal"]


def test_prefix_tokens_not_a_prefix_of_the_text_is_an_error():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "A": 2, "cat": 3, "catfish": 4, "fish": 5, "is": 6, "a": 7}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>")
    glued = Triplet("cat", "IsA", "fish", "A cat is a catfish")  # the tail does not start a word
    with pytest.raises(KGError, match="not the first tokens of the whole text"):
        tokenize_triplets([glued], tok, source="kg.jsonl")
