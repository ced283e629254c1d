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
    """[B, (L,) C] → [N, C] rows and a boolean [N] keep-vector (None: keep all)."""
    rows = logits.reshape(-1, logits.shape[-1])
    if mask is None or logits.dim() == 2:
        return rows, None
    return rows, mask.reshape(-1).bool()


def soft_kl(student: Tensor, teacher: Tensor, temperature: float,
            mask: Tensor | None = None) -> Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), summed over classes, averaged over (real) rows.

    The T² keeps the soft-target gradients on the scale of the hard-label ones when T changes
    (arXiv 1503.02531, §2). Teacher logits of -inf (dropped classes) count as probability 0.
    """
    s_rows, keep = flatten_rows(student, mask)
    t_rows, _ = flatten_rows(teacher.detach(), None)
    log_p_s = F.log_softmax(s_rows / temperature, dim=-1)
    # Σ p_t·(log p_t − log p_s) in log space: F.kl_div's xlogy costs ~2× the rest of the term on
    # CPU. A -inf teacher logit's log p_t is clamped to the dtype's minimum, so its p_t is exactly
    # 0 and it contributes 0 (and no gradient), as 0·log 0 does in kl_div.
    log_p_t = F.log_softmax(t_rows / temperature, dim=-1)
    log_p_t = log_p_t.clamp_min(torch.finfo(log_p_t.dtype).min)
    per_row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if keep is not None:
        per_row = per_row[keep]
    if per_row.numel() == 0:
        return student.sum() * 0.0
    return per_row.mean() * temperature**2


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
