"""The logit lens (kcs_lens.evaluation.lens): at the last block it is the model's own output, on
both backends; the shares count layers as documented; evaluate reports it for the removed facts."""

from __future__ import annotations

import pytest
import torch

from kcs_lens.data.triplets import Triplet, tokenize_triplets
from kcs_lens.evaluation.lens import lens_metrics, lens_ranks
from kcs_lens.evaluation.scoring import tail_scores
from kcs_lens.model.loading import available_backends


@pytest.mark.parametrize("backend", available_backends())
def test_last_layer_is_the_final_output(make_tiny_lm, backend):
    lm = make_tiny_lm(backend=backend)
    ts = [Triplet(h, "IsA", t, f"A {h} is a {t}") for h, t in (("car", "vehicle"), ("cat", "animal"), ("tree", "plant"))]
    batch = tokenize_triplets(ts * 3, lm.tokenizer, d_vocab=lm.shape.d_vocab)
    ranks = lens_ranks(lm, batch, batch_size=4)  # several batches
    assert ranks.shape == (lm.shape.n_layers, 9)
    assert torch.equal(ranks[-1], tail_scores(lm, batch).first_rank)
    assert not all(torch.equal(ranks[l], ranks[-1]) for l in range(lm.shape.n_layers - 1))  # the layers differ
    # an intermediate layer through TransformerLens' own cache, final norm and unembedding
    _, cache = lm.model.run_with_cache(batch.tokens)
    pos = batch.score_mask.int().argmax(1)
    x = cache["blocks.1.hook_resid_post"][torch.arange(9), pos]
    z = lm.unembed(lm.final_norm(x))
    tail = batch.targets[torch.arange(9), pos]
    assert torch.equal(ranks[1], (z > z.gather(-1, tail[:, None])).sum(-1))


def test_lens_shares():
    ranks = torch.tensor([[0, 50, 12, 3], [20, 9, 11, 30], [40, 40, 40, 40]])  # 3 layers x 4 triplets
    m = lens_metrics(ranks)
    assert m["lens_top10_any"] == 0.75 and m["lens_top1_any"] == 0.25
    assert [m[f"lens_top10_l{l}"] for l in range(3)] == [0.5, 0.25, 0.0]
