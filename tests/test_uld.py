"""token_uld (Universal Logit Distillation, arXiv 2402.12030) against a reference written out by
hand: numpy loops over positions — sort each probability vector, zero-pad the shorter, sum the
absolute differences — on fixed tensors whose vocabularies and lengths differ, with a mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raykd.config import ConfigError, DistillConfig, LossTermConfig
from raykd.losses import LOSSES, DistillLoss, LossInputs, build_term, describe_losses
from raykd.losses.uld import uld_loss
from raykd.teacher.token_topk import TokenTopK, encode_token_topk

VS, VT = 5, 8  # student and teacher vocabularies differ
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)  # student [2, 4], padded


def rand(*shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


S = rand(2, 4, VS, seed=1)  # student: 4 positions
T = rand(2, 3, VT, seed=2)  # teacher: 3 positions (its tokenization of the text is shorter)


def softmax(row, temp=1.0):
    z = np.asarray(row, dtype=np.float64) / temp
    e = np.exp(z - z.max())
    return e / e.sum()


def reference_dense(student, teacher, mask, temp=1.0):
    """T²·mean over the aligned real positions of Σ_i |sort(p)_i − sort(q)_i| (zero-padded)."""
    s, t, m = student.numpy(), teacher.numpy(), mask.numpy()
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for pos in range(min(s.shape[1], t.shape[1])):
            if not m[b, pos]:
                continue
            p = sorted(softmax(t[b, pos], temp), reverse=True)
            q = sorted(softmax(s[b, pos], temp), reverse=True)
            width = max(len(p), len(q))
            p, q = p + [0.0] * (width - len(p)), q + [0.0] * (width - len(q))
            total += sum(abs(a - c) for a, c in zip(p, q))
            count += 1
    return temp ** 2 * total / count


def reference_topk(student, cache, mask, valid):
    """The cache's rule at T = 1: the k stored teacher probabilities against the student's k
    largest, then the teacher's tail mass against the student's remaining mass."""
    s, m = student.numpy(), mask.numpy()
    values, tail = cache.values.double().numpy(), cache.tail_logmass.double().numpy()
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for pos in range(min(s.shape[1], values.shape[1])):
            if not (m[b, pos] and valid[b][pos]):
                continue
            p = sorted(np.exp(values[b, pos]).tolist(), reverse=True)
            q = sorted(softmax(s[b, pos]).tolist(), reverse=True)
            k = len(p)
            q_top = (q + [0.0] * k)[:k]
            total += sum(abs(a - c) for a, c in zip(p, q_top))
            total += abs(float(np.exp(tail[b, pos])) - sum(q[k:]))
            count += 1
    return total / count


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_dense_uld_matches_the_hand_reference_across_vocabularies(temp):
    got = uld_loss(S, teacher_logits=T, mask=MASK, temperature=temp, chunk=2)
    assert float(got) == pytest.approx(reference_dense(S, T, MASK, temp), rel=1e-9)
    # the teacher longer than the student, and the larger vocabulary on the student's side
    got = uld_loss(T, teacher_logits=S, temperature=temp)
    assert float(got) == pytest.approx(
        reference_dense(T, S, torch.ones(2, 3, dtype=torch.bool), temp), rel=1e-9)


@pytest.mark.parametrize("k", [1, 3, VT])
def test_topk_uld_matches_the_hand_reference(k):
    cache = encode_token_topk(T.float(), k, torch.float32)
    valid = [[True] * 3, [True, False, True]]
    cache.tail_logmass[1, 1] = float("nan")  # no teacher token there (cross-tokenizer cache)
    got = uld_loss(S, teacher_topk=cache, mask=MASK)
    assert float(got) == pytest.approx(reference_topk(S, cache, MASK, valid), rel=1e-5)


def test_a_dense_cache_equals_dense_logits_and_a_top_k_one_is_a_lower_bound():
    dense = float(uld_loss(S, teacher_logits=T, mask=MASK))
    full = encode_token_topk(T.float(), VT, torch.float32)
    assert float(uld_loss(S, teacher_topk=full, mask=MASK)) == pytest.approx(dense, rel=1e-5)
    for k in (1, 2, 4):
        cached = float(uld_loss(S, teacher_topk=encode_token_topk(T.float(), k, torch.float32),
                                mask=MASK))
        assert cached <= dense + 1e-6


def test_zero_for_identical_distributions_even_under_another_vocabulary_order():
    assert float(uld_loss(S, teacher_logits=S.clone(), mask=MASK)) == pytest.approx(0, abs=1e-12)
    # ULD ignores which id holds which probability: a permuted vocabulary is still 0
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert float(uld_loss(S, teacher_logits=S[..., perm])) == pytest.approx(0, abs=1e-12)
    # and padding the teacher's vocabulary with ids of probability 0 changes nothing
    wider = torch.cat([S, torch.full((2, 4, 3), float("-inf"), dtype=S.dtype)], -1)
    assert float(uld_loss(S, teacher_logits=wider)) == pytest.approx(0, abs=1e-12)
    cache = encode_token_topk(S.float(), VS, torch.float32)
    assert float(uld_loss(S.float(), teacher_topk=cache)) == pytest.approx(0, abs=1e-6)


def test_gradient_flows_to_the_student_only_and_not_through_padding():
    s = S.clone().requires_grad_(True)
    t = T.clone().requires_grad_(True)
    uld_loss(s, teacher_logits=t, mask=MASK, chunk=1).backward()
    assert t.grad is None
    assert s.grad.abs().sum() > 0
    assert s.grad[0, 3].abs().sum() == 0  # padding
    assert s.grad[:, 3].abs().sum() == 0  # past the teacher's 3 positions
    # the checkpointed chunks give autograd's own gradient
    from raykd.losses.uld import sorted_l1

    s2 = S.clone().requires_grad_(True)
    rows = [(b, p) for b in range(2) for p in range(3) if MASK[b, p]]
    plain = sum(sorted_l1(torch.softmax(T[b, p][None], -1), torch.softmax(s2[b, p][None], -1))
                for b, p in rows) / len(rows)
    plain.sum().backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-12)


def test_no_gradient_work_under_no_grad_and_no_real_token_gives_a_graph_zero():
    s = S.clone().requires_grad_(True)
    with torch.no_grad():
        value = uld_loss(s, teacher_logits=T, mask=MASK)
    assert not value.requires_grad
    zero = uld_loss(s, teacher_logits=T, mask=torch.zeros_like(MASK))
    zero.backward()
    assert float(zero.detach()) == 0 and s.grad.abs().sum() == 0


def test_bad_arguments_are_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="teacher_logits / teacher_topk"):
        uld_loss(S)
    with pytest.raises(ValueError, match="mask"):
        uld_loss(S, teacher_logits=T, mask=MASK[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        uld_loss(S, teacher_logits=T, temperature=0)
    with pytest.raises(ValueError, match="teacher_topk"):
        cache = encode_token_topk(T[:1].float(), 2, torch.float32)
        uld_loss(S, teacher_topk=cache)


def _term(params=None, temperature=1.0):
    cfg = LossTermConfig(name="token_uld", params=params or {})
    distill = DistillConfig(losses=[cfg], temperature=temperature)
    return build_term(cfg, distill, [], [])


def test_the_term_reads_the_cache_and_takes_the_distill_temperature():
    cache = encode_token_topk(T.float(), 3, torch.float32)
    term = _term()
    got = term(LossInputs(student_logits=S, teacher_logits=None, labels=None, mask=MASK,
                          teacher_topk=cache))
    assert float(got) == pytest.approx(float(uld_loss(S, teacher_topk=cache, mask=MASK)))
    term = _term(temperature=2.0)
    got = term(LossInputs(student_logits=S, teacher_logits=T, labels=None, mask=MASK))
    assert float(got) == pytest.approx(reference_dense(S, T, MASK, 2.0), rel=1e-9)
    with pytest.raises(ConfigError, match=r"distill.losses.0.params.chunk"):
        _term({"chunk": 0})


def test_distill_loss_adds_ce_and_token_uld_over_different_vocabularies():
    distill = DistillConfig(losses=[LossTermConfig(name="ce", weight=0.5),
                                    LossTermConfig(name="token_uld", weight=0.5)])
    loss = DistillLoss(distill, {}, {})
    labels = torch.tensor([[1, 2, 3, -100], [4, 0, 1, 2]])
    cache = encode_token_topk(T.float(), 3, torch.float32)
    s = S.float().clone().requires_grad_(True)
    total, parts = loss(s, None, labels, {}, {}, mask=labels != -100, teacher_topk=cache)
    total.backward()
    assert set(parts) == {"ce", "token_uld"} and parts["token_uld"] > 0
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_registry_and_losses_table_list_token_uld():
    spec = LOSSES["token_uld"]
    assert spec.family == "language" and "2402.12030" in spec.paper
    row = next(r for r in describe_losses() if r["key"] == "token_uld")
    assert set(row["params"]) == {"temperature", "chunk"}


def test_topk_rows_are_plain_tensors_on_a_bfloat16_student():
    cache = encode_token_topk(T.float(), 2, torch.float16)
    s = S.to(torch.bfloat16).requires_grad_(True)
    value = uld_loss(s, teacher_topk=cache, mask=MASK)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad.float()).all()
    assert isinstance(cache, TokenTopK)


def test_agreement_counts_an_id_beyond_the_students_vocabulary_as_disagreement():
    from raykd.train.lm_eval import agreement_sums

    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    top1 = torch.tensor([[1, 7, 2]])  # id 7: only the (larger) teacher vocabulary has it
    agree, n = agreement_sums(logits, top1, torch.tensor([[True, True, True]]))
    assert (agree, n) == (2.0, 3.0)
