"""A cheaper discovery step with the same losses and gradients as :class:`~kcs_lens.objective.reference.Objective`.

``FastObjective(lm, masks, config, options, **switches)`` has the interface of ``Objective`` (``.step(target,
control, blocks, step, total_steps) -> dict``) and computes the same method: three masked passes
per step (TargetKG: suppression and every other enabled TargetKG term read ONE pass; KL(p || q) on
ControlKG; KL(p || q) on ControlLM), each with its own fresh mask sample drawn from
``masks.generator`` in the reference's order, plus the sparsity term. Every optimization is a switch (see :class:`FastSwitches`); with all switches off the step
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
- ``share_sample`` (:class:`~kcs_lens.objective.reference.ObjectiveOptions`, taken by every objective; CHANGES THE
  METHOD, not the paper's default): one mask sample per step shared by the three passes.
- ``autocast``: ``"bf16"`` runs the model passes under bf16 autocast (losses and KL in fp32); for
  CUDA (it works on CPU, slower than fp32 there). Changes the losses by bf16 rounding.

The fast path runs the transformer blocks itself (``blocks[L:]``, ``ln_final``, the unembedding
weights), so hooks a user adds to the model do not see the masked passes; the masks still apply
through their parametrizations, and ``masks.generator`` is the only source of randomness.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Literal

import torch
from jaxtyping import Int
from torch import Tensor
from torch.autograd.profiler import record_function
from torch.nn.utils import parametrize

from kcs_lens.data.triplets import TripletBatch
from kcs_lens.evaluation.scoring import per_triplet_mean
from kcs_lens.masks.mask import WeightMask, gumbel_sigmoid_ste
from kcs_lens.model.lens import LensModel
from kcs_lens.objective.fast_ops import FusedNoise, RowCache, chunked_unembed_kl, final_and_lens_at, final_at, row_keys
from kcs_lens.objective.reference import (
    LossConfig,
    Objective,
    ObjectiveOptions,
    kl_p_to_q,
    scored,
    target_losses_from_logits,
)


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
    autocast: Literal["bf16", "fp16"] | None = None

    @classmethod
    def none(cls, **kw: Any) -> "FastSwitches":
        """Every optimization off (the reference's computation through the fast code path)."""
        off = dict(
            prefix_cache=False, p_cache=False, scored_only=False, scored_last_block=False, fused_noise=False, chunked_kl=False
        )
        return cls(**{**off, **kw})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SWITCH_NAMES = tuple(f.name for f in fields(FastSwitches))


# ------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------
class FastObjective(Objective):
    """Same losses and mask gradients as :class:`~kcs_lens.objective.reference.ReferenceObjective`, cheaper."""

    def __init__(
        self,
        lm: LensModel,
        masks: WeightMask,
        config: LossConfig,
        options: ObjectiveOptions = ObjectiveOptions(),
        **switches: Any,
    ):
        bad = set(switches) - set(SWITCH_NAMES)
        if bad:
            raise TypeError(f"unknown FastObjective switches {sorted(bad)}; expected some of {', '.join(SWITCH_NAMES)}")
        super().__init__(lm, masks, config, options)
        self.sw = FastSwitches(**switches)
        self.layer = min(masks.config.layers)
        self._noise: FusedNoise | None = None
        self.kg_cache = RowCache(self.sw.prefix_cache_mb)  # prefix residuals of KG rows (rows x len x d)
        self.p_cache = RowCache(self.sw.p_cache_mb)
        self.lm_cache = RowCache(self.sw.lm_cache_mb)
        if self.sw.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast {self.sw.autocast!r}: expected None, 'bf16' or 'fp16'")
        # CPU autocast works too (bf16) but is slower than fp32 there: the CLI offers it for CUDA only
        self._ac_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[self.sw.autocast]
        # The last-block shortcut holds for GPT-2 blocks only; elsewhere it turns itself off
        # (``effective_switches`` says so in the run's config).
        self._select_last = self.sw.scored_only and self.sw.scored_last_block and lm.plain_attention
        self._shared: dict[str, Tensor] | None = None  # the step's sample, with share_sample

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
        if self._noise is not None:  # fused_noise
            return self._noise.sample()
        return {n: gumbel_sigmoid_ste(l, self.masks.config.tau, "remaining", self.masks.generator) for n, l in self.masks.items()}

    # --- pieces ----------------------------------------------------------------------------
    def _prefix(self, tokens: Tensor) -> Tensor:
        with self.masks.using("off"), self._autocast():
            return self.lm.resid_pre(tokens, self.layer)

    @torch.no_grad()
    def _original_final(self, x: Tensor) -> Tensor:
        with self.masks.using("off"), self._autocast():
            return self.lm.run_blocks(x, self.layer)

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
        keys = row_keys(b)
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
            lp_rows: list[Tensor | None] = list(torch.split(lpm, counts)) if lpm is not None else [None] * len(missing)
            for j, i in enumerate(missing):
                e = {"x": xm[j, : last[i]].clone()}
                lp = lp_rows[j]
                if lp is not None:
                    e["logp"] = lp.clone()
                fresh[i] = e
                if sw.prefix_cache and self.kg_cache.get(keys[i]) is None:
                    self.kg_cache.put(keys[i], {"x": e["x"]})
                if "logp" in e and sw.p_cache and self.p_cache.get(keys[i]) is None:
                    self.p_cache.put(keys[i], {"logp": e["logp"]})
        rows_x: list[Tensor | None] = []
        rows_lp: list[Tensor | None] = []
        for i, k in enumerate(keys):
            hit = self.kg_cache.get(k) if sw.prefix_cache else None
            rows_x.append(hit["x"] if hit is not None else fresh[i]["x"] if i in fresh else None)
            if need_p:
                hp = self.p_cache.get(k) if sw.p_cache else None
                rows_lp.append(hp["logp"] if hp is not None else fresh[i].get("logp") if i in fresh else None)
        cached_x = [r for r in rows_x if r is not None]
        if len(cached_x) < len(rows_x):  # prefix not cached: compute it for the whole batch
            x = self._prefix(b.tokens[:, :n])
        else:
            x = cached_x[0].new_zeros((len(keys), n, cached_x[0].shape[-1]))
            for i, r in enumerate(cached_x):
                x[i, : r.shape[0]] = r
        logp = None
        if need_p:
            cached_lp = [r for r in rows_lp if r is not None]
            logp = torch.cat(cached_lp) if len(cached_lp) == len(rows_lp) else self._original_logp(x, sm[:, :n])
        return x, sm[:, :n], logp

    @torch.no_grad()
    def _original_logp(self, x: Tensor, sm: Tensor) -> Tensor:
        with self.masks.using("off"), self._autocast():
            if self.sw.scored_only:
                logits = self.lm.unembed(self.lm.final_norm(final_at(self.lm, x, self.layer, sm, self._select_last)))
            else:  # the reference's computation: logits at every position, then the scored ones
                logits = self.lm.unembed(self.lm.final_norm(self.lm.run_blocks(x, self.layer)))[sm]
        return torch.log_softmax(logits.float(), dim=-1)

    def _masked_kg_kl(self, x: Tensor, sm: Tensor, kind: str, logp: Tensor | None) -> Tensor:
        """Per-scored-position KL of the remaining model (one fresh sample)."""
        sw = self.sw
        sample = self._current_sample()
        with self._with_sample(sample), self._autocast():
            if sw.scored_only:
                hn = self.lm.final_norm(final_at(self.lm, x, self.layer, sm, self._select_last))
                if sw.chunked_kl:
                    return chunked_unembed_kl(
                        hn, *self.lm.unembed_params(), kind, logp, sw.kl_chunk, self._ac_dtype, self.lm.logit_softcap
                    )
                logits = self.lm.unembed(hn)
            else:
                logits = self.lm.unembed(self.lm.final_norm(self.lm.run_blocks(x, self.layer)))[sm]
        assert logp is not None
        return kl_p_to_q(logp, logits)

    def _current_sample(self) -> dict[str, Tensor]:
        if self._shared is not None:
            return self._shared
        s = self._draw()
        if self.share_sample:
            self._shared = s
        return s

    # --- the terms ---------------------------------------------------------------------------
    def target_losses(self, target: TripletBatch, step: int = 0) -> dict[str, Tensor]:
        """One masked TargetKG pass (one sample) for every enabled TargetKG term: KL(U || q) alone
        goes through the chunked unembedding; with other terms the scored logits (and the lens
        layers' logits) are formed once and every term reads them."""
        c, sw = self.config, self.sw
        terms = c.target_terms()
        b = scored(target, c.tail_position)
        x, sm, _ = self._kg_inputs(b, need_p=False)
        with self._with_sample(self._current_sample()), self._autocast():
            if sw.scored_only:
                h, lens_h = final_and_lens_at(self.lm, x, self.layer, sm, self._select_last, self.lens_layers)
            else:  # the reference's computation: every position, then the scored ones
                h, lens_h = final_and_lens_at(self.lm, x, self.layer, torch.ones_like(sm), False, self.lens_layers)
                h = h.view(*sm.shape, -1)[sm]
                lens_h = {l: v.view(*sm.shape, -1)[sm] for l, v in lens_h.items()}
            hn = self.lm.final_norm(h)
            if list(terms) == ["suppression"] and sw.scored_only and sw.chunked_kl:
                kl = chunked_unembed_kl(
                    hn, *self.lm.unembed_params(), "uniform", None, sw.kl_chunk, self._ac_dtype, self.lm.logit_softcap
                )
                return {"suppression": per_triplet_mean(kl, b).mean()}
            logits = self.lm.unembed(hn)
            lens = {l: self.lm.unembed(self.lm.final_norm(v)) for l, v in lens_h.items()}
        d = self.distractors.draw(b, step) if self.distractors is not None and "distractor" in terms else None
        return target_losses_from_logits(c, b, logits, lens, d)

    def control_kg(self, control: TripletBatch) -> Tensor:
        b = scored(control, self.config.tail_position)
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
                    hpn = self.lm.final_norm(self._original_final(x))  # original's normalized final residual
            if key is not None:
                self.lm_cache.put(key, {"x": x, "hpn": hpn})
        if not sw.prefix_cache and hit is None:
            x = self._prefix(blocks)  # the reference computes the frozen prefix again for q
        sample = self._current_sample()
        with self._with_sample(sample), self._autocast():
            hn = self.lm.final_norm(self.lm.run_blocks(x, self.layer))
            if sw.chunked_kl:
                kl = chunked_unembed_kl(
                    hn.flatten(0, 1),
                    *self.lm.unembed_params(),
                    "hidden",
                    hpn.flatten(0, 1),
                    sw.kl_chunk,
                    self._ac_dtype,
                    self.lm.logit_softcap,
                )
                return kl.mean()
            logits = self.lm.unembed(hn)
        with torch.no_grad():
            logp = torch.log_softmax(self.lm.unembed(hpn).float(), dim=-1)
        return kl_p_to_q(logp.flatten(0, 1), logits.flatten(0, 1)).mean()

    # --- one step (the loop is Objective.step) ---------------------------------------------
    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        if not self.masks.attached:
            raise RuntimeError("FastObjective.step: the masks are not attached to the model; call masks.attach(lm) first")
        if self.sw.fused_noise:
            if self._noise is None:
                self._noise = FusedNoise(self.masks)
            with record_function("kcs.noise.prepare"):
                self._noise.prepare()
        self._shared = None
        try:
            yield
        finally:
            self._shared = None

    def density(self) -> Tensor:
        if self.sw.fused_noise and self._noise is not None and self.masks.plain_density:  # head: weighted density
            return self._noise.density()
        return self.masks.expected_density()

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
            b = scored(b, self.config.tail_position)
            for s in range(0, len(b), chunk):
                self._kg_inputs(b.select(torch.arange(s, min(len(b), s + chunk))), need_p=need_p)

    def effective_switches(self) -> dict[str, Any]:
        """The switches as they act on this model: ``scored_last_block`` is off where the model's
        blocks are not GPT-2's (rotary positions, parallel blocks, GQA, RMSNorm), with the reason."""
        out = self.sw.to_dict()
        if self.sw.scored_last_block and not self._select_last:
            out["scored_last_block"] = False
            out["scored_last_block_off_because"] = (
                f"{self.lm.model_type} blocks are not plain GPT-2 blocks" if not self.lm.plain_attention else "scored_only is off"
            )
        return out

    def cache_mb(self) -> dict[str, float]:
        return {"kg_prefix": self.kg_cache.mb, "p": self.p_cache.mb, "lm": self.lm_cache.mb}
