"""The pieces :class:`~kcs_lens.objective.fast.FastObjective` is built from: the last block at
selected positions, the unembedding + KL in row chunks with the gradient formed in the forward
pass, the fused mask noise with its straight-through gradient, and per-row caches. Each has a
test against the straightforward computation (tests/test_fast_objective.py)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from kcs_lens.data.triplets import TripletBatch
from kcs_lens.masks.mask import WeightMask
from kcs_lens.model.lens import LensModel

U_LO, U_HI = 1e-6, 1.0 - 1e-6  # the reference's clamp of the uniform noise
CHUNK_BYTES = 64 * 2**20  # the largest [rows, vocabulary] float32 tensor of one chunk of the unembedding + KL


# ------------------------------------------------------------------------------------------
# The last block at the scored positions only (plain GPT-2 blocks)
# ------------------------------------------------------------------------------------------
def last_block_at(lm: LensModel, x: Float[Tensor, "b s d"], sm: Bool[Tensor, "b s"]) -> Float[Tensor, "n d"]:
    """The last block's output at the positions ``sm`` only (row-major): keys and values at every
    position, queries, attention output and MLP at the selected ones (``lm.plain_attention``)."""
    layer = lm.shape.n_layers - 1
    bi, pi = sm.nonzero(as_tuple=True)
    n = x.shape[1]
    t = lm.attn_input(layer, x)
    q: Float[Tensor, "S n_heads d_head"] = lm.project(layer, t[bi, pi], "Q")
    k: Float[Tensor, "S n n_heads d_head"] = lm.project(layer, t, "K")[bi]
    v = lm.project(layer, t, "V")[bi]
    scores = torch.einsum("shd,sjhd->shj", q, k) / math.sqrt(q.shape[-1])
    future: Bool[Tensor, "S n"] = torch.arange(n, device=x.device)[None, :] > pi[:, None]
    scores = scores.masked_fill(future[:, None, :], float("-inf"))
    z = torch.einsum("shj,sjhd->shd", scores.softmax(-1), v)
    mid = x[bi, pi] + lm.attn_output(layer, z)
    return mid + lm.mlp_output(layer, mid[None])[0]


def final_at(
    lm: LensModel, x: Float[Tensor, "b s d"], layer: int, sm: Bool[Tensor, "b s"], select_last: bool
) -> Float[Tensor, "n d"]:
    """Final residual at the positions ``sm`` (row-major) from the residual entering ``layer``."""
    if not select_last:
        return lm.run_blocks(x, layer)[sm]
    return last_block_at(lm, lm.run_blocks(x, layer, lm.shape.n_layers - 1), sm)


def final_and_lens_at(
    lm: LensModel, x: Float[Tensor, "b s d"], layer: int, sm: Bool[Tensor, "b s"], select_last: bool, lens_layers: tuple[int, ...]
) -> tuple[Float[Tensor, "n d"], dict[int, Float[Tensor, "n d"]]]:
    """:func:`final_at`, and the residual stream after each block of ``lens_layers`` (each below
    the last block) at the same positions, from the same pass."""
    if not lens_layers:
        return final_at(lm, x, layer, sm, select_last), {}
    last = lm.shape.n_layers - 1
    lens: dict[int, Tensor] = {}
    for l in range(layer, last):
        x = lm.run_blocks(x, l, l + 1)
        if l in lens_layers:
            lens[l] = x[sm]
    final = last_block_at(lm, x, sm) if select_last else lm.run_blocks(x, last)[sm]
    return final, lens


# ------------------------------------------------------------------------------------------
# Unembedding + KL in row chunks, with the gradient formed in the forward pass
# ------------------------------------------------------------------------------------------
class _ChunkedUnembedKL(torch.autograd.Function):
    """Per-row KL terms from the normalized final residual ``h`` [n, d].

    ``kind``: ``"uniform"`` -> KL(U || q); ``"logp"`` -> KL(p || q) with ``target`` = log p [n, V];
    ``"hidden"`` -> KL(p || q) with p = softmax(unembed(``target``)), ``target`` [n, d] the
    original's normalized final residual. Only ``h`` receives a gradient: dKL_i/dz_i = q_i - p_i
    (p = 1/V for the uniform term), so dKL_i/dh_i = (q_i - p_i) W_U^T, kept per row. With a logit
    soft-cap c (Gemma 2: z = c tanh(u / c), u = h W_U^T + b) the chain rule adds 1 - tanh(u / c)^2.

    Memory: at most three ``[rows, V]`` float32 tensors exist at a time (log q, log p or the
    difference, p), and a chunk holds at most ``CHUNK_BYTES`` per such tensor (fewer rows than
    ``chunk`` for large vocabularies: GPT-2's 50,257 tokens give 333 rows).
    """

    @staticmethod
    def forward(ctx, h, W_vd, b_v, kind: str, target, chunk: int, autocast_dtype, softcap=None):  # type: ignore[override]
        n = h.shape[0]
        kl = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if ctx.needs_input_grad[0] else None
        V = W_vd.shape[0]
        chunk = max(1, min(chunk, CHUNK_BYTES // (4 * V)))
        ac = torch.autocast(h.device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        with torch.no_grad():
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                with ac:
                    z = F.linear(h[s:e], W_vd, b_v)
                dcap = None
                if softcap is not None:
                    t = torch.tanh(z.float() / softcap)
                    z = t * softcap
                    dcap = 1.0 - t * t
                    del t
                logq = torch.log_softmax(z.float(), dim=-1)
                del z
                if kind == "uniform":
                    kl[s:e] = -math.log(V) - logq.mean(-1)
                    gz = logq.exp_()
                    gz.sub_(1.0 / V)
                else:
                    if kind == "logp":  # the caller's log p: not overwritten
                        p = target[s:e].exp()
                        d = torch.sub(target[s:e], logq)
                    else:
                        with ac:
                            zp = F.linear(target[s:e], W_vd, b_v)
                        if softcap is not None:
                            zp = torch.tanh(zp.float() / softcap) * softcap
                        d = torch.log_softmax(zp.float(), dim=-1)
                        del zp
                        p = d.exp()
                        d.sub_(logq)  # log p - log q, in place
                    kl[s:e] = d.mul_(p).sum(-1)  # the values of (p * (log p - log q)).sum(-1)
                    del d
                    gz = logq.exp_()
                    gz.sub_(p)
                    del p
                if dcap is not None:
                    gz.mul_(dcap)
                    del dcap
                if grad_h is not None:
                    with ac:
                        grad_h[s:e] = gz @ W_vd
                del gz, logq
        ctx.save_for_backward(grad_h)
        return kl

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (grad_h,) = ctx.saved_tensors
        return (g[:, None].to(grad_h.dtype) * grad_h, None, None, None, None, None, None, None)


def chunked_unembed_kl(
    h: Tensor,
    W_vd: Tensor,
    b_v: Tensor | None,
    kind: str,
    target: Tensor | None,
    chunk: int,
    autocast_dtype=None,
    softcap: float | None = None,
) -> Float[Tensor, " n"]:
    return _ChunkedUnembedKL.apply(h, W_vd, b_v, kind, target, chunk, autocast_dtype, softcap)


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


class FusedNoise:
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
            t = self.thr[self.offsets[i][0] : sum(self.offsets[i])].view(l.shape)
            torch.neg(l, out=t)
            E = self._view(self.E, i, l)
            if E is not None:
                torch.exp(t, out=E).clamp_(max=self.E_MAX)
            t.sigmoid_()

    def sample(self) -> dict[str, Tensor]:
        self.u.uniform_(generator=self.masks.generator)
        self.u.clamp_(U_LO, U_HI)
        out = {}
        for i, (n, l) in enumerate(self.masks.items()):
            v = lambda buf, i=i, l=l: self._view(buf, i, l)
            out[n] = _RemainingSample.apply(l, v(self.u), v(self.thr), v(self.E), self.tau)
        return out

    def density(self) -> Tensor:
        ls = [p for _, p in self.masks.items()]
        return _Sparsity.apply([self._view(self.thr, i, l) for i, l in enumerate(ls)], self.n, *ls)


# ------------------------------------------------------------------------------------------
# Per-row caches (keyed by content, so the caller needs to tell nothing)
# ------------------------------------------------------------------------------------------
class RowCache:
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


def row_keys(b: TripletBatch) -> list[bytes]:
    toks = b.tokens.cpu()
    sm = b.score_mask.cpu()
    out = []
    for i in range(toks.shape[0]):
        n = int(b.lengths[i])
        out.append(toks[i, :n].numpy().tobytes() + b"|" + sm[i].nonzero().flatten().numpy().tobytes())
    return out
