"""Response-based terms: the student learns from the teacher's logits (and the labels).

``ce`` (hard labels), ``kd`` (Hinton et al., arXiv 1503.02531) and ``dkd`` (Zhao et al.,
arXiv 2203.08679, as in mdistiller). Logits may be [B, C] or [B, L, C]; with a token mask
[B, L] only real tokens count.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from raykd.losses.base import (TEMPERATURE, BuildContext, LossInputs, LossTerm, Param,
                               require_logits)


def flatten_rows(logits: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """[B, (L,) C] → [N, C] rows and a boolean [N] keep-vector (None: keep all).

    [B, C] logits come back as they are: a same-shape ``reshape`` would still be a view with its
    own autograd node, one more step in every backward.
    """
    if logits.dim() == 2:
        return logits, None
    rows = logits.reshape(-1, logits.shape[-1])
    return rows, None if mask is None else mask.reshape(-1).bool()


# From this many classes on, the CPU path takes the probabilities from their own softmax pass:
# there ATen's softmax kernel is 10-15 % cheaper than ``exp`` over the log-probabilities (1 thread,
# C = 128…32000); below it the per-row overhead of a second softmax costs more than the exp.
_SOFTMAX_FROM_CLASSES = 128


class _SoftKL(torch.autograd.Function):
    """T²·mean over rows of KL(softmax(t/T) ‖ softmax(s/T)) for [N, C] rows, one fused pass.

    Forward: one ``log_softmax`` over the student and teacher rows stacked (one kernel call for
    both sides), the probabilities as its ``exp`` (on CPU from 128 classes: one ``softmax`` of the
    same stacked rows), the value as Σ p_t·(log p_t − log p_s) summed in place. Backward is the
    closed form ∂/∂s = T·(softmax(s/T) − softmax(t/T)) / N, computed once in the forward: no
    autograd graph over the B×C intermediates, and only that one [N, C] tensor is kept for the
    backward. The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, temperature: float) -> Tensor:
        z = torch.cat((s, t))
        if temperature != 1.0:
            z.div_(temperature)
        log_p = torch.log_softmax(z, dim=-1)
        if z.device.type == "cpu" and z.shape[-1] >= _SOFTMAX_FROM_CLASSES:
            p = torch.softmax(z, dim=-1)
        else:
            p = log_p.exp()
        del z
        log_p_s, log_p_t = log_p.chunk(2)
        p_s, p_t = p.chunk(2)
        # A -inf teacher logit (a dropped class) has p_t = 0 and log p_t = -inf; clamped to the
        # dtype's minimum its term is 0·finite = 0, as 0·log 0 in kl_div, and no NaN. In place:
        # log_p's teacher half becomes the per-element KL (mul + sum: an accurate cascade sum,
        # which BLAS dot is not over millions of tokens×vocabulary).
        kl = log_p_t.clamp_min_(_FLOOR[log_p.dtype]).sub_(log_p_s).mul_(p_t).sum()
        rows = s.shape[0]
        if ctx.needs_input_grad[0]:
            ctx.scale = temperature / rows
            ctx.save_for_backward(torch.sub(p_s, p_t))  # a new [N, C]: log_p and p are freed
        return kl.mul_(temperature * temperature / rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (diff,) = ctx.saved_tensors
        return diff * (grad_out * ctx.scale), None, None


_FLOOR = {torch.float32: torch.finfo(torch.float32).min,
          torch.float64: torch.finfo(torch.float64).min}


def soft_kl(student: Tensor, teacher: Tensor, temperature: float,
            mask: Tensor | None = None) -> Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), summed over classes, averaged over (real) rows.

    The T² keeps the soft-target gradients on the scale of the hard-label ones when T changes
    (arXiv 1503.02531, §2). Teacher logits of -inf (dropped classes) count as probability 0.
    Computed in float32 (float64 for float64 students): float16/bfloat16 logits, e.g. a cached
    teacher's, are upcast before dividing by T. Masked-out rows are dropped before any work.
    Equal in value and gradient (to float rounding) to
    ``F.kl_div(F.log_softmax(s / T), F.softmax(t / T), reduction="batchmean") * T**2`` over the
    kept rows; see :class:`_SoftKL` for how it is computed.
    """
    s_rows, keep = flatten_rows(student, mask)
    t_rows = teacher.detach()
    if t_rows.dim() != 2:
        t_rows = t_rows.reshape(-1, t_rows.shape[-1])
    if keep is not None:
        s_rows, t_rows = s_rows[keep], t_rows[keep]
    if s_rows.shape[0] == 0:
        return student.sum() * 0.0
    dtype = torch.promote_types(s_rows.dtype, torch.float32)
    if s_rows.dtype != dtype:
        s_rows = s_rows.to(dtype)
    if t_rows.dtype != dtype:
        t_rows = t_rows.to(dtype)
    return _SoftKL.apply(s_rows, t_rows, float(temperature))


class CrossEntropy(LossTerm):
    """Hard-label cross-entropy; token logits [B, L, V] use the mask and ignore label -100."""

    key = "ce"
    family = "response"
    paper = "hard-label cross-entropy (Hinton et al. 2015, arXiv 1503.02531, the (1-α) term)"
    needs = ("labels",)
    params = {"label_smoothing": Param(0.0, "label smoothing ε", minimum=0.0)}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        self.label_smoothing = params["label_smoothing"]

    def forward(self, inp: LossInputs) -> Tensor:
        if inp.student_logits is None or inp.labels is None:
            raise ValueError("ce: needs student logits and labels")
        rows, keep = flatten_rows(inp.student_logits, inp.mask)
        labels = inp.labels.reshape(-1)
        if keep is not None:
            labels = labels.masked_fill(~keep, -100)
        return F.cross_entropy(rows, labels, ignore_index=-100,
                               label_smoothing=self.label_smoothing)


class HintonKD(LossTerm):
    """Soft-target KD: T²·KL(p_T^τ ‖ p_S^τ), batch-mean (arXiv 1503.02531)."""

    key = "kd"
    family = "response"
    paper = "Hinton, Vinyals, Dean 2015, Distilling the Knowledge in a Neural Network, " \
            "arXiv 1503.02531"
    needs = ("logits",)
    params = {"temperature": TEMPERATURE}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        self.temperature = params["temperature"] or ctx.temperature

    def forward(self, inp: LossInputs) -> Tensor:
        s, t = require_logits(inp, self.key)
        return soft_kl(s, t, self.temperature, inp.mask)


def tckd_nckd(student: Tensor, teacher: Tensor, labels: Tensor,
              temperature: float) -> tuple[Tensor, Tensor]:
    """Per-sample TCKD and NCKD (without the T² factor) of arXiv 2203.08679, eq. (3)–(4).

    TCKD is the KL between the binary (target, rest) distributions, NCKD the KL between the
    distributions over the non-target classes renormalised. Computed in log space: mdistiller
    takes ``torch.log`` of summed probabilities, which is -inf once a probability underflows.
    """
    target = F.one_hot(labels, student.shape[-1]).bool()
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)

    def binary(log_p: Tensor) -> Tensor:  # [N, 2] log (p_target, 1 - p_target)
        log_pt = log_p.masked_fill(~target, float("-inf")).logsumexp(-1)
        log_rest = log_p.masked_fill(target, float("-inf")).logsumexp(-1)
        return torch.stack([log_pt, log_rest], dim=-1)

    b_s, b_t = binary(log_s), binary(log_t)
    tckd = (b_t.exp() * (b_t - b_s)).sum(-1)
    # non-target distributions: the same logits with the target removed (mdistiller subtracts
    # 1000 from the target logit; masking it to -inf is the exact limit of that)
    nt_s = F.log_softmax((student / temperature).masked_fill(target, float("-inf")), dim=-1)
    nt_t = F.log_softmax((teacher / temperature).masked_fill(target, float("-inf")), dim=-1)
    p_nt_t = nt_t.exp()  # exactly 0 at the target
    # zero the -inf target entries before subtracting so neither value nor gradient is NaN
    nckd = (p_nt_t * (nt_t.masked_fill(target, 0.0) - nt_s.masked_fill(target, 0.0))).sum(-1)
    return tckd, nckd


class DecoupledKD(LossTerm):
    """DKD = α·TCKD + β·NCKD, each T²-scaled and batch-averaged as in mdistiller.

    KD itself equals TCKD + (1 − p_t^T)·NCKD (arXiv 2203.08679, eq. (6)): DKD frees NCKD's
    weight from the teacher's confidence. The warm-up ramps the term linearly over the first
    ``warmup`` epochs (mdistiller: min(epoch / warmup, 1) with 1-based epochs).
    """

    key = "dkd"
    family = "response"
    paper = "Zhao et al. 2022, Decoupled Knowledge Distillation, arXiv 2203.08679"
    needs = ("labels", "logits")
    params = {
        "alpha": Param(1.0, "weight α of target-class KD (TCKD)", minimum=0.0),
        "beta": Param(8.0, "weight β of non-target-class KD (NCKD)", minimum=0.0),
        "temperature": TEMPERATURE,
        "warmup": Param(0, "epochs of linear warm-up of the term (mdistiller uses 20; 0 = none)",
                        "int", minimum=0),
    }

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        self.alpha, self.beta = params["alpha"], params["beta"]
        self.temperature = params["temperature"] or ctx.temperature
        self.warmup = params["warmup"]

    def forward(self, inp: LossInputs) -> Tensor:
        s_in, t = require_logits(inp, self.key, labels=True)
        s, keep = flatten_rows(s_in, inp.mask)
        t, labels = t.reshape(-1, t.shape[-1]), inp.labels.reshape(-1)
        if s_in.dim() > 2:  # token logits: drop padding and ignored (-100) labels
            keep = labels >= 0 if keep is None else keep & (labels >= 0)
            s, t, labels = s[keep], t[keep], labels[keep]
        tckd, nckd = tckd_nckd(s, t, labels, self.temperature)
        loss = (self.alpha * tckd.mean() + self.beta * nckd.mean()) * self.temperature**2
        if self.warmup > 0:
            loss = loss * min((inp.epoch + 1) / self.warmup, 1.0)
        return loss


TERMS = (CrossEntropy, HintonKD, DecoupledKD)
