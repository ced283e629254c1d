"""ce, kd, dkd against their papers' formulas written out by hand (numpy, loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raykd.config import DistillConfig, LossTermConfig
from raykd.losses import LossInputs, build_term
from raykd.losses.response import soft_kl


def build(name, temperature=4.0, **params):
    cfg = LossTermConfig(name=name, params=params)
    return build_term(cfg, DistillConfig(temperature=temperature, losses=[cfg]), [], [])


def inputs(s=None, t=None, y=None, mask=None, epoch=0):
    return LossInputs(student_logits=s, teacher_logits=t, labels=y, mask=mask, epoch=epoch)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def hand_kl(p, q):  # KL(p ‖ q) = Σ p log(p / q)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


S = np.array([[2.0, 1.0, 0.1, -1.0], [0.5, 0.3, 2.2, 0.0], [-1.0, 0.0, 1.0, 3.0]])
T = np.array([[3.0, 0.5, 0.0, -2.0], [0.0, 1.0, 1.5, 0.5], [0.0, 0.0, 0.5, 2.0]])
Y = np.array([0, 2, 1])


def tensors(requires_grad=True):
    s = torch.tensor(S, dtype=torch.float64, requires_grad=requires_grad)
    t = torch.tensor(T, dtype=torch.float64, requires_grad=requires_grad)
    return s, t, torch.tensor(Y)


# ---------------------------------------------------------------- ce

def test_ce_matches_hand_negative_log_likelihood():
    s, _, y = tensors()
    expected = np.mean([-math.log(softmax(S[i])[Y[i]]) for i in range(len(S))])
    assert build("ce")(inputs(s, None, y)).item() == pytest.approx(expected, rel=1e-12)


def test_ce_gradient_reaches_student_logits():
    s, _, y = tensors()
    build("ce")(inputs(s, None, y)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_ce_on_tokens_ignores_padding():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (2, 3))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    value = build("ce")(inputs(s, None, y, mask))
    rows = [(0, 0), (0, 1), (1, 0)]
    expected = np.mean([-math.log(softmax(s[b, l].detach().numpy())[y[b, l]]) for b, l in rows])
    assert value.item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- kd

def hand_kd(s, t, temp):
    return temp**2 * np.mean([hand_kl(softmax(t[i] / temp), softmax(s[i] / temp))
                              for i in range(len(s))])


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0, 20.0])
def test_kd_is_t_squared_times_hand_kl(temp):
    s, t, _ = tensors()
    value = build("kd", temperature=temp)(inputs(s, t)).item()
    assert value == pytest.approx(hand_kd(S, T, temp), rel=1e-10)
    kl_only = np.mean([hand_kl(softmax(T[i] / temp), softmax(S[i] / temp)) for i in range(3)])
    assert value / temp**2 == pytest.approx(kl_only, rel=1e-10)


def test_kd_t_squared_keeps_the_high_temperature_limit():
    # Hinton §2.1: for large T, T²·KL → mean over samples of Σ(Δz − mean Δz)² / (2C); without the
    # T² factor the loss would vanish like 1/T².
    s, t, _ = tensors()
    c = S.shape[1]
    d = (S - S.mean(1, keepdims=True)) - (T - T.mean(1, keepdims=True))
    limit = np.mean((d**2).sum(1) / (2 * c))
    at_1000 = build("kd", temperature=1000.0)(inputs(s, t)).item()
    at_2000 = build("kd", temperature=2000.0)(inputs(s, t)).item()
    assert at_1000 == pytest.approx(limit, rel=1e-2)
    assert at_2000 == pytest.approx(limit, rel=5e-3)


def test_kd_own_temperature_param_beats_distill_temperature():
    s, t, _ = tensors()
    cfg = LossTermConfig(name="kd", params={"temperature": 2.0})
    term = build_term(cfg, DistillConfig(temperature=4.0, losses=[cfg]), [], [])
    value = term(inputs(s, t)).item()
    assert value == pytest.approx(hand_kd(S, T, 2.0), rel=1e-10)


def test_kd_gradient_reaches_student_not_teacher():
    s, t, _ = tensors()
    build("kd")(inputs(s, t)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_is_zero_when_student_equals_teacher():
    s, _, _ = tensors()
    assert build("kd")(inputs(s, s.detach().clone())).item() == pytest.approx(0.0, abs=1e-12)


def test_kd_survives_top_k_teacher_with_minus_inf():
    s, t, _ = tensors()
    t = t.detach().clone()
    t[:, -1] = float("-inf")
    value = build("kd")(inputs(s, t))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- kd: the fused term vs kl_div
# soft_kl computes the term in one fused pass with a closed-form backward; here it is checked,
# value AND gradient, against torch's own kl_div written the textbook way, on fixed random
# logits: both CPU paths (exp of the log-probabilities below 128 classes, a softmax pass from
# 128 on), token masks, -inf teacher entries and half-precision teachers.

def reference_kd(s, t, temp, mask=None):
    """F.kl_div(log_softmax(s/T), softmax(t/T), batchmean)·T² over the kept rows."""
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]).to(s.dtype)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s, t = s[keep], t[keep]
    return F.kl_div(F.log_softmax(s / temp, dim=-1), F.softmax(t / temp, dim=-1),
                    reduction="batchmean") * temp**2


def random_logits(*shape, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def value_and_grad(fn, s, *args, upstream=1.0):
    s = s.detach().clone().requires_grad_(True)
    value = fn(s, *args)
    (value * upstream).backward()
    return value.detach(), s.grad


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.float64: dict(rtol=1e-10, atol=1e-14)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(128, 10), (3, 4), (64, 100), (16, 130), (8, 1000)])
@pytest.mark.parametrize("temp", [1.0, 2.5, 4.0])
def test_fused_kd_equals_kl_div_in_value_and_gradient(shape, temp, dtype):
    s, t = random_logits(*shape, seed=1, dtype=dtype), random_logits(*shape, seed=2, dtype=dtype)
    value, grad = value_and_grad(soft_kl, s, t, temp, upstream=0.9)
    ref_value, ref_grad = value_and_grad(reference_kd, s, t, temp, upstream=0.9)
    assert value.dtype == dtype and grad.dtype == dtype
    torch.testing.assert_close(value, ref_value, **TOL[dtype])
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])
    # and the closed form the backward uses: T·(softmax(s/T) − softmax(t/T)) / N, times upstream
    closed = 0.9 * temp * (F.softmax(s / temp, -1) - F.softmax(t / temp, -1)) / shape[0]
    torch.testing.assert_close(grad, closed, **TOL[dtype])


@pytest.mark.parametrize("classes", [10, 200])
def test_fused_kd_on_masked_tokens_equals_kl_div_over_real_tokens(classes):
    s = random_logits(3, 5, classes, seed=3)
    t = random_logits(3, 5, classes, seed=4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    t[0, 4] = float("nan")  # padding may hold anything: it is dropped before any work
    t[1, 1:] = float("-inf")
    value, grad = value_and_grad(soft_kl, s, t, 2.0, mask)
    ref_value, ref_grad = value_and_grad(reference_kd, s, t, 2.0, mask)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert (grad[~mask.bool()] == 0).all() and torch.isfinite(grad).all()
    # through the term, as DistillLoss calls it (token_kd shares soft_kl)
    term_value, term_grad = value_and_grad(
        lambda s_: build("kd", temperature=2.0)(inputs(s_, t, mask=mask)), s)
    assert torch.equal(term_value, value) and torch.equal(term_grad, grad)


def test_fused_kd_with_every_token_masked_is_a_differentiable_zero():
    s, t = random_logits(2, 3, 7, seed=5), random_logits(2, 3, 7, seed=6)
    value, grad = value_and_grad(soft_kl, s, t, 4.0, torch.zeros(2, 3))
    assert value.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("classes", [10, 300])
def test_fused_kd_with_minus_inf_teacher_entries_equals_kl_div(classes):
    # a top-k teacher: every class outside each row's top 3 dropped to -inf (probability 0)
    s, t = random_logits(32, classes, seed=7), random_logits(32, classes, seed=8)
    top = t.topk(3, dim=-1).indices
    t = torch.full_like(t, float("-inf")).scatter(-1, top, t.gather(-1, top))
    value, grad = value_and_grad(soft_kl, s, t, 4.0)
    ref_value, ref_grad = value_and_grad(reference_kd, s, t, 4.0)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("teacher_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("classes", [10, 200])
def test_fused_kd_upcasts_half_precision_teacher_logits(teacher_dtype, classes):
    s = random_logits(64, classes, seed=9)
    t = random_logits(64, classes, seed=10, dtype=teacher_dtype)
    t[:, 0] = float("-inf")
    value, grad = value_and_grad(soft_kl, s, t, 4.0)
    ref_value, ref_grad = value_and_grad(reference_kd, s, t.float(), 4.0)  # exact upcast first
    assert value.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_fused_kd_half_precision_student_computes_in_float32():
    s, t = random_logits(16, 50, seed=11), random_logits(16, 50, seed=12)
    value, grad = value_and_grad(soft_kl, s.bfloat16(), t.half(), 4.0)
    ref_value, ref_grad = value_and_grad(reference_kd, s.bfloat16().float(), t.half().float(),
                                         4.0)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad.bfloat16())


def test_fused_kd_without_autograd_gives_the_same_value():
    s, t = random_logits(8, 20, seed=13), random_logits(8, 20, seed=14)
    with torch.no_grad():
        free = soft_kl(s.requires_grad_(True), t, 3.0)
    torch.testing.assert_close(free, reference_kd(s.detach(), t, 3.0), rtol=1e-5, atol=1e-7)
    assert soft_kl(s.detach(), t, 3.0).requires_grad is False


# ---------------------------------------------------------------- dkd

def hand_tckd_nckd(s, t, y, temp):
    """Zhao et al. 2022 eq. (3)-(4) for one sample, by hand."""
    ps, pt = softmax(s / temp), softmax(t / temp)
    b_s = [ps[y], 1 - ps[y]]
    b_t = [pt[y], 1 - pt[y]]
    tckd = hand_kl(b_t, b_s)
    others = [j for j in range(len(s)) if j != y]
    ns = [ps[j] / (1 - ps[y]) for j in others]
    nt = [pt[j] / (1 - pt[y]) for j in others]
    return tckd, hand_kl(nt, ns), pt[y]


def test_dkd_matches_hand_tckd_and_nckd():
    temp, alpha, beta = 4.0, 1.0, 8.0
    s, t, y = tensors()
    parts = [hand_tckd_nckd(S[i], T[i], Y[i], temp) for i in range(3)]
    expected = temp**2 * (alpha * np.mean([p[0] for p in parts])
                          + beta * np.mean([p[1] for p in parts]))
    value = build("dkd", temperature=temp)(inputs(s, t, y)).item()
    assert value == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("i", [0, 1, 2])
@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_equals_tckd_plus_one_minus_pt_times_nckd(i, temp):
    # arXiv 2203.08679 eq. (6): KD = TCKD + (1 − p_t^T)·NCKD (per sample, same T and T² factor).
    s = torch.tensor(S[i:i + 1], dtype=torch.float64)
    t = torch.tensor(T[i:i + 1], dtype=torch.float64)
    y = torch.tensor(Y[i:i + 1])
    kd = build("kd", temperature=temp)(inputs(s, t, y)).item()
    tckd = build("dkd", temperature=temp, alpha=1.0, beta=0.0)(inputs(s, t, y)).item()
    nckd = build("dkd", temperature=temp, alpha=0.0, beta=1.0)(inputs(s, t, y)).item()
    p_t = softmax(T[i] / temp)[Y[i]]
    assert kd == pytest.approx(tckd + (1 - p_t) * nckd, rel=1e-10)


def test_dkd_warmup_ramps_linearly_from_the_first_epoch():
    s, t, y = tensors()
    term = build("dkd", warmup=4)
    full = build("dkd")(inputs(s, t, y)).item()
    for epoch, factor in [(0, 0.25), (1, 0.5), (3, 1.0), (10, 1.0)]:
        assert term(inputs(s, t, y, epoch=epoch)).item() == pytest.approx(full * factor)


def test_dkd_gradient_reaches_student_not_teacher_and_is_finite():
    s, t, y = tensors()
    build("dkd")(inputs(s, t, y)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
    assert t.grad is None


def test_dkd_is_zero_when_student_equals_teacher():
    s, _, y = tensors()
    assert build("dkd")(inputs(s, s.detach().clone(), y)).item() == pytest.approx(0, abs=1e-12)


def test_dkd_stays_finite_for_a_saturated_teacher():
    # mdistiller's torch.log of summed probabilities gives -inf here; the log-space form must not
    s = torch.tensor([[50.0, -50.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-80.0, 80.0, 0.0]])
    value = build("dkd", temperature=1.0)(inputs(s, t, torch.tensor([0])))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def test_dkd_on_tokens_skips_padding_and_ignored_labels():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([[1, 4, 0], [2, -100, 3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rows = [(0, 0), (0, 1), (1, 0), (1, 2)]  # (1, 1) has label -100, (0, 2) is padding
    flat_s = torch.stack([s[b, l] for b, l in rows])
    flat_t = torch.stack([t[b, l] for b, l in rows])
    flat_y = torch.tensor([int(y[b, l]) for b, l in rows])
    term = build("dkd")
    expected = term(inputs(flat_s, flat_t, flat_y)).item()
    assert term(inputs(s, t, y, mask)).item() == pytest.approx(expected, rel=1e-12)
