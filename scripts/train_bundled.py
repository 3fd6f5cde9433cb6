"""Train kcs-lens' bundled model from scratch: a small GPT-2 that knows WordNet IsA facts.

Everything is built here, offline, from WordNet 3.0 (NLTK data or Debian's ``wordnet-base``):

* TargetKGs: connected IsA neighbourhoods of root synsets (building.n.01, location.n.01,
  change.n.01, communication.n.02, fruit.n.01), built like the paper's with
  ``kcs_lens.data.wordnet.build_target_kg``, pairwise disjoint, each head with one hypernym.
* ControlKG: IsA triplets sharing no synset (and no entity name) with any TargetKG, common tails
  only; split into train and validation. The model is trained on both: the mask search needs a
  model that *knows* every triplet it is asked to keep or remove.
* Paraphrases: every TargetKG triplet in the non-canonical templates of ``ISA_TEMPLATES``.
* ControlLM text: WordNet glosses and example sentences, one paragraph per synset and line;
  held-out paragraphs come from synsets that are not in the training text.

Model: GPT2LMHeadModel (4 layers, d_model 128, 4 heads, d_mlp 512, 512 positions, tied
embeddings, no dropout; 1.38M parameters, 5.5 MB float32) with a byte-level BPE tokenizer
(vocab 4096, ``<|endoftext|>`` = bos = eos = unk) trained on the corpus. Every training sequence
starts with ``<|endoftext|>``, as every prompt the project scores does. Each step = one batch of
128 triplet sentences (every template; the canonical one 4 times per epoch, see below; loss on
the tokens after the head) + 2 text blocks of 512 tokens (so all 512 positions are trained).
AdamW (lr 2e-3, betas 0.9/0.95, wd 0.01 on matrices), 100 warm-up steps, cosine decay to 5%,
gradient clipping 1.0, 1,400 steps. Triplet batches group sentences of similar length (~30% less
padding); because such batches are template-homogeneous, mid-training accuracy zig-zags (the
step-1000 evaluation dipped to 0.67) before the decayed learning rate settles it.

Why the canonical template is repeated: the paraphrases "A X is a kind of Y" / "A X is a type of
Y" / "A X is an example of a Y" extend the canonical prefix "A X is a(n)". A model that learns
all templates spreads its prediction after "A X is a" over the tail, " kind" and " type"; with the
canonical sentence 4 times per epoch the tail is the clear top-1 (a 2x repeat left ~5% of the
TargetKG facts predicting " kind").

Reproduce (seeds fixed; data, tokenizer and weights came out identical in two runs; the bundle is
written to a temporary directory and moved into place at the end)::

    HF_HUB_OFFLINE=1 python scripts/train_bundled.py --threads 1        # --out kcs_lens/bundled

``--threads 1`` is what the shipped bundle used. On a 2-core machine that other processes also
use, 2 torch threads were ~5x slower per step than 1 (OpenMP threads waiting for each other), so
1 thread is the robust choice; another thread count gives a numerically different (equally good)
model. Time: a 1-thread step measured 0.45 s at load average ~3 (~11 min for 1,400 steps, plus
~1 min for data and tokenizer); the shipped run took 15.6 min of training (16.5 min in all) while
other engineers' jobs kept the load average at 5-7 on the 2 cores.

Measured on the shipped bundle (MANIFEST.json has every number): first-tail-token top-1 accuracy
after BOS + prefix 1.000 on every set (5 TargetKGs x 30 triplets, ControlKG 800 train + 200
val, the 450 paraphrases); held-out perplexity 167.9 per token over BOS-prefixed 512-token blocks
of text/heldout.txt (a unigram model of the training text scores ~815, a uniform guess 4,096).

Output (``--out``; other files already there, e.g. ``__init__.py``, are left alone)::

    model/        config.json, model.safetensors, tokenizer files (AutoTokenizer/AutoModel by path)
    kg/           target_<name>.jsonl, target_<name>_paraphrases.jsonl, control_train.jsonl, control_val.jsonl
    text/         train.txt, heldout.txt (one paragraph per line)
    MANIFEST.json args, seeds, versions, sizes, training time, accuracies, held-out perplexity
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kcs_lens.data.templates import ISA_TEMPLATES, fill  # noqa: E402
from kcs_lens.data.wordnet import (  # noqa: E402
    build_control_kg,
    build_target_kg,
    kg_synsets,
    open_wordnet,
    wordnet_version,
)

EOT = "<|endoftext|>"
FAMILIES = ("gpt2", "llama")
# The llama tokenizer: SentencePiece-style (Metaspace) BPE that adds <s> itself, as Llama's does.
LLAMA_SPECIAL = ("<unk>", "<s>", "</s>")
# (file name, root synset, hypernym levels above the root). up=2 where the paper's TargetKG has the
# grandparent edge (structure->artifact, happening->event); location's grandparent is multi-word.
TARGET_ROOTS = [
    ("building", "building.n.01", 2),
    ("location", "location.n.01", 2),
    ("change", "change.n.01", 2),
    ("communication", "communication.n.02", 1),
    ("fruit", "fruit.n.01", 1),
]
_COMMON_NOUN = re.compile(r"^[a-z]+(?:[ -][a-z]+){0,2}$")  # heads: lower-case, at most 3 words


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=FAMILIES, default="gpt2", help="gpt2 (the bundle) or llama (bundled/llama)")
    p.add_argument("--out", default=None, help="default: kcs_lens/bundled (gpt2), kcs_lens/bundled/llama (llama)")
    p.add_argument("--wordnet", default=None, help="WordNet directory (default: NLTK data, else /usr/share/wordnet)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-target", type=int, default=30, help="max triplets per TargetKG")
    p.add_argument("--n-control", type=int, default=1000)
    p.add_argument("--n-control-val", type=int, default=200)
    p.add_argument("--min-tail-heads", type=int, default=20, help="drop control tails with fewer candidate heads")
    p.add_argument("--n-text-train", type=int, default=30000, help="gloss paragraphs for training")
    p.add_argument("--n-text-heldout", type=int, default=1500)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-kv-head", type=int, default=2, help="llama: key/value heads (grouped-query attention)")
    p.add_argument("--d-mlp", type=int, default=None, help="default: 4 * d_model (gpt2), 3 * d_model (llama)")
    p.add_argument("--n-positions", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--repeat-canonical", type=int, default=4, help="canonical sentences per triplet and epoch")
    p.add_argument("--fact-batch", type=int, default=128, help="triplet sentences per step")
    p.add_argument("--text-batch", type=int, default=2, help="text blocks per step")
    p.add_argument("--block-size", type=int, default=512, help="text block length incl. BOS")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(REPO / "kcs_lens" / "bundled" / ("llama" if args.family == "llama" else ""))
    if args.d_mlp is None:
        args.d_mlp = (4 if args.family == "gpt2" else 3) * args.d_model
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def build_kgs(wn, args) -> dict[str, list[dict]]:
    """TargetKGs (pairwise disjoint, unique heads) and the ControlKG split into train/val."""
    kgs: dict[str, list[dict]] = {}
    used_synsets: set[str] = set()
    used_names: set[str] = set()
    for name, root, up in TARGET_ROOTS:
        kg = build_target_kg(
            wn,
            root,
            up=up,
            down=2,
            max_triplets=args.max_target,
            min_triplets=10,
            seed=args.seed,
            exclude_synsets=used_synsets,
            exclude_heads=used_names,
            single_parent=True,
            head_filter=_COMMON_NOUN.match,
        )
        kgs[f"target_{name}"] = kg
        used_synsets |= kg_synsets(kg)
        used_names |= {t["head"] for t in kg} | {t["tail"] for t in kg}
    control = build_control_kg(
        wn,
        used_synsets,
        args.n_control,
        args.seed,
        exclude_names=True,
        single_parent=True,
        min_tail_heads=args.min_tail_heads,
        exclude_heads=used_names,
        head_filter=_COMMON_NOUN.match,
    )
    kgs["control_val"] = control[: args.n_control_val]
    kgs["control_train"] = control[args.n_control_val :]
    # Each head must have exactly one tail across everything the model learns.
    heads = [t["head"].lower() for kg in kgs.values() for t in kg]
    assert len(heads) == len(set(heads)), "a head appears twice"
    return kgs


def paraphrases(kg: list[dict]) -> list[dict]:
    rows = []
    for t in kg:
        for i, tpl in enumerate(ISA_TEMPLATES[1:], start=1):
            rows.append({**t, "text": fill(tpl, t["head"], t["tail"]), "template": i})
    return rows


def build_text(wn, args, kg_synset_names: set[str]) -> tuple[list[str], list[str]]:
    """One paragraph per synset ("Name: gloss. Example. Example."), split by synset."""

    def paragraph(s) -> str:
        name = s.lemmas()[0].name().replace("_", " ")
        out = f"{name[:1].upper()}{name[1:]}: {s.definition().strip().rstrip('.')}."
        for ex in s.examples():
            ex = ex.strip().strip('"').strip()
            if ex:
                out += f" {ex[:1].upper()}{ex[1:]}{'' if ex[-1] in '.!?' else '.'}"
        return out

    synsets = [s for pos in "nvar" for s in wn.all_synsets(pos)]  # 's' satellites come with 'a'
    synsets = sorted({s.name(): s for s in synsets}.values(), key=lambda s: s.name())
    rng = random.Random(f"text:{args.seed}")
    rng.shuffle(synsets)
    # Held-out paragraphs never describe a KG entity; training text may (as Wikipedia would).
    heldout = [s for s in synsets if s.name() not in kg_synset_names][: args.n_text_heldout]
    held_names = {s.name() for s in heldout}
    train = [s for s in synsets if s.name() not in held_names][: args.n_text_train]
    return [paragraph(s) for s in train], [paragraph(s) for s in heldout]


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path, family: str = "gpt2"):
    """A BPE tokenizer saved as a tokenizer directory; returns it re-loaded from disk.

    gpt2: byte-level BPE, ``<|endoftext|>`` = bos = eos = unk, adds no BOS itself.
    llama: SentencePiece-style BPE (spaces become ``▁``, prepended to the first word), ``<unk>``,
    ``<s>``, ``</s>``; adds ``<s>`` itself, as Llama's tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

    if family == "llama":
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(LLAMA_SPECIAL),
            initial_alphabet=["\n"],  # text blocks join paragraphs with newlines
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        bos_id = tk.token_to_id("<s>")
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)])
        hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        hf = GPT2TokenizerFast(tokenizer_object=tk, bos_token=EOT, eos_token=EOT, unk_token=EOT, add_prefix_space=False)
    hf.model_max_length = 512
    hf.save_pretrained(out_dir)
    # Re-load by path: that gives it a name_or_path (TransformerLens re-loads tokenizers by it).
    return AutoTokenizer.from_pretrained(str(out_dir))


def _enc(tok, text: str) -> list[int]:
    """Token ids without special tokens (the script places BOS itself, for both families)."""
    return tok.encode(text, add_special_tokens=False)


def encode_facts(tok, rows: list[dict], repeat_canonical: int) -> list[tuple[list[int], int]]:
    """(BOS + token ids, number of leading tokens *not* scored: BOS and the head).

    Every template of every triplet; the canonical one ``repeat_canonical`` times.
    """
    bos = tok.bos_token_id
    out = []
    for t in rows:
        for i, tpl in enumerate(ISA_TEMPLATES):
            text = fill(tpl, t["head"], t["tail"])
            ids = [bos] + _enc(tok, text)
            pos = text.find(t["head"])
            n_head = 1 + (len(_enc(tok, text[: pos + len(t["head"])])) if pos >= 0 else 0)
            out += [(ids, n_head)] * (repeat_canonical if i == 0 else 1)
    return out


def text_blocks(tok, lines: list[str], block_size: int) -> torch.Tensor:
    """The text (lines joined by newlines) cut into blocks of ``block_size - 1`` tokens, each after a BOS."""
    ids = tok.encode("\n".join(lines), add_special_tokens=False, verbose=False)
    n = len(ids) // (block_size - 1)
    body = torch.tensor(ids[: n * (block_size - 1)]).view(n, block_size - 1)
    bos = torch.full((n, 1), tok.bos_token_id)
    return torch.cat([bos, body], dim=1)


def fact_batch(items: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and labels (-100 on BOS/head targets and padding)."""
    T = max(len(ids) for ids, _ in items)
    x = torch.full((len(items), T), pad_id)
    y = torch.full((len(items), T), -100)
    for b, (ids, n_head) in enumerate(items):
        x[b, : len(ids)] = torch.tensor(ids)
        y[b, n_head : len(ids)] = torch.tensor(ids[n_head:])  # predict the tokens after the head
    return x, y


# ---------------------------------------------------------------------------------------------
# Evaluation (the definitions the tests and the project use)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def first_tail_accuracy(model, tok, rows: list[dict], batch_size: int = 256) -> float:
    """Top-1 accuracy of the first tail token given BOS + prefix (space belongs to the tail)."""
    bos = tok.bos_token_id
    prompts, golds = [], []
    for t in rows:
        prefix = t["text"][: len(t["text"]) - len(t["tail"])].rstrip(" ")
        prompts.append([bos] + _enc(tok, prefix))
        golds.append(_enc(tok, " " + t["tail"])[0])
    correct = 0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        T = max(map(len, chunk))
        x = torch.full((len(chunk), T), bos)
        for b, p in enumerate(chunk):
            x[b, : len(p)] = torch.tensor(p)
        logits = model(x).logits
        last = torch.tensor([len(p) - 1 for p in chunk])
        pred = logits[torch.arange(len(chunk)), last].argmax(-1)
        correct += (pred == torch.tensor(golds[i : i + batch_size])).sum().item()
    return correct / max(1, len(rows))


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Per-token perplexity of BOS-prefixed blocks (the BOS itself is not predicted)."""
    nll, n = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size]
        logits = model(x).logits[:, :-1]
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
        n += x[:, 1:].numel()
    return math.exp(nll / n)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def build_model(args, vocab_size: int, bos: int, eos: int):
    """The untrained model of ``args.family`` (seeded by the caller)."""
    if args.family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=args.d_model,
            intermediate_size=args.d_mlp,
            num_hidden_layers=args.n_layer,
            num_attention_heads=args.n_head,
            num_key_value_heads=args.n_kv_head,
            max_position_embeddings=args.n_positions,
            rms_norm_eps=1e-5,
            attention_dropout=args.dropout,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(cfg)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=args.n_positions,
        n_embd=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_inner=None if args.d_mlp == 4 * args.d_model else args.d_mlp,
        resid_pdrop=args.dropout,
        embd_pdrop=args.dropout,
        attn_pdrop=args.dropout,
        bos_token_id=bos,
        eos_token_id=bos,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(cfg)


def _display_path(p: str) -> str:
    """The output path relative to the repository when inside it (no user-specific prefixes)."""
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def same_data_as_shipped(tmp: Path) -> dict[str, bool]:
    """Whether each kg/ and text/ file built now equals the shipped GPT-2 bundle's (byte for byte)."""
    shipped = REPO / "kcs_lens" / "bundled"
    out = {}
    for f in sorted([*(tmp / "kg").iterdir(), *(tmp / "text").iterdir()]):
        rel = f"{f.parent.name}/{f.name}"
        out[rel] = (shipped / rel).exists() and (shipped / rel).read_bytes() == f.read_bytes()
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def install(tmp: Path, out: Path, names: list[str]) -> None:
    """Move the finished bundle entries into ``out`` (old ones kept aside until all are in)."""
    for f in tmp.rglob("*"):  # save_pretrained/mkdtemp leave some entries private (0600/0700)
        os.chmod(f, 0o755 if f.is_dir() else 0o644)
    out.mkdir(parents=True, exist_ok=True)
    old = Path(tempfile.mkdtemp(prefix=".bundle-old-", dir=out))
    try:
        for name in names:  # MANIFEST.json last: its presence marks a complete bundle
            if (out / name).exists():
                os.replace(out / name, old / name)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t_start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-tmp-", dir=out))
    try:
        manifest = run(args, tmp, t_start)
        # The llama bundle shares the GPT-2 bundle's kg/ and text/ (built identically; checked in run).
        install(tmp, out, ["model", "MANIFEST.json"] if args.family == "llama" else ["model", "kg", "text", "MANIFEST.json"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"bundle written to {out} ({manifest['sizes']['bundle_bytes'] / 1e6:.1f} MB)")
    return manifest


def run(args, tmp: Path, t_start: float) -> dict:
    # ---- data ----
    wn = open_wordnet(args.wordnet)
    kgs = build_kgs(wn, args)
    targets = [k for k in kgs if k.startswith("target_")]
    paras = {f"{k}_paraphrases": paraphrases(kgs[k]) for k in targets}
    all_kg_synsets = set().union(*(kg_synsets(kg) for kg in kgs.values()))
    text_train, text_heldout = build_text(wn, args, all_kg_synsets)
    for d in ("model", "kg", "text"):
        (tmp / d).mkdir()
    for name, rows in {**kgs, **paras}.items():
        write_jsonl(tmp / "kg" / f"{name}.jsonl", [{**r, "template": r.get("template", 0)} for r in rows])
    (tmp / "text" / "train.txt").write_text("\n".join(text_train) + "\n", encoding="utf-8")
    (tmp / "text" / "heldout.txt").write_text("\n".join(text_heldout) + "\n", encoding="utf-8")
    all_facts = [t for kg in kgs.values() for t in kg]
    shared = same_data_as_shipped(tmp) if args.family == "llama" else None
    print(f"KGs: {', '.join(f'{k}={len(v)}' for k, v in kgs.items())}; text {len(text_train)}+{len(text_heldout)} paragraphs")

    # ---- tokenizer ----
    fact_texts = [fill(tpl, t["head"], t["tail"]) for t in all_facts for tpl in ISA_TEMPLATES]
    tok = train_tokenizer(text_train + fact_texts, args.vocab_size, tmp / "model", args.family)
    bos = tok.bos_token_id
    facts = encode_facts(tok, all_facts, repeat_canonical=args.repeat_canonical)
    train_blocks = text_blocks(tok, text_train, args.block_size)
    held_blocks = text_blocks(tok, text_heldout, args.block_size)
    print(
        f"tokenizer: {len(tok)} tokens; {len(facts)} fact sequences/epoch; "
        f"text blocks train {len(train_blocks)} heldout {len(held_blocks)}"
    )

    # ---- model ----
    model = build_model(args, len(tok), bos, tok.eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    # ---- training loop ----
    gen = torch.Generator().manual_seed(args.seed)
    batches: list[list[int]] = []
    history = []
    t_train = time.time()
    model.train()
    for step in range(args.steps):
        if not batches:  # next epoch of triplet sentences: shuffle, batch similar lengths (less padding)
            perm = torch.randperm(len(facts), generator=gen).tolist()
            group = args.fact_batch * 16
            for i in range(0, len(perm), group):
                chunk = sorted(perm[i : i + group], key=lambda j: len(facts[j][0]))
                batches += [chunk[k : k + args.fact_batch] for k in range(0, len(chunk), args.fact_batch)]
            batches = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
        xf, yf = fact_batch([facts[i] for i in batches.pop()], bos)
        xt = train_blocks[torch.randint(len(train_blocks), (args.text_batch,), generator=gen)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss_facts = model(xf, labels=yf).loss  # mean over the scored tokens (those after the head)
        loss_text = model(xt, labels=xt).loss
        loss = loss_facts + loss_text
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d} lr {lr_at(step):.2e} loss facts {loss_facts.item():.3f} text {loss_text.item():.3f} "
                f"({time.time() - t_train:.0f}s)",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            model.eval()
            acc = first_tail_accuracy(model, tok, all_facts)
            ppl = perplexity(model, held_blocks)
            model.train()
            history.append(
                {
                    "step": step + 1,
                    "accuracy_all": round(acc, 4),
                    "heldout_ppl": round(ppl, 2),
                    "seconds": round(time.time() - t_train, 1),
                }
            )
            print(f"  eval step {step + 1}: first-tail top-1 (all KG) {acc:.4f}, held-out ppl {ppl:.2f}", flush=True)
    train_seconds = time.time() - t_train

    # ---- final measurements, save ----
    model.eval()
    accuracy = {name: round(first_tail_accuracy(model, tok, rows), 4) for name, rows in {**kgs, **paras}.items()}
    targets_all = [t for k in targets for t in kgs[k]]
    control_all = kgs["control_train"] + kgs["control_val"]
    accuracy["all_targets"] = round(first_tail_accuracy(model, tok, targets_all), 4)
    accuracy["all_control"] = round(first_tail_accuracy(model, tok, control_all), 4)
    accuracy["all_target_and_control"] = round(first_tail_accuracy(model, tok, all_facts), 4)
    held_ppl = perplexity(model, held_blocks)
    train_ppl = perplexity(model, train_blocks[:100])
    model.save_pretrained(tmp / "model", safe_serialization=True)
    sizes = {
        "n_params": n_params,
        "model_bytes": dir_bytes(tmp / "model"),
        "kg_rows": {name: len(rows) for name, rows in {**kgs, **paras}.items()},
        "text_paragraphs": {"train": len(text_train), "heldout": len(text_heldout)},
        "text_tokens": {"train": len(train_blocks) * (args.block_size - 1), "heldout": len(held_blocks) * (args.block_size - 1)},
        "vocab_size": len(tok),
    }
    manifest = {
        "script": "scripts/train_bundled.py",
        "command": "HF_HUB_OFFLINE=1 python scripts/train_bundled.py " + " ".join(sys.argv[1:]),
        "args": {**vars(args), "out": _display_path(args.out)},
        "seeds": {"python/torch/numpy": args.seed, "kg": args.seed, "text split": args.seed},
        "target_roots": [{"name": n, "root": r, "up": u, "down": 2} for n, r, u in TARGET_ROOTS],
        "templates": ISA_TEMPLATES,
        "wordnet_version": wordnet_version(wn),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "nltk": __import__("nltk").__version__,
        },
        "family": args.family,
        "model": {
            "architecture": type(model).__name__,
            "n_layer": args.n_layer,
            "d_model": args.d_model,
            "n_head": args.n_head,
            **({"n_kv_head": args.n_kv_head} if args.family == "llama" else {}),
            "d_mlp": args.d_mlp,
            "n_positions": args.n_positions,
            "tied_embeddings": True,
            "dtype": "float32",
        },
        "accuracy_definition": f"top-1 of the first tail token after {tok.bos_token} + prefix; "
        "prefix = text[:len(text)-len(tail)].rstrip(' '), tail token from ' ' + tail",
        "heldout_ppl_definition": f"exp(mean NLL per token) over text/heldout.txt joined by newlines, "
        f"cut into {tok.bos_token} + {args.block_size - 1}-token blocks (remainder dropped)",
        "accuracy": accuracy,
        "heldout_ppl": round(held_ppl, 3),
        "train_text_ppl_first_100_blocks": round(train_ppl, 3),
        "history": history,
        **({"data_same_as_gpt2_bundle": shared} if shared is not None else {}),
        "training_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "threads": args.threads,
        "sizes": sizes,
    }
    sizes["bundle_bytes"] = (
        dir_bytes(tmp / "model") if args.family == "llama" else dir_bytes(tmp)
    ) + 4096  # + the manifest itself, roughly
    (tmp / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: manifest[k] for k in ("accuracy", "heldout_ppl", "training_seconds", "sizes")}, indent=2))
    return manifest


if __name__ == "__main__":
    main()
