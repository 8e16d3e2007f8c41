"""Each loss against a naive float64 reference written from the papers' formulas: values and gradients.

    PYTHONPATH=src python -m pytest -q tests/test_losses.py
"""

import pytest
import torch

from distill.losses import DIVERGENCES, LossSpec, Teacher, chunked_loss, divergence, token_losses


def _ref_divergence(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float, skew: float) -> torch.Tensor:
    """The formulas with probabilities, not log-probs, in float64 (no log-space tricks to share bugs with)."""
    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_kl":
        return kl(p, skew * p + (1 - skew) * q)
    return kl(q, (1 - skew) * p + skew * q)  # skew_rkl


def _ref_losses(hidden, weight, labels, alpha, t, kind, beta, skew, t_logits=None, topk=None):
    """Per-token (1−α)CE + αT²D in float64, from hidden states and the output matrix."""
    logits = hidden @ weight.T
    ce = -logits.log_softmax(-1).gather(-1, labels[:, None])[:, 0]
    if t_logits is not None:
        q = torch.softmax(logits / t, -1)
        p = torch.softmax(t_logits / t, -1)
    else:  # buckets: the top-k tokens plus everything else, then tempered as k+1 outcomes
        ids, lp = topk
        q1 = torch.softmax(logits, -1)
        q_top = q1.gather(-1, ids)
        q_b = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
        p_top = lp.exp()
        p_b = torch.cat([p_top, (1 - p_top.sum(-1, keepdim=True)).clamp(min=1e-6)], -1)
        p_b = p_b / p_b.sum(-1, keepdim=True)
        q, p = q_b ** (1 / t), p_b ** (1 / t)
        q, p = q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True)
    return (1 - alpha) * ce + alpha * t * t * _ref_divergence(p, q, kind, beta, skew)


def _problem(n=37, h=8, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.7
    labels = torch.randint(0, v, (n,), generator=g)
    t_hidden = torch.randn(n, 6, generator=g, dtype=torch.float64)
    t_weight = torch.randn(v, 6, generator=g, dtype=torch.float64)
    return hidden, weight, labels, t_hidden, t_weight


def _grads(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    value = fn(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_chunked_dense_teacher_matches_float64_reference(kind, t):
    hidden, weight, labels, th, tw = _problem()
    spec = LossSpec(alpha=0.7, temperature=t, kind=kind, beta=0.3, skew=0.2)
    teacher = Teacher(hidden=th.float(), weight=tw.float())

    def ours(h, w):
        return chunked_loss(h, w, labels, spec, teacher, chunk_tokens=8)

    def ref(h, w):
        return _ref_losses(h, w, labels, 0.7, t, kind, 0.3, 0.2, t_logits=th @ tw.T).sum()

    value, (gh, gw) = _grads(ours, hidden.float(), weight.float())
    ref_value, (rh, rw) = _grads(ref, hidden, weight)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("t", [1.0, 0.5])
def test_topk_teacher_with_tail_bucket_matches_reference(kind, t):
    hidden, weight, labels, th, tw = _problem(seed=1)
    t_logp = (th @ tw.T).log_softmax(-1)
    lp, ids = t_logp.topk(5, dim=-1)
    spec = LossSpec(alpha=0.5, temperature=t, kind=kind, beta=0.6, skew=0.1)
    teacher = Teacher(topk_ids=ids.int(), topk_logprobs=lp.half())

    value, (gh, gw) = _grads(lambda h, w: chunked_loss(h, w, labels, spec, teacher, chunk_tokens=5),
                             hidden.float(), weight.float())
    ref_value, (rh, rw) = _grads(lambda h, w: _ref_losses(h, w, labels, 0.5, t, kind, 0.6, 0.1,
                                                          topk=(ids, lp.half().double())).sum(), hidden, weight)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-4)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-3, atol=1e-5)


def test_sft_loss_is_cross_entropy_and_chunking_changes_nothing():
    hidden, weight, labels, _, _ = _problem(n=50)
    dense = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum")
    for chunk in (1, 7, 50, 1000):
        got = chunked_loss(hidden.float(), weight.float(), labels, LossSpec(), chunk_tokens=chunk)
        assert got.item() == pytest.approx(dense.item(), rel=1e-5)


def test_rows_without_teacher_take_cross_entropy_only():
    hidden, weight, labels, th, tw = _problem(n=6)
    has = torch.tensor([True, False, True, False, False, True])
    spec = LossSpec(alpha=1.0, kind="reverse_kl")
    per_token = token_losses(hidden @ weight.T, labels, spec, teacher_logits=th @ tw.T, has_teacher=has)
    ce = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="none").float()
    torch.testing.assert_close(per_token[~has], ce[~has])
    assert not torch.allclose(per_token[has], ce[has])


def test_divergences_vanish_when_the_distributions_agree_and_grow_when_not():
    logp = torch.randn(4, 30, dtype=torch.float64).log_softmax(-1)
    other = torch.randn(4, 30, dtype=torch.float64).log_softmax(-1)
    for kind in DIVERGENCES:
        assert divergence(logp, logp, kind).abs().max() < 1e-12
        assert (divergence(logp, other, kind) > 0).all()
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(logp, logp, "kl")


def test_frozen_output_matrix_gets_no_gradient():
    """LoRA freezes lm_head: the loss still returns the hidden states' gradient and skips the matrix's."""
    hidden, weight, labels, _, _ = _problem()
    h = hidden.float().requires_grad_()
    chunked_loss(h, weight.float(), labels, LossSpec(), chunk_tokens=4).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
