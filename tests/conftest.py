"""Shared fixtures: tiny real GPT-2 models and data built offline (no hub access).

- ``tiny_tokenizer``: a byte-level BPE trained on a few sentences, saved and re-loaded from disk
  (TransformerLens re-loads tokenizers by name_or_path).
- ``make_tiny_lm(backend=None, n_layers=4, seed=0)``: a random-init GPT-2 as a LensModel.
- ``tiny_kg``: TargetKG / ControlKG JSONL files and a ControlLM text file matching the tokenizer.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

WORDS = ["car", "house", "cat", "mat", "vehicle", "building", "animal", "thing", "tree", "plant", "bird", "fish"]
CORPUS = [
    "A car is a vehicle. A house is a building. A cat is an animal. A tree is a plant.",
    "The cat sat on the mat. A bird is an animal. A fish is an animal. Some more words appear here and there.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    d = tmp_path_factory.mktemp("tok")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 50, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def tiny_hf_model(tokenizer, n_layers: int = 4, seed: int = 0, d_model: int = 64, n_heads: int = 4, std: float = 0.2):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=n_layers,
        n_head=n_heads,
        n_embd=d_model,
        vocab_size=len(tokenizer),
        n_positions=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # larger than HF's init so masks visibly change the outputs
        for n, p in m.named_parameters():
            if p.dim() == 2 and "wpe" not in n:
                p.normal_(0, std)
    return m


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A local HF GPT-2 checkpoint directory (config, safetensors weights, tokenizer)."""
    d = tmp_path_factory.mktemp("tiny_model")
    tiny_hf_model(tiny_tokenizer).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def make_tiny_lm(tiny_tokenizer):
    from kcs_lens.model.loading import from_hf

    def make(backend=None, n_layers: int = 4, seed: int = 0, **kw):
        return from_hf(tiny_hf_model(tiny_tokenizer, n_layers, seed, **kw), tiny_tokenizer, backend=backend, spec="tiny")

    return make


@pytest.fixture(scope="session")
def tiny_kg(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("kg")

    def rows(n, off):
        out = []
        for i in range(n):
            h, t = WORDS[(i + off) % len(WORDS)], WORDS[(3 * i + off + 1) % len(WORDS)]
            out.append({"head": f"{h}{i}", "relation": "IsA", "tail": t, "text": f"A {h}{i} is a {t}"})
        return out

    (d / "target.jsonl").write_text("\n".join(json.dumps(r) for r in rows(6, 0)) + "\n")
    (d / "control.jsonl").write_text("\n".join(json.dumps(r) for r in rows(40, 100)) + "\n")
    (d / "text.txt").write_text("\n".join(CORPUS * 40) + "\n")
    return {"target": d / "target.jsonl", "control": d / "control.jsonl", "text": d / "text.txt"}


def tiny_run_kwargs(tiny_kg, model_dir) -> dict:
    """discover() keyword arguments for a few-step run on the tiny model and data."""
    return dict(
        model=str(model_dir),
        target_kg=str(tiny_kg["target"]),
        control_kg=str(tiny_kg["control"]),
        control_val_kg="",
        control_val_size=10,
        control_lm=str(tiny_kg["text"]),
        lm_block_len=32,
        lm_eval_blocks=4,
        steps=12,
        eval_every=3,
        checkpoint_every=6,
        control_batch=8,
        lm_batch=2,
    )


def bundled_available() -> bool:
    from kcs_lens.model.loading import BUNDLED_DIR

    return (BUNDLED_DIR / "config.json").exists()


# The bundled models ship with the package: a missing one is a failure (tests/test_packaging.py), never
# a skip, so that a broken path cannot silently skip every test that uses them.
requires_bundled = pytest.mark.bundled


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread here and in every process started from here (OMP_NUM_THREADS=1), for the
    modules that compare runs bit for bit across processes: on some CPUs float sums differ with
    the thread count (1 vs 2 threads changes masks after a few steps)."""
    import os

    import torch

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Work units for pytest-xdist's ``--dist loadgroup`` (scripts/test.sh): a test file stays on
    one worker (its module fixtures, e.g. reference runs, are built once), except that each docs
    page of test_docs_commands is a unit of its own (minutes each: on one worker they were the
    suite's long tail). Units that hold slow tests run first, the most slow tests first, so the
    workers end together (scripts/test.sh passes --no-loadscope-reorder to keep this order)."""
    units = [
        item.nodeid if getattr(item, "originalname", "") == "test_docs_commands_exit_zero" else item.nodeid.split("::")[0]
        for item in items
    ]
    slow = Counter(u for u, item in zip(units, items) if item.get_closest_marker("slow") is not None)
    first: dict[str, int] = {}
    for i, (u, item) in enumerate(zip(units, items)):
        first.setdefault(u, i)
        item.add_marker(pytest.mark.xdist_group(u))
    order = sorted(range(len(items)), key=lambda i: (-slow[units[i]], first[units[i]]))
    items[:] = [items[i] for i in order]
