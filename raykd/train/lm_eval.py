"""Language-model evaluation: next-token accuracy and loss in nats per real token (padding,
label -100, left out), perplexity, and top-1 agreement of a student with its teacher.

``token_sums`` is what the one evaluation helper (raykd.train.loop.evaluate_split) adds up for
token logits; ``agreement_sums`` what the training loop adds up against the cached teacher, and
:func:`lm_test_report` what the driver measures on the test split once a distillation is done.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

IGNORE = -100


def token_sums(logits: Tensor, labels: Tensor) -> tuple[float, float, float]:
    """(correct, real tokens, summed cross-entropy in nats) of logits [B, L, V] vs labels
    [B, L] (label -100: padding, not counted)."""
    rows, y = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    keep = y != IGNORE
    correct = float((rows.argmax(-1)[keep] == y[keep]).sum())
    nll = float(torch.nn.functional.cross_entropy(rows, y, ignore_index=IGNORE, reduction="sum"))
    return correct, float(keep.sum()), nll


def agreement_sums(student_logits: Tensor, teacher_top1: Tensor, mask: Tensor | None
                   ) -> tuple[float, float]:
    """(tokens where the student's argmax is the teacher's, real tokens). The student's logit at
    the teacher's id is compared with its largest (a tie counts as agreement): on CPU argmax
    over a [tokens, vocab] batch costs about ten times amax + gather, a few percent of a small
    student's training step."""
    ids = teacher_top1.to(torch.int64).unsqueeze(-1)
    vocab = student_logits.shape[-1]
    # a larger teacher vocabulary (token_uld): an id the student lacks is a disagreement
    same = student_logits.gather(-1, ids.clamp(max=vocab - 1)).squeeze(-1) \
        >= student_logits.amax(-1)
    same = same & (ids.squeeze(-1) < vocab)
    if mask is not None:
        same = same[mask]
    return float(same.sum()), float(same.numel())


def perplexity(nats_per_token: float) -> float:
    return math.exp(min(nats_per_token, 700.0))  # exp overflows past ~709


@torch.no_grad()
def lm_test_report(teacher, student, dataset, batch_size: int = 64) -> dict[str, Any]:
    """Teacher and student on ``dataset`` (the test split), in this process: each one's
    accuracy, nats per token and perplexity, and the student's top-1 agreement with the
    teacher over real tokens."""
    sums = {"t_correct": 0.0, "s_correct": 0.0, "tokens": 0.0, "t_nll": 0.0, "s_nll": 0.0,
            "agree": 0.0}
    teacher.eval()
    student.eval()
    for chunk in torch.arange(len(dataset)).split(batch_size):
        _, x, y = dataset.get_batch(chunk)
        t_logits, s_logits = teacher(x), student(x)
        tc, n, tn = token_sums(t_logits, y)
        sc, _, sn = token_sums(s_logits, y)
        agree, _ = agreement_sums(s_logits, t_logits.argmax(-1), y != IGNORE)
        for key, value in (("t_correct", tc), ("s_correct", sc), ("tokens", n), ("t_nll", tn),
                           ("s_nll", sn), ("agree", agree)):
            sums[key] += value
    n = max(sums["tokens"], 1.0)
    return {"tokens": int(sums["tokens"]),
            "teacher": {"accuracy": sums["t_correct"] / n, "loss_nats_per_token": sums["t_nll"] / n,
                        "perplexity": perplexity(sums["t_nll"] / n)},
            "student": {"accuracy": sums["s_correct"] / n, "loss_nats_per_token": sums["s_nll"] / n,
                        "perplexity": perplexity(sums["s_nll"] / n)},
            "student_teacher_agreement": sums["agree"] / n}



@torch.no_grad()
def model_test_report(model, dataset, batch_size: int = 64) -> tuple[dict[str, float], int]:
    """({accuracy, loss_nats_per_token, perplexity}, real tokens) of one model on ``dataset``."""
    correct = tokens = nll = 0.0
    model.eval()
    for chunk in torch.arange(len(dataset)).split(batch_size):
        _, x, y = dataset.get_batch(chunk)
        c, n, loss = token_sums(model(x), y)
        correct, tokens, nll = correct + c, tokens + n, nll + loss
    n = max(tokens, 1.0)
    return ({"accuracy": correct / n, "loss_nats_per_token": nll / n,
             "perplexity": perplexity(nll / n)}, int(tokens))


def cross_tokenizer_report(teacher, teacher_test, student, test, batch_size: int = 64
                           ) -> dict[str, Any]:
    """``lm_test_report`` for a teacher with its own tokenizer (``teacher.tokenizer``): each
    model on the test split's text in its own tokens. Nats per token are per each one's token,
    so the two are not comparable (per character would be), and top-1 agreement is undefined
    (the ids name different strings): ``student_teacher_agreement`` is None."""
    t, t_tokens = model_test_report(teacher, teacher_test, batch_size)
    s, tokens = model_test_report(student, test, batch_size)
    return {"tokens": tokens, "teacher_tokens": t_tokens, "teacher": t, "student": s,
            "student_teacher_agreement": None}
