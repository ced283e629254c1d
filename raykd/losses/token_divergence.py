"""Per-token divergences between a teacher and a student over the vocabulary, computed a chunk of
sequence positions at a time: the math behind ``token_kd``, ``token_rkl`` and ``token_gkd``.

The teacher is either dense logits [B, L, V] or a per-token top-k cache
(:class:`raykd.teacher.token_topk.TokenTopK`). With the cache, both distributions are compared on
the same k + 1 buckets: the teacher's k ids and one tail bucket holding everything else. The
student's buckets at T are its softmax(s/T) on those ids and its tail mass, taken as
logsumexp over its non-top-k logits minus logsumexp over all (two logsumexps: no 1 − Σ
cancellation when the top-k holds nearly all the mass). The teacher's buckets come from
``teacher_log_probs`` (exact at T = 1; its tail rule for T ≠ 1 is documented there). Coarsening
can only lower a divergence (data processing), so the cached loss is ≤ the dense one; it is equal
when k == V, where the tail bucket is empty on both sides and the k buckets are the vocabulary.

Divergences per position, over the buckets (or the vocabulary), p = teacher, q = student at T:

- ``forward``  KL(p ‖ q) (Hinton's, DistilBERT's L_ce);
- ``reverse``  KL(q ‖ p) (MiniLLM, arXiv 2306.08543);
- ``gkd``      JSD_β(p, q) = β·KL(p ‖ m) + (1−β)·KL(q ‖ m), m = β·p + (1−β)·q (GKD, arXiv
  2306.13649). JSD_β ≈ β·KL(p ‖ q) as β → 0 and ≈ (1−β)·KL(q ‖ p) as β → 1, but the formula is
  identically 0 at β = 0 and β = 1 (m equals one side). As TRL's GKDTrainer does, β = 0 is
  therefore forward KL and β = 1 reverse KL, unscaled: the loss jumps at the endpoints (β = 1e-6
  gives about 1e-6·KL, β = 0 gives KL).

Each is T²-scaled and averaged over real tokens (mask true). Zero-probability buckets (an empty
tail, a -inf logit) contribute 0, not NaN: the logs inside the differences are floored (see
``bucket_divergence``), the weights in front of them are not. Where the teacher's probability is
exactly 0 but the student's is not (only -inf teacher logits do that: the encoder keeps any
finite tail finite), the reverse KL would be +inf; the teacher's log is floored at log of
float32's smallest normal (-87.3), so it is large but finite, with a finite gradient.

Memory: positions are processed ``chunk`` at a time along L, and only the real tokens of each
chunk (padding rows are never computed, so garbage there cannot produce NaN). The gradient of
each chunk is taken right away and written into one buffer the shape and dtype of the student
logits (with no padding and one chunk, the chunk's gradient is that buffer), which the backward
returns scaled. With the top-k cache the [n, V] part of that gradient is written by hand
(``bucket_divergence_and_grad``; autograd only over the k + 1 buckets); dense teachers use
autograd over the chunk. ``token_divergence_and_ce`` adds the cross-entropy of the labels in
the same pass at T = 1 (``DistillLoss`` uses it for ``ce`` + a token term): its value is
logsumexp − the label's logit and its gradient softmax − one-hot, both from the same e^{z − max}
(timings: README, language-model benchmark). So at most one chunk's
float32 intermediates exist at a time, never a [B, L, V] float32 tensor (for a float32 student
the gradient buffer is that size: it is the gradient autograd would return anyway). Measured on
CPU (B = 4, L = 256, V = 50257, bfloat16 student, gkd): peak memory = the bfloat16 gradient
buffer + about 7 float32 [B·chunk, V] tensors (276 MB at chunk 32, 1084 MB unchunked).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from raykd.teacher.token_topk import TokenTopK, teacher_log_probs

KINDS = ("forward", "reverse", "gkd")
# log of float32's smallest normal number (≈ -87.3): a teacher probability the cache cannot tell
# from 0 counts as this small inside logs, which changes no finite value above ~1e-38.
TEACHER_LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def bucket_divergence(log_p: Tensor, log_q: Tensor, kind: str, beta: float = 0.5) -> Tensor:
    """Per-position divergence [...] between log-probabilities [..., K] of the same buckets.

    The weights p = e^{log p}, q = e^{log q} are exact (0 for -inf); only the logs inside the
    differences are floored: the student's at its dtype's minimum (so 0·(floor − floor) = 0 for
    an empty bucket, never 0·inf = NaN, while a confidently wrong student keeps its gradient), the
    teacher's at TEACHER_LOG_FLOOR, so KL(q ‖ p) stays finite where the teacher's probability is
    0 (a -inf teacher logit)."""
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    lp = log_p.clamp_min(TEACHER_LOG_FLOOR)
    lq = log_q.clamp_min(torch.finfo(log_q.dtype).min)
    if kind == "forward" or (kind == "gkd" and beta == 0.0):
        return (log_p.exp() * (lp - lq)).sum(-1)
    if kind == "reverse" or (kind == "gkd" and beta == 1.0):
        return (log_q.exp() * (lq - lp)).sum(-1)
    lm = torch.logsumexp(torch.stack((lp + math.log(beta), lq + math.log1p(-beta))), dim=0)
    return (beta * (log_p.exp() * (lp - lm)).sum(-1)
            + (1 - beta) * (log_q.exp() * (lq - lm)).sum(-1))


def student_bucket_log_probs(scaled: Tensor, ids: Tensor | None) -> Tensor:
    """log softmax(s/T) [n, V] collapsed to the teacher's buckets: [n, k + 1] (the k ``ids``
    [n, k] then the tail), or the whole vocabulary [n, V] when ``ids`` is None (dense teacher).
    ``scaled`` is s/T in the working dtype."""
    if ids is None:
        return torch.log_softmax(scaled, dim=-1)
    log_total = torch.logsumexp(scaled, dim=-1, keepdim=True)
    top = scaled.gather(-1, ids) - log_total
    if ids.shape[-1] == scaled.shape[-1]:
        # k == V: the tail is empty; a logsumexp over all -inf would give a NaN gradient.
        tail = torch.full_like(log_total, float("-inf"))
    else:
        tail = torch.logsumexp(scaled.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
        tail = tail - log_total
    return torch.cat((top, tail), dim=-1)


# A row whose student tail sum Σ_tail e^{z - max} falls below this (its tail share < 1e-30) has
# lost tail logits to float32 underflow; its buckets are recomputed with logsumexps instead.
_TAIL_UNDERFLOW = 1e-30


def bucket_divergence_and_grad(scaled: Tensor, log_p: Tensor, ids: Tensor, kind: str,
                               beta: float, need_grad: bool, grad_scale: float = 1.0,
                               softmax_weight: Tensor | None = None
                               ) -> tuple[Tensor, Tensor | None, Tensor]:
    """(Σ over rows of the bucket divergence D, grad_scale·∂D/∂scaled + softmax_weight·
    softmax(scaled) [n, V] or None, logsumexp(scaled) [n, 1]) against the teacher's buckets
    ``log_p`` [n, k + 1] on ``ids`` [n, k]. ``softmax_weight`` ([n, 1] or None) is the share of a
    cross-entropy fused into the same pass (its -1 at the labels is the caller's). The value is
    the same as
    ``bucket_divergence(log_p, student_bucket_log_probs(scaled, ids))``, with the [n, V] part of
    the gradient written out by hand, so that one chunk costs about six passes over [n, V]
    (autograd through two logsumexps, a scatter and a gather takes about twenty).

    With e = exp(z − max z), Z = Σ e, E_T = Σ_tail e and G = ∂D/∂(log q) over the k + 1 buckets
    (autograd on the small [n, k + 1] tensor only), the chain rule through log q_i = z_i − log Z
    and log Q_T = log E_T − log Z gives ∂D/∂z_j = G_j − q_j·ΣG for a top-k id j and
    e_j·(G_T / E_T − ΣG / Z) for a tail id. Z and E_T are sums of non-negative terms, never a
    difference, so the tail has no cancellation; rows whose tail underflowed take the
    logsumexp path (``student_bucket_log_probs``)."""
    m = scaled.amax(dim=-1, keepdim=True)  # float32 work dtype from here on
    e = torch.sub(scaled, m).exp_()
    e_top = e.gather(-1, ids)
    e.scatter_(-1, ids, 0.0)
    e_tail = e.sum(-1, keepdim=True)
    total = e_tail + e_top.sum(-1, keepdim=True)
    log_total = total.log()
    log_q = torch.cat((scaled.gather(-1, ids) - m - log_total, e_tail.log() - log_total), -1)
    k_is_v = ids.shape[-1] == scaled.shape[-1]
    slow = None if k_is_v else (e_tail.squeeze(-1) < _TAIL_UNDERFLOW).nonzero().squeeze(-1)
    if slow is not None and slow.numel():
        log_q[slow] = student_bucket_log_probs(scaled[slow], ids[slow])
    log_q.requires_grad_(need_grad)
    with torch.enable_grad() if need_grad else nullcontext():
        per_row = bucket_divergence(log_p, log_q, kind, beta)
        value = per_row.sum()
    lse = m + log_total
    if not need_grad:
        return value.detach(), None, lse
    (g,) = torch.autograd.grad(value, log_q)
    g_top, g_tail, g_sum = g[:, :-1], g[:, -1:], g.sum(-1, keepdim=True)
    share = g_sum / total
    # per row: the factor of e_j on the tail ids, and the top-k ids' values; every scale is
    # folded in here, on [n, 1] and [n, k], so the [n, V] buffer is written once
    tail_coef = torch.where(e_tail > 0, g_tail / e_tail, torch.zeros_like(e_tail)) - share
    top = g_top - e_top * share
    if grad_scale != 1.0:
        tail_coef, top = tail_coef * grad_scale, top * grad_scale
    if softmax_weight is not None:
        w = softmax_weight / total
        tail_coef, top = tail_coef + w, top + e_top * w
    grad = e.mul_(tail_coef)  # the tail ids; the top-k ids are 0 here and set next
    grad.scatter_(-1, ids, top)
    if slow is not None and slow.numel():
        x = scaled[slow].detach().requires_grad_(True)
        with torch.enable_grad():
            d = bucket_divergence(log_p[slow], student_bucket_log_probs(x, ids[slow]), kind,
                                  beta).sum()
        grad[slow] = torch.autograd.grad(d, x)[0] * grad_scale
        if softmax_weight is not None:
            grad[slow] += softmax_weight[slow] * torch.softmax(x.detach(), -1)
    return value.detach(), grad, lse


@dataclass
class _Plan:
    """Everything but the student logits, for the autograd Function."""

    mask: Tensor  # [B, L] bool
    temperature: float
    kind: str
    beta: float
    chunk: int
    teacher_logits: Tensor | None
    teacher_topk: TokenTopK | None
    # grad mode at the call: inside forward it is always off, and ctx.needs_input_grad is true
    # under torch.no_grad too, which would take every evaluation step's gradient for nothing
    grad_enabled: bool
    weight: float = 1.0  # of the divergence in the output
    # a cross-entropy fused into the same pass (token_divergence_and_ce): labels [B, L] (-100 =
    # none), its weight, its token count; the forward leaves both unweighted means in ``parts``
    labels: Tensor | None = None
    ce_weight: float = 0.0
    ce_count: int = 0
    parts: tuple[Tensor, Tensor] | None = None


def _teacher_chunk(plan: _Plan, cols: slice, rows: Tensor, dtype: torch.dtype,
                   device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(teacher log-probabilities over the buckets [n, K], ids [n, k] or None) for the real
    positions ``rows`` ([B, c] bool) of the columns ``cols``."""
    if plan.teacher_logits is not None:
        t = plan.teacher_logits[:, cols][rows.to(plan.teacher_logits.device)]
        t = t.to(device=device, dtype=dtype)
        return torch.log_softmax(t / plan.temperature if plan.temperature != 1 else t, -1), None
    cache = plan.teacher_topk
    assert cache is not None
    where = rows.to(cache.values.device)
    sub = TokenTopK(cache.values[:, cols][where], cache.ids[:, cols].long()[where],
                    cache.tail_logmass[:, cols][where], cache.vocab_size)
    log_top, log_tail = teacher_log_probs(sub, plan.temperature)
    log_p = torch.cat((log_top, log_tail.unsqueeze(-1)), dim=-1)
    return log_p.to(device=device, dtype=dtype), sub.ids.to(device)


class _ChunkedDivergence(torch.autograd.Function):
    """Sum over real tokens of the divergence, and its gradient, one chunk at a time (see the
    module docstring); returns the T²-scaled mean."""

    @staticmethod
    def forward(ctx, student: Tensor, plan: _Plan, real: int) -> Tensor:
        work = torch.promote_types(student.dtype, torch.float32)
        need_grad = ctx.needs_input_grad[0] and plan.grad_enabled
        grad = None  # zeros where no chunk writes (padding), made on the first write
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        ce_total = torch.zeros((), dtype=torch.float64, device=student.device)
        fused = plan.labels is not None
        scale = plan.weight * plan.temperature ** 2 / real
        length = student.shape[1]
        for start in range(0, length, plan.chunk):
            cols = slice(start, min(start + plan.chunk, length))
            rows = plan.mask[:, cols]
            if not bool(rows.any()):
                continue
            log_p, ids = _teacher_chunk(plan, cols, rows, work, student.device)
            every = bool(rows.all())  # no padding here: a view, not a gathered copy
            x = (student[:, cols].reshape(-1, student.shape[-1]) if every
                 else student[:, cols][rows]).detach().to(work)
            if ids is not None:  # the top-k cache: the gradient by hand (see above)
                scaled = x / plan.temperature if plan.temperature != 1 else x
                ce_share = None
                if fused:  # T = 1: the cross-entropy's softmax is this one
                    y = plan.labels[:, cols].reshape(-1) if every else plan.labels[:, cols][rows]
                    valid = y != -100
                    y = y.clamp_min(0).unsqueeze(-1)
                    ce_share = (valid.to(work) * (plan.ce_weight / plan.ce_count)).unsqueeze(-1)
                value, g, lse = bucket_divergence_and_grad(
                    scaled, log_p, ids, plan.kind, plan.beta, need_grad,
                    scale / plan.temperature, ce_share)
                if fused:
                    ce_total += (lse - x.gather(-1, y)).squeeze(-1)[valid].sum().double()
                    if g is not None:
                        g.scatter_add_(-1, y, -ce_share)  # softmax − one-hot
            else:
                x.requires_grad_(need_grad)
                with torch.enable_grad() if need_grad else nullcontext():
                    scaled = x / plan.temperature if plan.temperature != 1 else x
                    log_q = student_bucket_log_probs(scaled, ids)
                    value = bucket_divergence(log_p, log_q, plan.kind, plan.beta).sum()
                g = torch.autograd.grad(value, x)[0] * scale if need_grad else None
            if g is not None:
                # scaled before the cast: one rounding into a bfloat16 student's dtype, not two
                g = g.to(student.dtype)
                if every and cols == slice(0, length) and g.is_contiguous():
                    grad = g.view(student.shape)  # one chunk, no padding: the buffer itself
                else:
                    grad = torch.zeros_like(student) if grad is None else grad
                    if every:
                        grad[:, cols] = g.view(grad[:, cols].shape)
                    else:
                        grad[:, cols][rows] = g
            total += value.detach().double()
        if need_grad:
            # kept on ctx, not saved: the backward scales this buffer in place and hands it on
            # (no second [B, L, V] tensor), so it can serve one backward only
            ctx.grad = torch.zeros_like(student) if grad is None else grad
        divergence = total * plan.temperature ** 2 / real
        if not fused:
            return (plan.weight * divergence).to(work)
        ce = ce_total / plan.ce_count
        plan.parts = (divergence.to(work), ce.to(work))
        return (plan.weight * divergence + plan.ce_weight * ce).to(work)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad, ctx.grad = getattr(ctx, "grad", None), None
        if grad is None:
            raise RuntimeError("token_divergence: its gradient was already taken; backward "
                               "through it once per forward (a second backward with "
                               "retain_graph=True is not supported: compute the loss again)")
        return grad.mul_(grad_out.to(grad.dtype)), None, None


def token_divergence(student: Tensor, *, kind: str, temperature: float,
                     teacher_logits: Tensor | None = None,
                     teacher_topk: TokenTopK | None = None, mask: Tensor | None = None,
                     beta: float = 0.5, chunk: int = 128) -> Tensor:
    """T²·mean over real tokens of the per-token ``kind`` divergence between the teacher (dense
    ``teacher_logits`` [B, L, V] or ``teacher_topk`` rows [B, L]) and ``student`` [B, L, V].

    ``mask`` [B, L] (true = real token; None = all), ``chunk`` positions along L per step.
    Raises ValueError naming the bad argument."""
    _check(student, kind, temperature, teacher_logits, teacher_topk, mask, beta, chunk)
    mask = _real_mask(student, mask)
    real = int(mask.sum())
    if real == 0:
        return student.sum() * 0.0
    if teacher_logits is not None:
        teacher_logits = teacher_logits.detach()
    plan = _Plan(mask, float(temperature), kind, float(beta), int(chunk), teacher_logits,
                 teacher_topk, torch.is_grad_enabled())
    return _ChunkedDivergence.apply(student, plan, real)


def token_divergence_and_ce(student: Tensor, labels: Tensor, *, kind: str, weight: float,
                            ce_weight: float, teacher_topk: TokenTopK,
                            mask: Tensor | None = None, beta: float = 0.5, chunk: int = 128
                            ) -> tuple[Tensor, Tensor, Tensor] | None:
    """(weight·D + ce_weight·CE, D, CE) for D the T = 1 ``kind`` divergence against a top-k cache
    (as ``token_divergence``) and CE the mean cross-entropy of ``labels`` [B, L] (-100 ignored,
    as ``F.cross_entropy``) over the real tokens, in one pass: both need the student's softmax,
    and their gradients are written into the same buffer. Only the first value carries a
    gradient. None when no real token has a label (the caller computes them apart)."""
    _check(student, kind, 1.0, None, teacher_topk, mask, beta, chunk)
    b, length, _ = student.shape
    mask = _real_mask(student, mask)
    labels = labels.to(student.device).long()
    if tuple(labels.shape) != (b, length):
        raise ValueError(f"labels: shape {list(labels.shape)} must be [batch, length] "
                         f"{[b, length]}")
    real, ce_count = int(mask.sum()), int((mask & (labels != -100)).sum())
    if ce_count == 0:
        return None
    plan = _Plan(mask, 1.0, kind, float(beta), int(chunk), None, teacher_topk,
                 torch.is_grad_enabled(), float(weight), labels, float(ce_weight), ce_count)
    total = _ChunkedDivergence.apply(student, plan, real)
    return total, *plan.parts


def _real_mask(student: Tensor, mask: Tensor | None) -> Tensor:
    """[B, L] bool on the student's device: true on real tokens (all of them when None)."""
    if mask is None:
        return torch.ones(student.shape[:2], dtype=torch.bool, device=student.device)
    return mask.to(student.device).bool()


def check_common_args(student, temperature, chunk, teacher_logits, teacher_topk) -> None:
    """The arguments every per-token term checks alike (token_kd/rkl/gkd here, token_uld):
    student logits [B, L, V] float, a finite T > 0, a whole chunk >= 1, exactly one teacher."""
    if not isinstance(student, Tensor) or student.dim() != 3 or not student.is_floating_point():
        got = list(student.shape) if isinstance(student, Tensor) else type(student).__name__
        raise ValueError(f"student_logits: expected a float tensor [batch, length, vocab], "
                         f"got {got}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) \
            or not 0 < temperature < math.inf:
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: must be a whole number >= 1, got {chunk!r}")
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("teacher_logits / teacher_topk: give exactly one of them, got "
                         + ("both" if teacher_logits is not None else "neither"))


def _check(student, kind, temperature, teacher_logits, teacher_topk, mask, beta, chunk) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    check_common_args(student, temperature, chunk, teacher_logits, teacher_topk)
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta <= 1:
        raise ValueError(f"beta: must be a number in [0, 1], got {beta!r}")
    b, length, vocab = student.shape
    if teacher_logits is not None and teacher_logits.shape != student.shape:
        raise ValueError(f"teacher_logits: shape {list(teacher_logits.shape)} must equal the "
                         f"student's {list(student.shape)}")
    if teacher_topk is not None:
        if tuple(teacher_topk.shape) != (b, length):
            raise ValueError(f"teacher_topk: positions {list(teacher_topk.shape)} must match "
                             f"the student's [batch, length] {[b, length]}")
        if teacher_topk.vocab_size != vocab:
            raise ValueError(f"teacher_topk: vocab_size {teacher_topk.vocab_size} != the "
                             f"student's vocabulary {vocab}")
    if mask is not None and tuple(mask.shape) != (b, length):
        raise ValueError(f"mask: shape {list(mask.shape)} must be [batch, length] "
                         f"{[b, length]}")
