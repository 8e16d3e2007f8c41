"""Distillation losses: pure functions over log-probabilities, and a chunked loss that never holds the
full `[tokens × vocab]` logits of student and teacher at once.

    PYTHONPATH=src python -c "import torch; from distill.losses import divergence; \
print(divergence(torch.randn(3, 10).log_softmax(-1), torch.randn(3, 10).log_softmax(-1), 'reverse_kl'))"

Notation: p is the teacher's distribution, q the student's, both over the same outcomes (the vocabulary,
or the teacher's top-k plus one tail bucket), at temperature T: p = softmax(z_t / T), q = softmax(z_s / T).
Every divergence is per token (a value for each row), in nats.

The training objective (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", eq. 2 and the
T² remark in §2) is, per completion token,

    L = (1 - α) · CE(y, softmax(z_s)) + α · T² · D(p ‖ q)

The T² keeps the soft term's gradient on the same scale as CE's when T changes. Positions for which
there is no teacher distribution take CE alone: e.g. a cached completion whose teacher ended with another
token than the student's EOS, or a backend that does not keep the end token's row.

Memory: `chunked_loss` takes the student's last hidden states and its output matrix instead of logits and
computes logits, loss and gradients a few hundred tokens at a time inside one autograd node (as Liger
Kernel's fused linear losses do, here in plain PyTorch so it runs on any device). At 2,048 tokens and a
152k vocabulary one float32 logits tensor is 1.2 GB; the dense path keeps several (student and teacher
logits, their log-softmaxes, the gradient), the chunked path only `chunk × vocab` of each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl")
_TAIL_FLOOR = 1e-6


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ a (log a − log b) over the last dim, with 0·log 0 = 0 (a may have zero entries).

    Trap (as in TRL's notes): `F.kl_div(input, target)` computes KL(target ‖ input) with `input` as
    log-probs; the argument order is the reverse of the math. We write the sum out instead."""
    a = log_a.exp()
    # Replace log a where a = 0 before multiplying: `where` after the product would still send NaN
    # gradients through 0 · (−inf).
    safe_log_a = torch.where(a > 0, log_a, torch.zeros_like(log_a))
    return (a * (safe_log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·a + (1−w)·b), computed in log space (stable where a or b underflow)."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def divergence(log_q: torch.Tensor, log_p: torch.Tensor, kind: str, beta: float = 0.5,
               skew: float = 0.1) -> torch.Tensor:
    """D(p ‖ q) per row, for student log-probs `log_q` and teacher log-probs `log_p` (same shape, (N, V)).

    - forward_kl: KL(p ‖ q) = Σ p log(p/q). Mode-covering; Hinton et al. 2015, the classic KD objective.
    - reverse_kl: KL(q ‖ p) = Σ q log(q/p). Mode-seeking; MiniLLM (Gu et al. 2024, "MiniLLM: Knowledge
      Distillation of Large Language Models", eq. 1).
    - jsd: generalized Jensen-Shannon, GKD (Agarwal et al. 2024, "On-Policy Distillation of Language
      Models: Learning from Self-Generated Mistakes", eq. 3 / §3):
          JSD(β)(p ‖ q) = β·KL(p ‖ m) + (1−β)·KL(q ‖ m),  m = β·p + (1−β)·q,  0 < β < 1
      (small β behaves like forward KL, large β like reverse KL, each scaled by β or 1−β).
    - skew_kl: skew forward KL, DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for
      Large Language Models", eq. 3): KL(p ‖ s·p + (1−s)·q), s = `skew`; bounded, smoother gradients.
    - skew_rkl: skew reverse KL, same paper, eq. 4: KL(q ‖ (1−s)·p + s·q).
    """
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if kind == "skew_kl":
        return _kl(log_p, _log_mix(log_p, log_q, skew))
    if kind == "skew_rkl":
        return _kl(log_q, _log_mix(log_q, log_p, skew))
    raise ValueError(f"unknown divergence '{kind}' (known: {', '.join(DIVERGENCES)})")


def topk_log_probs(logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs over k+1 outcomes: the teacher's top-k tokens plus one tail bucket.

    `logits` (N, V) are the student's; `ids` (N, k) and `logprobs` (N, k) the teacher's stored top-k at
    temperature 1. Returns (log_q, log_p), each (N, k+1), last column the tail.

    The teacher's tail mass is 1 − Σ top-k (floored at 1e-6; fp16 rounding can push the sum past 1, then the
    top-k are renormalized). The student's tail is the log-sum-exp of its logits outside the top-k ids.
    Bias, by construction: (1) all the tail's tokens are merged, so only the tail's total mass is matched,
    not its shape; a divergence between coarsened distributions is never larger than between the full
    ones (data-processing inequality), so the loss under-counts disagreement in the tail. (2) At T ≠ 1 the
    temperature is applied to the k+1 buckets, i.e. the tail is sharpened or flattened as if it were one
    token; the true tempered tail would be flatter (T > 1) or sharper (T < 1). With k = 20 and a peaked
    teacher the tail usually holds < 1% of the mass and both effects are small.
    """
    logits = logits.float()
    lp = logprobs.float()
    top_mass = lp.exp().sum(-1, keepdim=True)
    lp = torch.where(top_mass > 1, lp - top_mass.log(), lp)  # renormalize when rounding overshoots
    # log(1 − Σ p_topk), floored at 1e-6: a tail of exactly 0 would make reverse KL infinite.
    tail = torch.log((1 - lp.exp().sum(-1, keepdim=True)).clamp(min=_TAIL_FLOOR))
    log_p = torch.cat([lp, tail], dim=-1)
    in_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, ids.long(), True)
    s_tail = torch.logsumexp(logits.masked_fill(in_top, float("-inf")), -1, keepdim=True)
    s = torch.cat([logits.gather(-1, ids.long()), s_tail], dim=-1)
    if temperature != 1.0:
        log_p = log_p / temperature
        s = s / temperature
    return s.log_softmax(-1), log_p.log_softmax(-1)


@dataclass
class LossSpec:
    """What to compute per token: `alpha` weighs the soft term against CE; `kind`, `beta`, `skew` pick the
    divergence; `temperature` softens both distributions for the soft term only."""

    alpha: float = 0.0
    temperature: float = 1.0
    kind: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1


def token_losses(logits: torch.Tensor, labels: torch.Tensor, spec: LossSpec, teacher_logits=None,
                 topk_ids=None, topk_logprobs=None, has_teacher=None) -> torch.Tensor:
    """Per-token (1−α)·CE + α·T²·D(p ‖ q), shape (N,); `logits` (N, V) of the student, `labels` (N,).

    The teacher is dense `teacher_logits` (N, V), or sparse `topk_ids`/`topk_logprobs` (N, k), or absent
    (plain CE). `has_teacher` (N,) bool marks rows that have a teacher distribution; others take CE only.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    if spec.alpha == 0 or (teacher_logits is None and topk_ids is None):
        return ce
    t = spec.temperature
    if teacher_logits is not None:
        log_q = (logits / t).log_softmax(-1)
        log_p = (teacher_logits.float() / t).log_softmax(-1)
    else:
        log_q, log_p = topk_log_probs(logits, topk_ids, topk_logprobs, t)
    d = divergence(log_q, log_p, spec.kind, spec.beta, spec.skew)
    mixed = (1 - spec.alpha) * ce + spec.alpha * t * t * d
    return mixed if has_teacher is None else torch.where(has_teacher, mixed, ce)


@dataclass
class Teacher:
    """The teacher's side of `chunked_loss`, row-aligned with the student's hidden states.

    Dense: `hidden` (N, H_t) and `weight` (V, H_t) (its last hidden states and output matrix; logits are
    made a chunk at a time). Sparse: `topk_ids`, `topk_logprobs` (N, k). `has_teacher` (N,) bool, optional.
    """

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    has_teacher: torch.Tensor | None = None

    def chunk(self, a: int, b: int) -> dict:
        out = {"has_teacher": None if self.has_teacher is None else self.has_teacher[a:b]}
        if self.hidden is not None:
            with torch.no_grad():
                out["teacher_logits"] = self.hidden[a:b] @ self.weight.T  # (c, V), autocast applies
        elif self.topk_ids is not None:
            out["topk_ids"], out["topk_logprobs"] = self.topk_ids[a:b], self.topk_logprobs[a:b]
        return out


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, spec: LossSpec,
                 teacher: Teacher | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """Σ over tokens of `token_losses`, from the student's hidden states `hidden` (N, H) and output matrix
    `weight` (V, H): logits = hidden @ weightᵀ, made and dropped `chunk_tokens` rows at a time.

    Gradients for `hidden` and `weight` are computed chunk by chunk during the forward pass and kept
    (N×H and V×H, small next to N×V); backward only scales them. Written by hand because neither
    transformers nor TRL has a chunked KD loss (TRL's GKD materializes both full logits; its fused LM head
    does cross-entropy only; Liger Kernel's fused losses need Triton, i.e. a GPU), and on CPU this is also
    where the time goes.
    """
    chunk = chunk_tokens or max(16, (1 << 22) // weight.shape[0])  # ~4M logits (16 MB fp32) per chunk
    return _ChunkedLoss.apply(hidden, weight, labels, spec, teacher or Teacher(), chunk)


_SLAB = 4096  # output-matrix rows per gradient update: a (4096, H) temporary instead of a (V, H) one


class _ChunkedLoss(torch.autograd.Function):
    """Memory: besides the caller's tensors, the pass holds the fp32 gradients (N×H, V×H), one copy of the
    output matrix in the autocast dtype (none in fp32) and one chunk's (c, V) logits and their gradient.
    Letting autograd differentiate `h @ w.T` per chunk instead would make a fresh (V, H) gradient per chunk,
    in bf16 and again in fp32, and cast W to bf16 per chunk: 3-4 extra V×H buffers at the peak of the step."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, spec, teacher, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device = hidden.device.type
        # The matmuls run in autocast's dtype when it is on (bf16 on CPUs and GPUs that have it), as autograd
        # would run them; W is cast once here rather than once per chunk.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w = weight.detach().to(dtype)  # (V, H)
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for a in range(0, hidden.shape[0], chunk):
            b = min(a + chunk, hidden.shape[0])
            h = hidden[a:b].detach().to(dtype)  # (c, H)
            with torch.enable_grad():
                z = (h @ w.T).float().requires_grad_(need_h or need_w)  # (c, V) logits
                loss = token_losses(z, labels[a:b], spec, **teacher.chunk(a, b)).sum()
                if need_h or need_w:
                    (dz,) = torch.autograd.grad(loss, z)
            total += loss.detach()
            if not (need_h or need_w):
                continue
            dz = dz.to(dtype)  # (c, V) ∂loss/∂logits
            if need_h:
                grad_h[a:b] = dz @ w
            if need_w:
                for v in range(0, w.shape[0], _SLAB):
                    grad_w[v:v + _SLAB] += dz[:, v:v + _SLAB].T @ h  # (slab, H), accumulated in fp32
        # Kept on ctx, not save_for_backward: backward drops ctx's reference, so the returned V×H gradient has
        # no other owner and becomes the parameter's .grad as is instead of being copied into it.
        ctx.grads = (grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.grads
        del ctx.grads
        # In place: the (V, H) gradient is the largest buffer here; a scaled copy would double it.
        gh = None if grad_h is None else grad_h.mul_(grad_out).to(ctx.dtypes[0])
        gw = None if grad_w is None else grad_w.mul_(grad_out).to(ctx.dtypes[1])
        return gh, gw, None, None, None, None
