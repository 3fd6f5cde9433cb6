"""Cost of one discovery step against one plain training step of the same model (the speed target: ratio <= 0.7).

    python bench/step.py --shape gpt2-small --kg-batch 32 --kg-len 12 --lm-batch 2 --lm-len 256

prints one JSON line per configuration with ``shape``, ``batch``, ``kcs_s``, ``dense_s``,
``ratio`` (= kcs_s / dense_s), ``kcs_peak_mb``, ``dense_peak_mb`` and details.

- ``dense``: one plain training step of the same model: every parameter trainable, Adam,
  next-token cross-entropy on each of the step's three batches (TargetKG, ControlKG, ControlLM),
  each its own forward and backward pass, then ``opt.step()``. The model is the HF
  ``GPT2LMHeadModel`` (SDPA attention, dropout off).
- ``kcs``: one discovery step: all loss terms, mask sampling, backward, Adam on the mask logits
  (``--impl reference`` = :class:`kcs_lens.objective.reference.ReferenceObjective`, ``fast`` =
  :class:`kcs_lens.objective.fast.FastObjective`, or a named variant, see ``--impl list``).

Both run in ONE process on the same batches, interleaved round by round (dense, then each kcs
variant), so machine load hits them alike; ``--warmup`` rounds are not timed and the reported
times are medians of ``--repeats`` timed rounds. Models are random-init GPT-2 shapes (the bundled
model's real weights when it is built); batches are random tokens, one single-token tail per KG
row at the last position. The fast path's per-run caches (TargetKG/ControlKG prefix residuals and
original distributions) are built in the first warm-up step; that one-time cost is reported as
``kcs_first_s``.

Peak memory (CPU): each method also runs in a fresh subprocess that builds only what it needs and
does ``warmup`` + 1 steps; ``*_peak_mb`` is that process's peak resident set (VmHWM:
model, optimizer state, caches, the step's transients, and ~0.3 GB of Python + torch), and
``*_step_mb`` is the peak minus the resident set just before the first step (what the steps add).
On CUDA, ``*_peak_mb`` is ``torch.cuda.max_memory_allocated`` in the timing process.

GPU: ``--device cuda --dtype bf16`` (autocast; losses and KL in fp32) or ``--dtype fp32``;
``--extrapolate-steps 40000`` adds the wall time of a full run at that step time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_embd=64, n_head=4, n_inner=256, vocab_size=512, n_positions=256),
    "bundled": dict(n_layer=4, n_embd=128, n_head=4, n_inner=512, vocab_size=4096, n_positions=512),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, n_inner=3072, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, n_inner=4096, vocab_size=50257, n_positions=1024),
}
# Other families: shape -> (transformers config class, its arguments). Pythia-160m as
# published; "llama-gqa" a Llama-style model of about GPT-2-small's cost (RMSNorm, rotary,
# grouped-query attention 12 query / 4 key-value heads, gated MLP).
FAMILY_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "pythia-160m": (
        "GPTNeoXConfig",
        dict(
            num_hidden_layers=12,
            hidden_size=768,
            num_attention_heads=12,
            intermediate_size=3072,
            vocab_size=50304,
            max_position_embeddings=2048,
            rotary_pct=0.25,
            use_parallel_residual=True,
        ),
    ),
    "llama-gqa": (
        "LlamaConfig",
        dict(
            num_hidden_layers=12,
            hidden_size=768,
            num_attention_heads=12,
            num_key_value_heads=4,
            intermediate_size=2048,
            vocab_size=32000,
            max_position_embeddings=2048,
        ),
    ),
}
# Per-shape default batches (the speed target's yardstick for GPT-2 shapes; the bundled recipe for bundled).
DEFAULT_BATCH = {
    "tiny": dict(kg_batch=16, kg_len=10, lm_batch=2, lm_len=64),
    "bundled": dict(kg_batch=30, control_batch=64, kg_len=10, lm_batch=4, lm_len=128),
    "gpt2-small": dict(kg_batch=32, kg_len=12, lm_batch=2, lm_len=256),
    "gpt2-medium": dict(kg_batch=32, kg_len=12, lm_batch=2, lm_len=256),
    "pythia-160m": dict(kg_batch=32, kg_len=12, lm_batch=2, lm_len=256),
    "llama-gqa": dict(kg_batch=32, kg_len=12, lm_batch=2, lm_len=256),
}

# kcs variants: name -> (objective, FastObjective switches). The cumulative chain adds one
# optimization at a time to the all-off fast path; "fast-no-X" leaves one out of the default.
_OFF = dict(prefix_cache=False, p_cache=False, scored_only=False, scored_last_block=False, fused_noise=False, chunked_kl=False)
_CHAIN = ["prefix_cache", "p_cache", "scored_only", "scored_last_block", "fused_noise", "chunked_kl"]


def variants() -> dict[str, tuple[str, dict[str, Any]]]:
    out: dict[str, tuple[str, dict[str, Any]]] = {"reference": ("reference", {}), "fast": ("fast", {})}
    out["fast-all-off"] = ("fast", dict(_OFF))
    on: dict[str, Any] = dict(_OFF)
    for i, name in enumerate(_CHAIN):
        on = {**on, name: True}
        out["+" + "+".join(_CHAIN[: i + 1])] = ("fast", dict(on))
    for name in _CHAIN:
        out[f"fast-no-{name}"] = ("fast", {name: False})
    out["fast+lm-cache"] = ("fast", {"lm_cache_mb": 4096.0})
    out["fast+share-sample"] = ("fast", {"share_sample": True})
    return out


ABLATION_SETS = {
    "cumulative": ["reference", "fast-all-off"] + ["+" + "+".join(_CHAIN[: i + 1]) for i in range(len(_CHAIN))],
    "leave-one-out": ["fast"] + [f"fast-no-{n}" for n in _CHAIN],
}


# ------------------------------------------------------------------------------------------
# Models and data
# ------------------------------------------------------------------------------------------
def _tokenizer():
    """A small in-memory tokenizer saved to disk (TransformerLens re-loads tokenizers by path)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, GPT2TokenizerFast

    d = tempfile.mkdtemp(prefix="kcs-bench-tok-")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["a car is a vehicle; a house is a building"] * 20,
        vocab_size=270,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tok.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def hf_model(shape: str, seed: int = 0):
    """A GPT2LMHeadModel of the shape (random init; the bundled model's weights when built)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if shape == "bundled":
        from kcs_lens.model.loading import BUNDLED_DIR

        if (BUNDLED_DIR / "config.json").exists():
            return GPT2LMHeadModel.from_pretrained(str(BUNDLED_DIR)).eval(), "bundled weights"
    torch.manual_seed(seed)
    if shape in FAMILY_SHAPES:
        import transformers

        cls, kw = FAMILY_SHAPES[shape]
        return transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw)).eval(), "random init"
    cfg = GPT2Config(**SHAPES[shape], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval(), "random init"


def make_batches(shape: str, a: argparse.Namespace, seed: int = 1):
    """Random-token TargetKG / ControlKG batches (one tail token, the last) and ControlLM blocks."""
    from kcs_lens.data.triplets import TripletBatch

    V = hf_vocab(shape)
    g = torch.Generator().manual_seed(seed)

    def kg(n: int) -> TripletBatch:
        toks = torch.randint(0, V, (n, a.kg_len), generator=g)
        targets = torch.zeros_like(toks)
        targets[:, :-1] = toks[:, 1:]
        sm = torch.zeros_like(toks, dtype=torch.bool)
        sm[:, a.kg_len - 2] = True  # the logits at the last prefix token predict the tail
        return TripletBatch(toks, targets, sm, torch.full((n,), a.kg_len, dtype=torch.long))

    target, control = kg(a.kg_batch), kg(a.control_batch)
    blocks = torch.randint(0, V, (a.lm_batch, a.lm_len), generator=g)
    return target, control, blocks


def hf_vocab(shape: str) -> int:
    if shape == "bundled":
        from kcs_lens.model.loading import BUNDLED_DIR

        if (BUNDLED_DIR / "config.json").exists():
            return json.loads((BUNDLED_DIR / "config.json").read_text())["vocab_size"]
    if shape in FAMILY_SHAPES:
        return int(FAMILY_SHAPES[shape][1]["vocab_size"])
    return SHAPES[shape]["vocab_size"]


# ------------------------------------------------------------------------------------------
# The two steps
# ------------------------------------------------------------------------------------------
class Dense:
    def __init__(self, model, device, autocast_dtype):
        self.model = model.to(device)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-5)
        self.ac = autocast_dtype
        self.device = device

    def step(self, target, control, blocks) -> None:
        import torch.nn.functional as F

        self.opt.zero_grad(set_to_none=True)
        for toks in (target.tokens, control.tokens, blocks):
            with _autocast(self.device, self.ac):
                logits = self.model(toks).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), toks[:, 1:].flatten())
            loss.backward()
        self.opt.step()


class Kcs:
    def __init__(self, lm, impl: str, switches: dict[str, Any], layers, device, autocast_dtype, seed: int = 84):
        from kcs_lens.masks.mask import WeightMask
        from kcs_lens.masks.mask_config import MaskConfig
        from kcs_lens.objective.fast import FastObjective
        from kcs_lens.objective.reference import LossConfig, Objective, ReferenceObjective

        self.lm = lm
        self.masks = WeightMask(lm.shape, MaskConfig(tuple(layers)), seed=seed, device=device)
        if impl == "reference":
            self.obj: Objective = ReferenceObjective(lm, self.masks, LossConfig())
            self.ac = autocast_dtype
        else:
            sw = dict(switches)
            if autocast_dtype is not None:
                sw["autocast"] = {torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype]
            self.obj = FastObjective(lm, self.masks, LossConfig(), **sw)
            self.ac = None
        self.opt = torch.optim.Adam(self.masks.parameters(), lr=0.2)
        self.device = device
        self.n = 0

    def step(self, target, control, blocks) -> dict[str, float]:
        self.masks.attach(self.lm)
        try:
            self.opt.zero_grad(set_to_none=True)
            with _autocast(self.device, self.ac):
                out = self.obj.step(target, control, blocks, self.n, 40_000)
            self.opt.step()
        finally:
            self.masks.detach()
        self.n += 1
        return out


def _autocast(device, dtype):
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _proc_status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc/self/status, in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------
def build(a: argparse.Namespace, need_dense: bool, need_kcs: bool):
    from kcs_lens.masks.mask_config import resolve_layers
    from kcs_lens.model.loading import from_hf

    ac = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    base, weights = hf_model(a.shape)
    dense = lm = None
    if need_dense:
        import copy

        dense = Dense(copy.deepcopy(base) if need_kcs else base, a.device, ac)
    if need_kcs:
        lm = from_hf(base, _tokenizer(), backend=a.backend, spec=a.shape, device=a.device)
    layers = resolve_layers(a.layers, base.config.num_hidden_layers)
    data = tuple(x.to(a.device) for x in make_batches(a.shape, a))
    return dense, lm, layers, data, ac, weights


def memory_child(a: argparse.Namespace) -> None:
    """Subprocess: build one method, run warmup + 1 steps, print peak RSS numbers as JSON."""
    which = a._memory_child
    dense, lm, layers, (t, c, b), ac, _ = build(a, need_dense=which == "dense", need_kcs=which != "dense")
    if which == "dense":
        fn = lambda: dense.step(t, c, b)
    else:
        impl, sw = variants()[which]
        k = Kcs(lm, impl, sw, layers, a.device, ac)
        fn = lambda: k.step(t, c, b)
    before = _proc_status_mb("VmRSS")
    for _ in range(max(a.warmup, 0) + 1):
        fn()
    peak = _proc_status_mb("VmHWM")  # this process's peak RSS (ru_maxrss can carry the parent's over exec)
    print(json.dumps({"peak_mb": round(peak, 1), "step_mb": round(peak - before, 1)}))


def measure_memory_subprocess(a: argparse.Namespace, which: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--_memory-child", which] + a._argv
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"peak_mb": float("nan"), "step_mb": float("nan"), "error": r.stderr.strip().splitlines()[-1:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(a: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """One JSON row per kcs variant. Variants are measured one after the other (each holds its own
    mask logits, Adam state and buffers); within a variant, dense and kcs steps alternate."""
    torch.set_num_threads(a.threads)
    table = variants()
    names = a.impl
    cuda = torch.device(a.device).type == "cuda"
    mem: dict[str, dict[str, float]] = {}
    if a.memory and not cuda:  # before this process holds anything large
        for n in ["dense", *names]:
            mem[n] = measure_memory_subprocess(a, n)
            if a.verbose:
                print(f"# memory {n}: {mem[n]}", file=sys.stderr, flush=True)
    dense, lm, layers, (t, c, b), ac, weights = build(a, need_dense=True, need_kcs=True)
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    dense_flops = None
    for n in names:
        k = Kcs(lm, *table[n], layers, a.device, ac)
        steps = {"dense": lambda: dense.step(t, c, b), n: lambda k=k: k.step(t, c, b)}
        times: dict[str, list[float]] = {"dense": [], n: []}
        cpu: dict[str, list[float]] = {"dense": [], n: []}
        first: dict[str, float] = {}
        peaks: dict[str, float] = {}
        for r in range(a.warmup + a.repeats if a.repeats > 0 else 0):
            for m, fn in steps.items():
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                dt, dc = _timed(fn, a.device)
                if cuda:
                    peaks[m] = max(peaks.get(m, 0.0), torch.cuda.max_memory_allocated() / 2**20)
                first.setdefault(m, dt)
                if r >= a.warmup:
                    times[m].append(dt)
                    cpu[m].append(dc)
                if a.verbose:
                    print(f"# round {r} {m}: {dt:.3f} s wall, {dc:.3f} s cpu", file=sys.stderr, flush=True)
        flops: dict[str, float] = {}
        if a.flops:
            from torch.utils.flop_counter import FlopCounterMode

            for m, fn in steps.items():
                if m == "dense" and dense_flops is not None:
                    flops[m] = dense_flops
                    continue
                if m not in first:  # not timed: warm up first (the fast path fills its per-run caches)
                    fn()
                fc = FlopCounterMode(display=False)
                with fc:
                    fn()
                flops[m] = fc.get_total_flops() / 1e9
                if a.verbose:
                    print(f"# flops {m}: {flops[m]:.3f} GFLOP", file=sys.stderr, flush=True)
            dense_flops = flops["dense"]
        if cuda:
            mem = {m: {"peak_mb": round(v, 1)} for m, v in peaks.items()}
        kcs_s, dense_s = med(times[n]), med(times["dense"])
        row = {
            "shape": a.shape,
            "weights": weights,
            "backend": lm.backend,
            "impl": n,
            "batch": {"target": [a.kg_batch, a.kg_len], "control": [a.control_batch, a.kg_len], "lm": [a.lm_batch, a.lm_len]},
            "masked_layers": [min(layers), max(layers)],
            "kcs_s": round(kcs_s, 4),
            "dense_s": round(dense_s, 4),
            "ratio": round(kcs_s / dense_s, 3),
            # per-round ratios (kcs and dense measured back to back) are less exposed to load drifts
            "ratio_paired": round(med([x / y for x, y in zip(times[n], times["dense"])]), 3),
            "ratio_cpu": round(med(cpu[n]) / med(cpu["dense"]), 3),
            "kcs_cpu_s": round(med(cpu[n]), 3),
            "dense_cpu_s": round(med(cpu["dense"]), 3),
            "kcs_peak_mb": mem.get(n, {}).get("peak_mb"),
            "dense_peak_mb": mem.get("dense", {}).get("peak_mb"),
            "kcs_step_mb": mem.get(n, {}).get("step_mb"),
            "dense_step_mb": mem.get("dense", {}).get("step_mb"),
            "kcs_first_s": round(first[n], 3) if n in first else None,
            "kcs_gflop": round(flops[n], 3) if flops else None,
            "dense_gflop": round(flops["dense"], 3) if flops else None,
            "ratio_gflop": round(flops[n] / flops["dense"], 3) if flops else None,
            "kcs_times": [round(x, 3) for x in times[n]],
            "dense_times": [round(x, 3) for x in times["dense"]],
            "switches": table[n][1] if table[n][0] == "fast" else None,
            "cache_mb": {key: round(v, 1) for key, v in k.obj.cache_mb().items()} or None,
            "device": a.device,
            "dtype": a.dtype,
            "threads": a.threads,
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
        }
        if a.extrapolate_steps:
            row["extrapolated_h"] = {"steps": a.extrapolate_steps, "kcs": round(kcs_s * a.extrapolate_steps / 3600, 2)}
        del k, steps
        yield row


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=[*SHAPES, *FAMILY_SHAPES], default="gpt2-small")
    p.add_argument("--kg-batch", type=int, help="TargetKG rows (default: per shape)")
    p.add_argument("--control-batch", type=int, help="ControlKG rows (default: --kg-batch)")
    p.add_argument("--kg-len", type=int, help="tokens per KG row")
    p.add_argument("--lm-batch", type=int, help="ControlLM blocks")
    p.add_argument("--lm-len", type=int, help="tokens per ControlLM block")
    p.add_argument("--layers", default="top-half", help="masked blocks (default: top half)")
    p.add_argument("--backend", choices=["bridge", "hooked"], default=None, help="TL backend (default: the installed one)")
    p.add_argument(
        "--impl",
        default="reference,fast",
        help="comma list of kcs variants, 'cumulative', 'leave-one-out', or 'list' to print them",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (0: no timing, e.g. with --flops)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    p.add_argument(
        "--flops",
        action="store_true",
        help="also count matmul FLOPs of one step of each (torch.utils.flop_counter; load-independent)",
    )
    p.add_argument("--extrapolate-steps", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--_memory-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.impl == "list":
        for n, (impl, sw) in variants().items():
            print(f"{n:45s} {impl:9s} {json.dumps(sw)}")
        sys.exit(0)
    for k, v in DEFAULT_BATCH[a.shape].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.control_batch is None:
        a.control_batch = a.kg_batch
    names: list[str] = []
    for x in a.impl.split(","):
        for y in ABLATION_SETS.get(x, [x] if x else []):
            if y not in names:
                names.append(y)
    a.impl = names
    unknown = [x for x in a.impl if x not in variants()]
    if unknown:
        p.error(f"unknown --impl {unknown}; see --impl list")
    a._argv = [x for x in argv if not x.startswith("--_memory-child")]
    return a


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a._memory_child:
        torch.set_num_threads(a.threads)
        memory_child(a)
        return
    for row in run(a):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
