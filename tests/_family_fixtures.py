"""Tiny random-init models of every supported family, saved with ``save_pretrained`` (tokenizer
included), built offline with the transformers config classes and the ``tokenizers`` library.

Two tokenizers, trained on a few sentences: a GPT-2-style byte-level BPE (no BOS of its own,
``<|endoftext|>`` = bos = eos) and a SentencePiece-style one (Metaspace ``▁``, ``<s>`` added by
the tokenizer itself, as Llama's). ``make_family_dir(kind, root)`` writes one model directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXTS = [
    "A dog is an animal. A cat is an animal. A rose is a flower.",
    "An apple is a fruit. A house is a building. A car is a vehicle.",
    "The quick brown fox jumps over the lazy dog.",
    "A change is an event. A message is a communication.",
] * 4

# name -> (transformers config class, kwargs, tokenizer kind)
D, H, KV, F, L, CTX = 32, 4, 2, 48, 2, 64
_COMMON_LLAMA = dict(
    hidden_size=D,
    intermediate_size=F,
    num_hidden_layers=L,
    num_attention_heads=H,
    num_key_value_heads=KV,
    max_position_embeddings=CTX,
)
FAMILY_SPECS: dict[str, tuple[str, dict, str]] = {
    "gpt2": ("GPT2Config", dict(n_embd=D, n_layer=L, n_head=H, n_positions=CTX, n_inner=F), "bytelevel"),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            hidden_size=D,
            intermediate_size=F,
            num_hidden_layers=L,
            num_attention_heads=H,
            max_position_embeddings=CTX,
            rotary_pct=0.5,
            use_parallel_residual=True,
        ),
        "bytelevel",
    ),
    "llama": ("LlamaConfig", dict(_COMMON_LLAMA), "metaspace"),
    "mistral": ("MistralConfig", dict(_COMMON_LLAMA, sliding_window=None), "metaspace"),
    "qwen2": ("Qwen2Config", dict(_COMMON_LLAMA), "bytelevel"),
    "qwen3": ("Qwen3Config", dict(_COMMON_LLAMA, head_dim=16), "bytelevel"),
    "gemma": ("GemmaConfig", dict(_COMMON_LLAMA, head_dim=16), "metaspace"),
    "gemma2": (
        "Gemma2Config",
        dict(_COMMON_LLAMA, head_dim=8, final_logit_softcapping=5.0, attn_logit_softcapping=20.0, sliding_window=4),
        "metaspace",
    ),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=D,
            ffn_dim=F,
            num_hidden_layers=L,
            num_attention_heads=H,
            max_position_embeddings=CTX,
            word_embed_proj_dim=D,
            do_layer_norm_before=True,
        ),
        "bytelevel",
    ),
    "gptj": ("GPTJConfig", dict(n_embd=D, n_layer=L, n_head=H, n_positions=CTX, n_inner=F, rotary_dim=4), "bytelevel"),
}
FAMILY_NAMES = tuple(FAMILY_SPECS)


def make_tokenizer(kind: str, out: Path):
    """Train a tiny tokenizer of ``kind`` ('bytelevel' or 'metaspace'), save it, reload it by path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if kind == "metaspace":
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        tk.train_from_iterator(
            TEXTS, trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
        )
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
        )
        hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        eot = "<|endoftext|>"
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=[eot], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tk.train_from_iterator(TEXTS, trainer)
        hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=eot, eos_token=eot, unk_token=eot)
    hf.save_pretrained(out)
    return AutoTokenizer.from_pretrained(str(out))


def make_family_dir(name: str, root: Path, seed: int = 0) -> Path:
    """A tiny random-init model of family ``name`` with its tokenizer in ``root / name``."""
    import transformers

    cls_name, kw, tok_kind = FAMILY_SPECS[name]
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(tok_kind, out)
    cfg = getattr(transformers, cls_name)(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random norms and biases too, so a wrong layout cannot hide behind ones/zeros
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in n or "ln" in n else 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out
