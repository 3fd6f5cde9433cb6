"""The bundled model (kcs_lens/bundled) knows its IsA facts and is a working language model.

Loaded with plain ``transformers`` from the directory, as a user would. Definitions match
scripts/train_bundled.py: the first tail token must be the top-1 prediction after
``<|endoftext|>`` + prefix (prefix = text without the tail, the space belongs to the tail), and
the held-out perplexity is per token over BOS-prefixed 512-token blocks of text/heldout.txt.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# no TransformerLens code runs here: scripts/test.sh runs it on one TL line only
pytestmark = pytest.mark.tl_independent


BUNDLE = Path(__file__).resolve().parents[1] / "kcs_lens" / "bundled"
MODEL_DIR = BUNDLE / "model"
EOT = "<|endoftext|>"
BLOCK = 512
REPRODUCE = "HF_HUB_OFFLINE=1 python scripts/train_bundled.py --threads 1"


def _rows(name: str) -> list[dict]:
    with open(BUNDLE / "kg" / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _target_names() -> list[str]:
    return sorted(p.stem for p in (BUNDLE / "kg").glob("target_*.jsonl") if not p.stem.endswith("_paraphrases"))


@pytest.fixture(scope="module")
def bundle():
    assert (BUNDLE / "MANIFEST.json").is_file(), f"no bundle in {BUNDLE}: run `{REPRODUCE}`"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One thread: on a shared 2-core machine, 2 torch threads ran ~5x slower than 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR)).eval()
    manifest = json.loads((BUNDLE / "MANIFEST.json").read_text())
    yield model, tok, manifest
    torch.set_num_threads(threads)


@torch.no_grad()
def first_tail_correct(model, tok, rows: list[dict]) -> list[bool]:
    """Per triplet: is the first tail token the top-1 prediction after BOS + prefix?"""
    bos = tok.convert_tokens_to_ids(EOT)
    prompts, golds = [], []
    for t in rows:
        assert t["text"].endswith(" " + t["tail"])
        prefix = t["text"][: len(t["text"]) - len(t["tail"])].rstrip(" ")
        prompts.append([bos] + tok.encode(prefix))
        golds.append(tok.encode(" " + t["tail"])[0])
    out: list[bool] = []
    for i in range(0, len(prompts), 256):
        chunk = prompts[i : i + 256]
        x = torch.full((len(chunk), max(map(len, chunk))), bos)
        for b, p in enumerate(chunk):
            x[b, : len(p)] = torch.tensor(p)
        logits = model(x).logits[torch.arange(len(chunk)), torch.tensor([len(p) - 1 for p in chunk])]
        out += (logits.argmax(-1) == torch.tensor(golds[i : i + 256])).tolist()
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def test_bundle_layout_and_size(bundle):
    model, tok, manifest = bundle
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (MODEL_DIR / f).is_file(), f
    for f in ("control_train", "control_val"):
        assert (BUNDLE / "kg" / f"{f}.jsonl").is_file()
    assert (BUNDLE / "text" / "train.txt").is_file() and (BUNDLE / "text" / "heldout.txt").is_file()
    names = _target_names()
    assert {"target_building", "target_location"} <= set(names) and len(names) >= 4
    for n in names:
        assert (BUNDLE / "kg" / f"{n}_paraphrases.jsonl").is_file()
    total = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    assert total <= 20e6, f"bundle is {total / 1e6:.1f} MB"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied


def test_tokenizer_loads_by_path_as_gpt2(bundle):
    model, tok, manifest = bundle
    assert type(tok).__name__ in ("GPT2Tokenizer", "GPT2TokenizerFast") and tok.is_fast
    assert tok.name_or_path == str(MODEL_DIR)  # TransformerLens re-loads the tokenizer by this
    assert tok.bos_token == tok.eos_token == tok.unk_token == EOT
    assert tok.bos_token_id == model.config.bos_token_id == model.config.eos_token_id
    assert len(tok) == model.config.vocab_size
    assert tok.decode(tok.encode("A cathedral is a building")) == "A cathedral is a building"


def test_kgs_are_disjoint_and_well_formed(bundle):
    targets = {n: _rows(n) for n in _target_names()}
    control = _rows("control_train") + _rows("control_val")
    syn = lambda rows: {t["head_synset"] for t in rows} | {t["tail_synset"] for t in rows}  # noqa: E731
    names = list(targets)
    for i, a in enumerate(names):
        assert 10 <= len(targets[a]) <= 40
        assert not syn(targets[a]) & syn(control), a
        for b in names[i + 1 :]:
            assert not syn(targets[a]) & syn(targets[b]), (a, b)
    everything = [t for rows in targets.values() for t in rows] + control
    heads = Counter(t["head"].lower() for t in everything)
    assert max(heads.values()) == 1  # one tail per head: the fact is learnable
    for t in everything:
        assert {"head", "relation", "tail", "text", "head_synset", "tail_synset"} <= set(t)
        assert t["relation"] == "IsA" and t["tail"].isalpha() and t["template"] == 0


def test_model_knows_the_facts(bundle):
    model, tok, manifest = bundle
    sets = {n: _rows(n) for n in _target_names()}
    sets["control"] = _rows("control_train") + _rows("control_val")
    correct = {n: first_tail_correct(model, tok, rows) for n, rows in sets.items()}
    acc_all = _mean(c for cs in correct.values() for c in cs)
    acc_target = _mean(c for n, cs in correct.items() if n != "control" for c in cs)
    acc_control = _mean(correct["control"])
    per_set = {n: round(_mean(cs), 3) for n, cs in correct.items()}
    print(f"first-tail top-1: all {acc_all:.4f} targets {acc_target:.4f} control {acc_control:.4f} {per_set}")
    assert acc_all >= 0.90
    assert acc_target >= 0.90 and acc_control >= 0.90
    assert min(per_set.values()) >= 0.8
    assert abs(acc_all - manifest["accuracy"]["all_target_and_control"]) <= 0.01  # MANIFEST is honest


def test_model_knows_the_paraphrases(bundle):
    model, tok, manifest = bundle
    rows = [t for n in _target_names() for t in _rows(f"{n}_paraphrases")]
    assert {t["template"] for t in rows} == {1, 2, 3}
    acc = _mean(first_tail_correct(model, tok, rows))
    print(f"paraphrase first-tail top-1: {acc:.4f}")
    assert acc >= 0.85


@torch.no_grad()
def test_heldout_perplexity(bundle):
    model, tok, manifest = bundle
    bos = tok.convert_tokens_to_ids(EOT)
    held = (BUNDLE / "text" / "heldout.txt").read_text(encoding="utf-8").rstrip("\n")
    ids = tok.encode(held, verbose=False)
    n = len(ids) // (BLOCK - 1)
    assert n >= 20, "held-out text too short"
    body = torch.tensor(ids[: n * (BLOCK - 1)]).view(n, BLOCK - 1)
    x = torch.cat([torch.full((n, 1), bos), body], dim=1)
    nll = 0.0
    for i in range(0, n, 16):
        logits = model(x[i : i + 16]).logits[:, :-1]
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[i : i + 16, 1:].reshape(-1), reduction="sum").item()
    ppl = math.exp(nll / body.numel())

    # Reference: a unigram model of the training text (add-one smoothed) on the same tokens.
    train_ids = tok.encode((BUNDLE / "text" / "train.txt").read_text(encoding="utf-8"), verbose=False)
    counts = torch.bincount(torch.tensor(train_ids), minlength=len(tok)).double() + 1
    logp = (counts / counts.sum()).log()
    unigram_ppl = math.exp(-logp[body.reshape(-1)].mean().item())
    print(f"held-out ppl {ppl:.2f} (unigram {unigram_ppl:.1f}; MANIFEST {manifest['heldout_ppl']})")
    assert math.isfinite(ppl)
    # Bounds: a uniform guess over the 4,096 tokens scores 4,096, the unigram model of the
    # training text ~815, the shipped model 168 (MANIFEST). It must use context (at most half the
    # unigram perplexity) and stay within ~20% of the shipped quality (< 200); the MANIFEST check
    # below pins the exact number.
    assert ppl < 0.5 * unigram_ppl
    assert ppl < 200
    assert abs(ppl - manifest["heldout_ppl"]) / manifest["heldout_ppl"] < 0.01
