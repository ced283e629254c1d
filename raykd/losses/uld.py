"""Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030): ``token_uld``, the one
token term that works when the teacher's vocabulary is not the student's.

Token ids of two tokenizers mean different things, so no per-id divergence (``token_kd`` and
kin) exists between them. ULD compares what does not depend on the ids: at each aligned
position, both probability vectors sorted in decreasing order, the shorter zero-padded to the
longer, and their L1 distance Σ_i |p_(i) − q_(i)| — the paper's closed form of the Wasserstein-1
distance under its cost (every transport between different ranks costs the same), so no
optimisation runs. Sequences are aligned BY POSITION and truncated to the shorter (the paper's
rule; tokens of the two tokenizers rarely line up exactly, which ULD accepts). The value is
T²-scaled and averaged over the real tokens, as the other token terms take T: p = softmax(t/T),
q = softmax(s/T), and T² in front (T = 1, the paper's setting, makes both moot).

The teacher is dense logits [B, Lt, Vt] or a per-token top-k cache (``TokenTopK``). The cache
holds the k largest teacher probabilities and only the TOTAL mass of the rest (the tail), not
its shape. Its sorted vector is therefore known at ranks 1..k, and beyond them only as one sum;
the loss compares
  Σ_{i ≤ k} |p_(i) − q_(i)| + |P_tail − Q_tail|,
q_(i) the student's k largest probabilities (zero-padded when its vocabulary is < k) and
Q_tail the student's mass beyond them (a logsumexp ratio, not 1 − Σ: no cancellation). By the
triangle inequality |P_tail − Q_tail| ≤ Σ_{i > k} |p_(i) − q_(i)|, so on a cache the loss is a
lower bound of the dense one — the same coarsening rule the k + 1 buckets of ``token_kd`` follow
(``token_divergence.py``). It is exact when k covers the teacher's vocabulary (the dense cache:
P_tail = 0, and |0 − Q_tail| is the student's zero-padded remainder) and whenever one tail
dominates the other rank by rank. The alternatives are worse: dropping the tail (Axolotl's
top-k ULD pads the teacher with zeros after k) reads a teacher that put e.g. 20% of its mass
beyond rank k as putting none there, and pushes the student's tail toward 0, sharper than the
teacher; spreading the tail evenly over Vt − k ranks invents a shape the cache never saw and
needs a full sort of every student row. The tail mass at T ≠ 1 follows the cache's rule
(``token_topk.teacher_log_probs``).

Positions: the cache marks a position where the teacher has no token (its own tokenization of
the block's text ended first, raykd.data.cross_tokens) with a NaN tail log-mass; those and the
padding (``mask`` false) are left out, and so are positions past the shorter sequence.

Memory: ``chunk`` positions at a time; under autograd each chunk is recomputed in the backward
(``torch.utils.checkpoint``), so one chunk's [n, V] float32 intermediates exist at a time (a
dense teacher's sort is O(V log V) per row; the cache's path takes a top-k of the student).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from raykd.losses.base import TEMPERATURE, BuildContext, LossInputs, LossTerm, Param
from raykd.losses.token_divergence import check_common_args

if TYPE_CHECKING:
    from raykd.teacher.token_topk import TokenTopK

CHUNK = Param(128, "sequence positions per step (each chunk's sort is recomputed in the "
              "backward, so one chunk's [chunk·batch, vocab] float32 tensors exist at a time)",
              "int", positive=True)


def sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """Σ_i |p_(i) − q_(i)| per row of two probability tensors [n, Vp], [n, Vq]: each sorted in
    decreasing order, the shorter zero-padded to the longer."""
    p = p.sort(dim=-1, descending=True).values
    q = q.sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p = F.pad(p, (0, width - p.shape[-1]))
    q = F.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def _dense_rows(x: Tensor, t: Tensor, temperature: float) -> Tensor:
    return sorted_l1(torch.softmax(t / temperature, -1), torch.softmax(x / temperature, -1))


def _topk_rows(x: Tensor, p_top: Tensor, p_tail: Tensor, temperature: float) -> Tensor:
    """Σ_{i ≤ k} |p_(i) − q_(i)| + |P_tail − Q_tail| (module docstring) per row."""
    scaled = x / temperature
    k, vocab = p_top.shape[-1], scaled.shape[-1]
    kk = min(k, vocab)
    top, ids = scaled.topk(kk, dim=-1)
    log_total = torch.logsumexp(scaled, -1, keepdim=True)
    q_top = F.pad((top - log_total).exp(), (0, k - kk))
    if kk < vocab:
        q_tail = (torch.logsumexp(scaled.scatter(-1, ids, float("-inf")), -1)
                  - log_total.squeeze(-1)).exp()
    else:  # the student's whole vocabulary is in its top k: no tail
        q_tail = torch.zeros_like(log_total.squeeze(-1))
    p_top = p_top.sort(dim=-1, descending=True).values
    return (p_top - q_top).abs().sum(-1) + (p_tail - q_tail).abs()


def uld_loss(student: Tensor, *, temperature: float = 1.0, teacher_logits: Tensor | None = None,
             teacher_topk: TokenTopK | None = None, mask: Tensor | None = None,
             chunk: int = 128) -> Tensor:
    """T²·mean over the aligned real positions of the sorted-probability L1 distance between
    ``student`` [B, Ls, Vs] and the teacher (dense ``teacher_logits`` [B, Lt, Vt] or
    ``teacher_topk`` rows [B, Lt]); ``mask`` [B, Ls], true on real tokens. Vocabularies may
    differ; sequences are truncated to min(Ls, Lt). Raises ValueError naming a bad argument."""
    real = _aligned_mask(student, teacher_logits, teacher_topk, mask, temperature, chunk)
    count = int(real.sum())
    if count == 0:
        return student.sum() * 0.0
    work = torch.promote_types(student.dtype, torch.float32)
    temperature = float(temperature)
    total = torch.zeros((), dtype=work, device=student.device)
    for start in range(0, real.shape[1], chunk):
        cols = slice(start, min(start + chunk, real.shape[1]))
        rows = real[:, cols]
        if not bool(rows.any()):
            continue
        x = student[:, cols][rows].to(work)
        if teacher_logits is not None:
            t = teacher_logits.detach()[:, cols][rows.to(teacher_logits.device)]
            args = (x, t.to(device=x.device, dtype=work), temperature)
            fn = _dense_rows
        else:
            p_top, p_tail = _teacher_buckets(teacher_topk, cols, rows, temperature)
            args = (x, p_top.to(x.device, work), p_tail.to(x.device, work), temperature)
            fn = _topk_rows
        if torch.is_grad_enabled() and x.requires_grad:
            per_row = checkpoint(fn, *args, use_reentrant=False)
        else:
            per_row = fn(*args)
        total = total + per_row.sum()
    return total * (temperature ** 2 / count)


def _teacher_buckets(cache: TokenTopK, cols: slice, rows: Tensor, temperature: float
                     ) -> tuple[Tensor, Tensor]:
    """(the teacher's k probabilities [n, k], its tail mass [n]) at ``temperature`` for the
    positions ``rows`` ([B, c] bool) of ``cols``."""
    from raykd.teacher.token_topk import TokenTopK, teacher_log_probs

    where = rows.to(cache.values.device)
    sub = TokenTopK(cache.values[:, cols][where], cache.ids[:, cols][where],
                    cache.tail_logmass[:, cols][where], cache.vocab_size)
    log_top, log_tail = teacher_log_probs(sub, temperature)
    return log_top.exp(), log_tail.exp()  # exp(-inf) = 0: an empty tail


def teacher_positions(cache: TokenTopK) -> Tensor:
    """[B, L] bool: positions where the cache holds a teacher token (NaN tail: none)."""
    return ~torch.isnan(cache.tail_logmass)


def _aligned_mask(student, teacher_logits, teacher_topk, mask, temperature, chunk) -> Tensor:
    """[B, min(Ls, Lt)] bool on the student's device: real student tokens where the teacher
    has a token too. Checks every argument on the way."""
    check_common_args(student, temperature, chunk, teacher_logits, teacher_topk)
    b, length = student.shape[:2]
    if teacher_logits is not None:
        if teacher_logits.dim() != 3 or teacher_logits.shape[0] != b:
            raise ValueError(f"teacher_logits: shape {list(teacher_logits.shape)} must be "
                             f"[batch {b}, length, vocab]")
        valid = torch.ones(teacher_logits.shape[:2], dtype=torch.bool)
    else:
        if len(teacher_topk.shape) != 2 or teacher_topk.shape[0] != b:
            raise ValueError(f"teacher_topk: positions {list(teacher_topk.shape)} must be "
                             f"[batch {b}, length]")
        valid = teacher_positions(teacher_topk)
    if mask is not None and tuple(mask.shape) != (b, length):
        raise ValueError(f"mask: shape {list(mask.shape)} must be [batch, length] "
                         f"{[b, length]}")
    shorter = min(length, valid.shape[1])
    real = valid[:, :shorter].to(student.device)
    if mask is not None:
        real = real & mask[:, :shorter].to(student.device).bool()
    return real


class TokenULD(LossTerm):
    """Per-token sorted-probability L1 (Wasserstein-1 in ULD's closed form) between teacher and
    student, T²-scaled, averaged over aligned real tokens; vocabularies may differ (module
    docstring: the top-k cache's tail, the alignment, memory)."""

    key = "token_uld"
    family = "language"
    paper = "Boizard et al. 2024, Towards Cross-Tokenizer Distillation: the Universal Logit " \
            "Distillation Loss for LLMs, arXiv 2402.12030"
    needs = ("logits",)
    params = {"temperature": TEMPERATURE, "chunk": CHUNK}
    cross_vocabulary = True  # raykd.models.lm_checks: the one token term for other vocabularies

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        self.temperature = params["temperature"] or ctx.temperature
        self.chunk = int(params["chunk"])

    def forward(self, inp: LossInputs) -> Tensor:
        if inp.student_logits is None:
            raise ValueError(f"{self.key}: needs student logits")
        return uld_loss(inp.student_logits, temperature=self.temperature,
                        teacher_logits=inp.teacher_logits, teacher_topk=inp.teacher_topk,
                        mask=inp.mask, chunk=self.chunk)


TERMS = (TokenULD,)
