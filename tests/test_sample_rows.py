"""The llama.cpp teacher's batched sampler: the distribution it draws from, top-p's cut and top-k logprobs,
checked against a plain float64 reference (no model needed)."""

import numpy as np
import pytest

from distill.teachers.llamacpp import sample_rows, topk_rows


def _reference(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """softmax(logits / T) cut to the smallest most-likely set whose mass reaches top_p, renormalised."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    keep = order[: int(np.searchsorted(cum, top_p, side="left")) + 1]
    q = np.zeros_like(p)
    q[keep] = p[keep]
    return q / q.sum()


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("vocab", [7, 1300])  # 1300: several 512-token blocks, the last one partial
def test_draws_follow_the_tempered_nucleus_distribution(vocab, top_p):
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((3, vocab)) * np.array([[0.5], [2.0], [6.0]])).astype(np.float32)
    draws, chunk = 20000, 2000
    counts = np.zeros((3, vocab))
    # each step of `chunk` sequences with these logits draws one token per sequence, one uniform each
    batch = np.repeat(logits, chunk, axis=0)
    rows = np.repeat(np.arange(3), chunk)
    for _ in range(draws // chunk):
        np.add.at(counts, (rows, sample_rows(batch, 0.8, top_p, rng.random(3 * chunk))), 1)
    for r in range(3):
        ref = _reference(logits[r].astype(np.float64), 0.8, top_p)
        assert np.all(counts[r][ref == 0] == 0)  # nothing outside the nucleus
        # every token's count within 5 standard deviations of the reference's (+3 for the rarest)
        expected = draws * ref
        assert np.all(np.abs(counts[r] - expected) <= 5 * np.sqrt(expected * (1 - ref)) + 3)

def test_same_uniforms_same_tokens_and_greedy_is_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 300)).astype(np.float32)
    u = rng.random(4)
    assert (sample_rows(logits, 0.7, 0.9, u) == sample_rows(logits.copy(), 0.7, 0.9, u)).all()
    assert (sample_rows(logits, 0.0, 1.0, u) == logits.argmax(axis=1)).all()
    # u near 1 never runs past the vocabulary or the nucleus
    assert (sample_rows(logits, 1.0, 1.0, np.full(4, 1 - 1e-12)) < 300).all()


@pytest.mark.parametrize("vocab,k", [(2000, 8), (5000, 3), (49152, 20)])  # k above and below the block count
def test_top_k_logprobs_match_a_float64_log_softmax(vocab, k):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((5, vocab)) * 4).astype(np.float32)
    logits[1, -7:] += 30  # the best tokens in the last, partial block
    ids, logp = topk_rows(logits, k)
    assert ids.shape == logp.shape == (5, k) and ids.dtype == np.int32 and logp.dtype == np.float32
    x = logits.astype(np.float64)
    ref = x - (x.max(axis=1, keepdims=True) + np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1,
                                                                                                  keepdims=True)))
    for r in range(5):
        assert ids[r].tolist() == np.argsort(-ref[r], kind="stable")[:k].tolist()
        assert np.allclose(logp[r], ref[r, ids[r]], atol=1e-5)
