"""Samplers and logits processors against transformers' warpers and processors."""

import numpy as np
import pytest

from lmforge.sampling import DRAW_BLOCK, SamplingParams, draw, filter_logits, make_sampler, repetition_penalty


def hf_filtered(logits, temperature, top_k, top_p, min_p):
    import torch
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.tensor(logits[None], dtype=torch.float64)
    ids = torch.zeros((1, 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p > 0:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return scores[0].numpy()


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [(1.0, 40, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.3, 0, 1.0, 0.05), (0.8, 50, 0.95, 0.02), (1.0, 0, 0.5, 0.1)],
)
def test_filters_keep_the_same_tokens_as_transformers(temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = (rng.standard_normal(1000) * 3).astype(np.float32)
        ours = filter_logits(logits, temperature, top_k, top_p, min_p)
        ref = hf_filtered(logits, temperature, top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
        kept = np.isfinite(ref)
        np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-12)


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    logits = rng.standard_normal(500).astype(np.float32)
    history = rng.integers(0, 500, 30).tolist()
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), torch.tensor(logits[None]))[0].numpy()
    np.testing.assert_allclose(repetition_penalty(logits, history, 1.3), ref, rtol=1e-6)


def test_sampling_follows_the_distribution_and_the_seed():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    sampler = make_sampler(SamplingParams(temperature=1.0, seed=7))
    draws = np.bincount([sampler(logits) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    s1, s2 = (make_sampler(SamplingParams(temperature=0.9, top_p=0.9, seed=3)) for _ in range(2))
    assert [s1(logits) for _ in range(50)] == [s2(logits) for _ in range(50)]
    # filters that leave one token make any temperature greedy
    for kw in ({"top_k": 1}, {"top_p": 0.01}, {"min_p": 1.0}):
        assert all(make_sampler(SamplingParams(temperature=1.5, seed=s, **kw))(logits) == 0 for s in range(20))


def test_two_level_draw_is_the_inverse_cdf():
    """`draw` against numpy's one running sum over the weights: the same token for the same u,
    across block edges, sparse weights (filtered tokens) and u at both ends; never a zero weight."""
    rng = np.random.default_rng(4)
    sizes = [1, 7, DRAW_BLOCK - 1, DRAW_BLOCK, DRAW_BLOCK + 1, 3 * DRAW_BLOCK + 5, 49152]
    for n in sizes * 6:
        w = rng.random(n) ** 8 * (rng.random(n) < rng.choice([0.002, 0.3, 1.0]))
        w[rng.integers(n)] += 1e-3  # at least one token left
        cdf = np.cumsum(w)
        for u in [0.0, 1 - 2**-53, *rng.random(30)]:
            got = draw(w, u)
            assert w[got] > 0, (n, u, got)
            ref = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), n - 1)
            if w[ref] > 0:  # (the one running sum can land past the last token with weight)
                assert got == ref or abs(cdf[got] - cdf[ref]) <= 1e-12 * cdf[-1], (n, u, got, ref)
