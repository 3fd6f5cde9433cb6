"""A cheaper discovery step with the same losses and gradients as :class:`~kcs_lens.objective.Objective`.

``FastObjective(lm, masks, config, **switches)`` has the interface of ``Objective`` (``.step(target,
control, blocks, step, total_steps) -> dict``) and computes the same method: three masked passes
per step (suppression on TargetKG, KL(p || q) on ControlKG, KL(p || q) on ControlLM), each with its
own fresh mask sample drawn from ``masks.generator`` in the reference's order, plus the sparsity
term. Every optimization is a switch (see :class:`FastSwitches`); with all switches off the step
does what the reference does, through the same code paths as the fast one. docs/performance.md
has the measurements.

What the switches change (none changes the method):

- ``prefix_cache``: the blocks below the lowest masked block are frozen and shared by the original
  and the remaining model. Their output (``blocks.{L}.hook_resid_pre``) is computed once without
  gradients and the masked passes start from it. For the TargetKG and ControlKG rows, which are
  fixed for the whole run, it is cached per row (keyed by the row's tokens and scored positions)
  the first time the row is seen; for ControlLM it is computed once per step and shared by the
  original and the masked pass.
- ``p_cache``: the original model's distributions on ControlKG rows at the scored positions,
  cached per row for the run (``p_cache_mb`` bounds the memory; rows beyond it are recomputed).
- ``scored_only``: KG passes run only up to the last scored position of the batch (causal: later
  positions cannot change earlier ones) and apply ``ln_final`` and the unembedding only at the
  scored positions.
- ``fused_noise``: the noise for all matrices is drawn into one persistent flat buffer by a single
  ``uniform_`` call (on CPU the very numbers the reference draws matrix by matrix), the hard mask
  of the remaining model is one comparison against a per-step threshold
  (``1[(1 - sigmoid(l + logit(u))) > 0.5]`` = ``1[u < sigmoid(-l)]``; the clamp of u is folded
  into the threshold), and the straight-through gradient ``-s (1 - s) / tau`` is computed in
  the backward pass only. Thresholds agree with the reference's except where ``l + logit(u)`` is
  within float rounding of 0 (a handful of the 42 M weights of GPT-2 small per sample);
  ``fused_noise=False`` reproduces the reference's masks bit for bit.
- ``chunked_kl``: the unembedding and both KL terms are one autograd function over row chunks of
  ``kl_chunk`` rows: full-vocabulary logits and log-softmaxes exist only one chunk at a time, and
  the gradient with respect to the final residual (``(q - p) W_U^T``) is formed in the same
  pass. p for ControlLM is computed inside the same chunks from the original's final residual.
- ``lm_cache_mb`` (opt-in, default 0): cache, per ControlLM block, the frozen prefix residual and
  the original's normalized final residual, up to this many MB. ControlLM blocks cycle, so in a
  long run most steps hit the cache; WikiText-2 at 512 tokens needs about 6 KB per token (fp32).
- ``share_sample`` (opt-in; CHANGES THE METHOD, not the paper's default): one mask sample per
  step shared by the three passes (also switched on by ``masks.hold_sample``).
- ``autocast``: ``"bf16"`` runs the model passes under bf16 autocast (losses and KL in fp32); for
  CUDA (it works on CPU, slower than fp32 there). Changes the losses by bf16 rounding.

The fast path runs the transformer blocks itself (``blocks[L:]``, ``ln_final``, the unembedding
weights), so hooks a user adds to the model do not see the masked passes; the masks still apply
through their parametrizations, and ``masks.generator`` is the only source of randomness.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torch.autograd.profiler import record_function
from torch.nn.utils import parametrize

from kcs_lens.data.triplets import TripletBatch
from kcs_lens.masks import WeightMask, hard_concrete_sample
from kcs_lens.models import LensModel
from kcs_lens.objective import LossConfig, _scored, kl_p_to_q, kl_uniform_to_q, sparsity_and_total
from kcs_lens.scoring import per_triplet_mean

U_LO, U_HI = 1e-6, 1.0 - 1e-6  # the reference's clamp of the uniform noise


@dataclass(frozen=True)
class FastSwitches:
    """Optimizations of :class:`FastObjective`; each can be switched off on its own."""

    prefix_cache: bool = True
    p_cache: bool = True
    scored_only: bool = True
    scored_last_block: bool = True
    fused_noise: bool = True
    chunked_kl: bool = True
    kl_chunk: int = 1024
    prefix_cache_mb: float = 4096.0
    p_cache_mb: float = 4096.0
    lm_cache_mb: float = 0.0
    share_sample: bool = False
    autocast: Literal["bf16", "fp16"] | None = None

    @classmethod
    def none(cls, **kw: Any) -> "FastSwitches":
        """Every optimization off (the reference's computation through the fast code path)."""
        off = dict(prefix_cache=False, p_cache=False, scored_only=False, scored_last_block=False, fused_noise=False,
                   chunked_kl=False)
        return cls(**{**off, **kw})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SWITCH_NAMES = tuple(f.name for f in fields(FastSwitches))


# ------------------------------------------------------------------------------------------
# Backend access: the frozen prefix, the masked blocks, the final norm and the unembedding
# ------------------------------------------------------------------------------------------
class _Parts:
    """The pieces of a LensModel the fast path runs itself (identical on both TL backends)."""

    def __init__(self, lm: LensModel):
        self.lm = lm
        self.model = lm.model
        m = self.model
        if lm.backend == "bridge":
            lin = m.unembed.original_component
            self.W_vd = lin.weight  # [vocab, d_model] (tied to wte in GPT-2)
            self.b_v = getattr(lin, "bias", None)
        else:
            self.W_vd = m.unembed.W_U.T
            self.b_v = m.unembed.b_U

    @torch.no_grad()
    def prefix(self, tokens: Int[Tensor, "b s"], layer: int) -> Float[Tensor, "b s d"]:
        """``blocks.{layer}.hook_resid_pre``; the caller makes sure no mask is sampled meanwhile."""
        return self.model(tokens, stop_at_layer=layer)

    def top(self, x: Float[Tensor, "b s d"], layer: int, stop: int | None = None) -> Float[Tensor, "b s d"]:
        """Run ``blocks[layer:stop]`` from the residual stream entering ``blocks[layer]``."""
        for blk in self.model.blocks[layer:stop]:
            out = blk(x)
            x = out[0] if isinstance(out, tuple) else out
        return x

    @property
    def can_select_last(self) -> bool:
        """The last block can be computed at selected query positions only (plain GPT-2 blocks)."""
        c = self.model.cfg
        hf = dict(self.lm.source.get("hf_config") or {})
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            return False
        if getattr(c, "scale_attn_by_inverse_layer_idx", False):
            return False
        if self.lm.backend == "hooked":
            return (
                getattr(c, "positional_embedding_type", "standard") == "standard"
                and getattr(c, "normalization_type", "LN") == "LN"
                and not getattr(c, "parallel_attn_mlp", False)
                and not getattr(c, "use_split_qkv_input", False)
                and not getattr(c, "use_attn_in", False)
                and getattr(c, "n_key_value_heads", None) is None
                and getattr(c, "use_attn_scale", True)
                and abs(getattr(c, "attn_scale", math.sqrt(c.d_head)) - math.sqrt(c.d_head)) < 1e-9
            )
        return True

    def _proj(self, blk, t: Tensor, which: str) -> Tensor:
        """Per-head queries, keys or values [..., h, d_head] of one block."""
        a = blk.attn
        if self.lm.backend == "hooked":
            return torch.einsum("...m,hmd->...hd", t, getattr(a, f"W_{which}")) + getattr(a, f"b_{which}")
        return getattr(a, which.lower())(t).unflatten(-1, (self.model.cfg.n_heads, -1))

    def _attn_out(self, blk, z: Tensor) -> Tensor:
        a = blk.attn
        if self.lm.backend == "hooked":
            return torch.einsum("...hd,hdm->...m", z, a.W_O) + a.b_O
        return a.o(z.flatten(-2))

    def last_block_at(self, x: Float[Tensor, "b s d"], sm: Tensor) -> Float[Tensor, "n d"]:
        """The last block's output at the positions ``sm`` only (row-major): keys and values at
        every position, queries, attention output and MLP at the selected ones."""
        blk = self.model.blocks[len(self.model.blocks) - 1]
        bi, pi = sm.nonzero(as_tuple=True)
        n = x.shape[1]
        t = blk.ln1(x)
        q = self._proj(blk, t[bi, pi], "Q")  # [S, h, dh]
        k = self._proj(blk, t, "K")[bi]  # [S, n, h, dh]
        v = self._proj(blk, t, "V")[bi]
        scores = torch.einsum("shd,sjhd->shj", q, k) / math.sqrt(q.shape[-1])
        future = torch.arange(n, device=x.device)[None, :] > pi[:, None]  # [S, n]
        scores = scores.masked_fill(future[:, None, :], float("-inf"))
        z = torch.einsum("shj,sjhd->shd", scores.softmax(-1), v)
        mid = x[bi, pi] + self._attn_out(blk, z)
        return mid + blk.mlp(blk.ln2(mid[None]))[0]

    def top_at(self, x: Float[Tensor, "b s d"], layer: int, sm: Tensor, select_last: bool) -> Float[Tensor, "n d"]:
        """Final residual at the positions ``sm`` (row-major) from the residual entering ``layer``."""
        if not select_last:
            return self.top(x, layer)[sm]
        last = len(self.model.blocks) - 1
        return self.last_block_at(self.top(x, layer, last), sm)

    def norm(self, x: Tensor) -> Tensor:
        return self.model.ln_final(x)

    def unembed(self, xn: Tensor) -> Tensor:
        """Logits through the model's own unembedding module (the reference's computation)."""
        if xn.dim() == 2:
            return self.model.unembed(xn[None])[0]
        return self.model.unembed(xn)

    def logits_w(self, xn: Tensor) -> Tensor:
        """Logits straight from the unembedding weights (used inside the chunked KL)."""
        return F.linear(xn, self.W_vd, self.b_v)


# ------------------------------------------------------------------------------------------
# Unembedding + KL in row chunks, with the gradient formed in the forward pass
# ------------------------------------------------------------------------------------------
class _ChunkedUnembedKL(torch.autograd.Function):
    """Per-row KL terms from the normalized final residual ``h`` [n, d].

    ``kind``: ``"uniform"`` -> KL(U || q); ``"logp"`` -> KL(p || q) with ``target`` = log p [n, V];
    ``"hidden"`` -> KL(p || q) with p = softmax(unembed(``target``)), ``target`` [n, d] the
    original's normalized final residual. Only ``h`` receives a gradient: dKL_i/dz_i = q_i - p_i
    (p = 1/V for the uniform term), so dKL_i/dh_i = (q_i - p_i) W_U^T, kept per row.
    """

    @staticmethod
    def forward(ctx, h, W_vd, b_v, kind: str, target, chunk: int, autocast_dtype):  # type: ignore[override]
        n = h.shape[0]
        kl = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if ctx.needs_input_grad[0] else None
        V = W_vd.shape[0]
        ac = (
            torch.autocast(h.device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.no_grad():
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                with ac:
                    z = F.linear(h[s:e], W_vd, b_v)
                logq = torch.log_softmax(z.float(), dim=-1)
                del z
                if kind == "uniform":
                    kl[s:e] = -math.log(V) - logq.mean(-1)
                    gz = logq.exp_()
                    gz.sub_(1.0 / V)
                else:
                    if kind == "logp":
                        logp = target[s:e]
                    else:
                        with ac:
                            zp = F.linear(target[s:e], W_vd, b_v)
                        logp = torch.log_softmax(zp.float(), dim=-1)
                        del zp
                    p = logp.exp()
                    kl[s:e] = (p * (logp - logq)).sum(-1)
                    del logp
                    gz = logq.exp_()
                    gz.sub_(p)
                    del p
                if grad_h is not None:
                    with ac:
                        grad_h[s:e] = gz @ W_vd
                del gz, logq
        ctx.save_for_backward(grad_h)
        return kl

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (grad_h,) = ctx.saved_tensors
        return (g[:, None].to(grad_h.dtype) * grad_h, None, None, None, None, None, None)


def chunked_unembed_kl(
    h: Tensor, W_vd: Tensor, b_v: Tensor | None, kind: str, target: Tensor | None, chunk: int, autocast_dtype=None
) -> Float[Tensor, "n"]:
    return _ChunkedUnembedKL.apply(h, W_vd, b_v, kind, target, chunk, autocast_dtype)


# ------------------------------------------------------------------------------------------
# Fused mask sampling
# ------------------------------------------------------------------------------------------
def _ste_grad_log(l: Tensor, u: Tensor, g: Tensor, tau: float) -> Tensor:
    """-g s (1 - s) / tau, s = sigmoid((l + logit(u)) / tau) (u already clamped), on two buffers."""
    x = torch.neg(u)
    x.log1p_()
    t = torch.log(u)
    t.sub_(x)
    t.add_(l)
    if tau != 1.0:
        t.div_(tau)
    t.sigmoid_()  # s
    torch.sub(t, 1.0, out=x)  # s - 1
    x.mul_(t)  # -s (1 - s)
    x.mul_(g)
    if tau != 1.0:
        x.div_(tau)
    return x


def _ste_grad_exp(E: Tensor, u: Tensor, g: Tensor) -> Tensor:
    """The same for tau = 1 without a transcendental per pass: with e = exp(-(l + logit(u)))
    = exp(-l) (1 - u) / u, s (1 - s) = e / (1 + e)^2; ``E`` = exp(-l), clamped, is per step."""
    x = torch.rsub(u, 1.0)
    x.div_(u)
    x.mul_(E)  # e
    t = x + 1.0
    t.mul_(t)
    x.div_(t)
    x.mul_(g)
    x.neg_()
    return x


class _RemainingSample(torch.autograd.Function):
    """Hard mask of the remaining model, 1[u < thr], with the reference's straight-through gradient
    (u clamped as in the reference, thr = sigmoid(-l), E = exp(-l) or None when tau != 1)."""

    @staticmethod
    def forward(ctx, l, u, thr, E, tau: float):  # type: ignore[override]
        ctx.save_for_backward(l, u, E)
        ctx.tau = tau
        out = torch.empty_like(l)
        torch.lt(u, thr, out=out)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        l, u, E = ctx.saved_tensors
        grad = _ste_grad_exp(E, u, g) if E is not None else _ste_grad_log(l, u, g, ctx.tau)
        return grad, None, None, None, None


class _Sparsity(torch.autograd.Function):
    """mean(sigmoid(l)) over all logit tensors from the per-step buffer thr = sigmoid(-l) = 1 - sigmoid(l)."""

    @staticmethod
    def forward(ctx, thr_views, n, *ls):  # type: ignore[override]
        rest = torch.zeros((), dtype=torch.float64, device=ls[0].device)
        for t in thr_views:
            rest += t.sum(dtype=torch.float64)
        ctx.save_for_backward(*thr_views)
        ctx.n = n
        return ((n - rest) / n).to(ls[0].dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        out = []
        for t in ctx.saved_tensors:
            d = torch.sub(t, 1.0)
            d.mul_(t)  # -s (1 - s)
            d.mul_(-g / ctx.n)
            out.append(d)
        return (None, None, *out)


class _Noise:
    """Flat buffers over every masked matrix: the uniform noise u, and per step (the logits do not
    change within a step) thr = sigmoid(-l) and E = exp(-l) (clamped; only for tau = 1)."""

    E_MAX = 1e30  # e = E (1 - u) / u <= 1e36: (1 + e)^2 overflows to inf and the factor to 0, never NaN

    def __init__(self, masks: WeightMask):
        self.masks = masks
        self.tau = masks.config.tau
        items = list(masks.items())
        self.n = sum(p.numel() for _, p in items)
        dev, dt = items[0][1].device, items[0][1].dtype
        self.u = torch.empty(self.n, dtype=dt, device=dev)
        self.thr = torch.empty_like(self.u)
        self.E = torch.empty_like(self.u) if self.tau == 1.0 else None
        self.offsets: list[tuple[int, int]] = []
        o = 0
        for _, p in items:
            self.offsets.append((o, p.numel()))
            o += p.numel()

    def _view(self, buf: Tensor | None, i: int, like: Tensor) -> Tensor | None:
        if buf is None:
            return None
        o, k = self.offsets[i]
        return buf[o : o + k].view(like.shape)

    @torch.no_grad()
    def prepare(self) -> None:
        for i, (_, l) in enumerate(self.masks.items()):
            t = self._view(self.thr, i, l)
            torch.neg(l, out=t)
            if self.E is not None:
                torch.exp(t, out=self._view(self.E, i, l)).clamp_(max=self.E_MAX)
            t.sigmoid_()

    def sample(self) -> dict[str, Tensor]:
        self.u.uniform_(generator=self.masks.generator)
        self.u.clamp_(U_LO, U_HI)
        out = {}
        for i, (n, l) in enumerate(self.masks.items()):
            v = lambda buf: self._view(buf, i, l)
            out[n] = _RemainingSample.apply(l, v(self.u), v(self.thr), v(self.E), self.tau)
        return out

    def density(self) -> Tensor:
        ls = [p for _, p in self.masks.items()]
        return _Sparsity.apply([self._view(self.thr, i, l) for i, l in enumerate(ls)], self.n, *ls)


# ------------------------------------------------------------------------------------------
# Per-row caches (keyed by content, so the caller needs to tell nothing)
# ------------------------------------------------------------------------------------------
class _RowCache:
    def __init__(self, budget_mb: float):
        self.budget = budget_mb * 2**20
        self.used = 0
        self.rows: dict[bytes, dict[str, Tensor]] = {}

    def get(self, key: bytes) -> dict[str, Tensor] | None:
        return self.rows.get(key)

    def put(self, key: bytes, entry: dict[str, Tensor]) -> bool:
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if self.used + size > self.budget:
            return False
        self.rows[key] = entry
        self.used += size
        return True

    @property
    def mb(self) -> float:
        return self.used / 2**20


def _row_keys(b: TripletBatch) -> list[bytes]:
    toks = b.tokens.cpu()
    sm = b.score_mask.cpu()
    out = []
    for i in range(toks.shape[0]):
        n = int(b.lengths[i])
        out.append(toks[i, :n].numpy().tobytes() + b"|" + sm[i].nonzero().flatten().numpy().tobytes())
    return out


# ------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------
class FastObjective:
    """Same losses and mask gradients as :class:`~kcs_lens.objective.Objective`, computed cheaper."""

    def __init__(self, lm: LensModel, masks: WeightMask, config: LossConfig, **switches: Any):
        bad = set(switches) - set(SWITCH_NAMES)
        if bad:
            raise TypeError(f"unknown FastObjective switches {sorted(bad)}; expected some of {', '.join(SWITCH_NAMES)}")
        self.lm = lm
        self.masks = masks
        self.config = config
        self.sw = FastSwitches(**switches)
        self.parts = _Parts(lm)
        self.layer = min(masks.config.layers)
        self._noise: _Noise | None = None
        self.kg_cache = _RowCache(self.sw.prefix_cache_mb)  # prefix residuals of KG rows (rows x len x d)
        self.p_cache = _RowCache(self.sw.p_cache_mb)
        self.lm_cache = _RowCache(self.sw.lm_cache_mb)
        if self.sw.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast {self.sw.autocast!r}: expected None, 'bf16' or 'fp16'")
        # CPU autocast works too (bf16) but is slower than fp32 there: the CLI offers it for CUDA only
        self._ac_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[self.sw.autocast]
        self._select_last = self.sw.scored_only and self.sw.scored_last_block and self.parts.can_select_last
        self._share = False
        self._shared: dict[str, Tensor] | None = None

    # --- model modes -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _with_sample(self, sample: dict[str, Tensor]) -> Iterator[None]:
        """The remaining model under ``sample``; each masked weight is formed once for the pass."""
        with self.masks.using_sample(sample, "remaining"), parametrize.cached():
            yield

    def _autocast(self):
        if self._ac_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.lm.device.type, dtype=self._ac_dtype)

    @record_function("kcs.noise.sample")
    def _draw(self) -> dict[str, Tensor]:
        """One fresh sample of every matrix, in the reference's draw order."""
        if self.sw.fused_noise:
            return self._noise.sample()
        return {n: hard_concrete_sample(l, self.masks.config.tau, "remaining", self.masks.generator) for n, l in self.masks.items()}

    # --- pieces ----------------------------------------------------------------------------
    def _prefix(self, tokens: Tensor) -> Tensor:
        with self.masks.using("off"), self._autocast():
            return self.parts.prefix(tokens, self.layer)

    @torch.no_grad()
    def _original_final(self, x: Tensor) -> Tensor:
        with self.masks.using("off"), self._autocast():
            return self.parts.top(x, self.layer)

    def _kg_inputs(self, b: TripletBatch, need_p: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """Residual entering block L for the batch [B, n, d], the (trimmed) score mask, and log p
        at the scored positions (row-major) when ``need_p``."""
        sw = self.sw
        sm = b.score_mask
        n = int(sm.nonzero()[:, 1].max()) + 1 if sw.scored_only else b.tokens.shape[1]
        if not (sw.prefix_cache or (need_p and sw.p_cache)):
            # as the reference: the original pass and the masked pass each compute the prefix
            logp = self._original_logp(self._prefix(b.tokens[:, :n]), sm[:, :n]) if need_p else None
            return self._prefix(b.tokens[:, :n]), sm[:, :n], logp
        keys = _row_keys(b)
        last = [int(r.nonzero().max()) + 1 for r in sm]
        missing = [
            i
            for i, k in enumerate(keys)
            if (sw.prefix_cache and self.kg_cache.get(k) is None) or (need_p and sw.p_cache and self.p_cache.get(k) is None)
        ]
        fresh: dict[int, dict[str, Tensor]] = {}
        if missing:
            idx = torch.tensor(missing, device=b.tokens.device)
            m_n = max(last[i] for i in missing)
            xm = self._prefix(b.tokens[idx, :m_n])
            smm = sm[idx, :m_n]
            lpm = self._original_logp(xm, smm) if need_p and sw.p_cache else None
            counts = smm.sum(1).tolist()
            lp_rows = list(torch.split(lpm, counts)) if lpm is not None else [None] * len(missing)
            for j, i in enumerate(missing):
                e = {"x": xm[j, : last[i]].clone()}
                if lp_rows[j] is not None:
                    e["logp"] = lp_rows[j].clone()
                fresh[i] = e
                if sw.prefix_cache and self.kg_cache.get(keys[i]) is None:
                    self.kg_cache.put(keys[i], {"x": e["x"]})
                if "logp" in e and sw.p_cache and self.p_cache.get(keys[i]) is None:
                    self.p_cache.put(keys[i], {"logp": e["logp"]})
        rows_x, rows_lp = [], []
        for i, k in enumerate(keys):
            hit = self.kg_cache.get(k) if sw.prefix_cache else None
            rows_x.append(hit["x"] if hit is not None else fresh[i]["x"] if i in fresh else None)
            if need_p:
                hp = self.p_cache.get(k) if sw.p_cache else None
                rows_lp.append(hp["logp"] if hp is not None else fresh[i].get("logp") if i in fresh else None)
        if any(r is None for r in rows_x):  # prefix not cached: compute it for the whole batch
            x = self._prefix(b.tokens[:, :n])
        else:
            x = rows_x[0].new_zeros((len(keys), n, rows_x[0].shape[-1]))
            for i, r in enumerate(rows_x):
                x[i, : r.shape[0]] = r
        logp = None
        if need_p:
            if any(r is None for r in rows_lp):
                logp = self._original_logp(x, sm[:, :n])
            else:
                logp = torch.cat(rows_lp)
        return x, sm[:, :n], logp

    @torch.no_grad()
    def _original_logp(self, x: Tensor, sm: Tensor) -> Tensor:
        with self.masks.using("off"), self._autocast():
            if self.sw.scored_only:
                logits = self.parts.unembed(self.parts.norm(self.parts.top_at(x, self.layer, sm, self._select_last)))
            else:  # the reference's computation: logits at every position, then the scored ones
                logits = self.parts.unembed(self.parts.norm(self.parts.top(x, self.layer)))[sm]
        return torch.log_softmax(logits.float(), dim=-1)

    def _masked_kg_kl(self, x: Tensor, sm: Tensor, kind: str, logp: Tensor | None) -> Tensor:
        """Per-scored-position KL of the remaining model (one fresh sample)."""
        sw = self.sw
        sample = self._current_sample()
        with self._with_sample(sample), self._autocast():
            if sw.scored_only:
                hn = self.parts.norm(self.parts.top_at(x, self.layer, sm, self._select_last))
                if sw.chunked_kl:
                    return chunked_unembed_kl(hn, self.parts.W_vd, self.parts.b_v, kind, logp, sw.kl_chunk, self._ac_dtype)
                logits = self.parts.unembed(hn)
            else:
                logits = self.parts.unembed(self.parts.norm(self.parts.top(x, self.layer)))[sm]
        return kl_uniform_to_q(logits) if kind == "uniform" else kl_p_to_q(logp, logits)

    def _current_sample(self) -> dict[str, Tensor]:
        if self._shared is not None:
            return self._shared
        s = self._draw()
        if self._share:
            self._shared = s
        return s

    # --- the three terms -------------------------------------------------------------------
    def suppression(self, target: TripletBatch) -> Tensor:
        b = _scored(target, self.config.tail_position)
        x, sm, _ = self._kg_inputs(b, need_p=False)
        return per_triplet_mean(self._masked_kg_kl(x, sm, "uniform", None), b).mean()

    def control_kg(self, control: TripletBatch) -> Tensor:
        b = _scored(control, self.config.tail_position)
        x, sm, logp = self._kg_inputs(b, need_p=True)
        return per_triplet_mean(self._masked_kg_kl(x, sm, "logp", logp), b).mean()

    def control_lm(self, blocks: Int[Tensor, "n seq"]) -> Tensor:
        sw = self.sw
        key = blocks.cpu().numpy().tobytes() if sw.lm_cache_mb > 0 else None
        hit = self.lm_cache.get(key) if key is not None else None
        if hit is not None:
            x, hpn = hit["x"], hit["hpn"]
        else:
            with record_function("kcs.control_lm.original"):
                x = self._prefix(blocks)
                with torch.no_grad():
                    hpn = self.parts.norm(self._original_final(x))  # original's normalized final residual
            if key is not None:
                self.lm_cache.put(key, {"x": x, "hpn": hpn})
        if not sw.prefix_cache and hit is None:
            x = self._prefix(blocks)  # the reference computes the frozen prefix again for q
        sample = self._current_sample()
        with self._with_sample(sample), self._autocast():
            hn = self.parts.norm(self.parts.top(x, self.layer))
            if sw.chunked_kl:
                kl = chunked_unembed_kl(
                    hn.flatten(0, 1), self.parts.W_vd, self.parts.b_v, "hidden", hpn.flatten(0, 1), sw.kl_chunk, self._ac_dtype
                )
                return kl.mean()
            logits = self.parts.unembed(hn)
        with torch.no_grad():
            logp = torch.log_softmax(self.parts.unembed(hpn).float(), dim=-1)
        return kl_p_to_q(logp.flatten(0, 1), logits.flatten(0, 1)).mean()

    # --- one step --------------------------------------------------------------------------
    def step(
        self, target: TripletBatch, control: TripletBatch, blocks: Int[Tensor, "n seq"], step: int, total_steps: int
    ) -> dict[str, float]:
        """Forward and backward of every enabled term; gradients accumulate in the mask logits
        (the caller steps the optimizer). Returns what :meth:`Objective.step` returns."""
        c, sw = self.config, self.sw
        if not self.masks.attached:
            raise RuntimeError("FastObjective.step: the masks are not attached to the model; call masks.attach(lm) first")
        if sw.fused_noise:
            if self._noise is None:
                self._noise = _Noise(self.masks)
            with record_function("kcs.noise.prepare"):
                self._noise.prepare()
        self._share = sw.share_sample or self.masks.hold_sample
        self._shared = None
        out: dict[str, float] = {}
        total = 0.0
        pending: list[Tensor] = []
        for term, w, fn in c.enabled_terms(
            suppression=lambda: self.suppression(target),
            control_kg=lambda: self.control_kg(control),
            control_lm=lambda: self.control_lm(blocks),
        ):
            with record_function(f"kcs.{term}.forward"):
                loss = fn()
            if self._share:
                pending.append(w * loss)  # one sample feeds all passes: one backward at the end
            else:
                with record_function(f"kcs.{term}.backward"):
                    (w * loss).backward()
            out[term] = float(loss.detach())
            total += w * out[term]
        if pending:
            torch.stack(pending).sum().backward()
        self._shared = None
        density = self._noise.density() if sw.fused_noise else self.masks.expected_density()
        return sparsity_and_total(c, density, step, total_steps, out, total)

    # --- bookkeeping -----------------------------------------------------------------------
    def prepare(self, target: TripletBatch | None = None, control: TripletBatch | None = None, chunk: int = 256) -> None:
        """Fill the per-run caches from whole triplet sets, in fixed chunks of rows.

        Optional (rows are otherwise cached the first time a batch holds them), but after it every
        cached value is independent of the order in which batches arrive, so a resumed run repeats
        the uninterrupted one bit for bit. ``control`` also fills the p cache.
        """
        for b, need_p in ((target, False), (control, True)):
            if b is None:
                continue
            b = _scored(b, self.config.tail_position)
            for s in range(0, len(b), chunk):
                self._kg_inputs(b.select(torch.arange(s, min(len(b), s + chunk))), need_p=need_p)

    def cache_mb(self) -> dict[str, float]:
        return {"kg_prefix": self.kg_cache.mb, "p": self.p_cache.mb, "lm": self.lm_cache.mb}
