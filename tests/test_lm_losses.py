"""token_kd / token_rkl / token_gkd on a per-token top-k cache (and dense logits) against
references written out by hand: plain Python loops over positions, buckets and formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from raykd.config import ConfigError, DistillConfig, LossTermConfig
from raykd.losses import DistillLoss, LossInputs, build_term
from raykd.losses.token_divergence import (
    bucket_divergence,
    student_bucket_log_probs,
    token_divergence,
)
from raykd.teacher.token_topk import encode_token_topk, teacher_log_probs

MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])  # two sequences of length 5, padded
REAL = [(b, l) for b in range(2) for l in range(5) if MASK[b, l]]
PAD = ~MASK.bool()
V, K = 6, 2


def rand(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


S = rand(2, 5, V, seed=1)
T_LOGITS = rand(2, 5, V, seed=2)


def cache(k=K, teacher=T_LOGITS, dtype=torch.float32):
    return encode_token_topk(teacher.float(), k, dtype)


# ---------------------------------------------------------------- the hand reference

def softmax(z, temp):
    m = max(z)
    e = [math.exp((x - m) / temp) for x in z]
    return [x / sum(e) for x in e]


def teacher_buckets(t_row, k, temp):
    """The teacher's k ids and its k + 1 bucket probabilities at ``temp``: the top-k at T=1
    raised to 1/T, the tail as n equal tokens of the tail's mean probability."""
    p = softmax(t_row, 1.0)
    ids = sorted(range(len(t_row)), key=lambda v: -t_row[v])[:k]
    n = len(t_row) - k
    tail = 1.0 - sum(p[i] for i in ids)
    weights = [p[i] ** (1 / temp) for i in ids] + [n * (tail / n) ** (1 / temp) if n else 0.0]
    return ids, [w / sum(weights) for w in weights]


def student_buckets(s_row, ids, temp):
    q = softmax(s_row, temp)
    return [q[i] for i in ids] + [sum(q[v] for v in range(len(s_row)) if v not in ids)]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def divergence(p, q, kind, beta):
    if kind == "forward" or (kind == "gkd" and beta == 0):
        return kl(p, q)
    if kind == "reverse" or (kind == "gkd" and beta == 1):
        return kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def hand_loss(s, t, k, temp, kind, beta=0.5):
    values = []
    for b, l in REAL:
        ids, p = teacher_buckets(t[b, l].tolist(), k, temp)
        values.append(divergence(p, student_buckets(s[b, l].tolist(), ids, temp), kind, beta))
    return temp ** 2 * sum(values) / len(values)


def loss(kind, temp=1.0, beta=0.5, chunk=2, s=S, topk=None, **kw):
    if "teacher_logits" not in kw:
        kw["teacher_topk"] = cache() if topk is None else topk
    return token_divergence(s, kind=kind, temperature=temp, mask=kw.pop("mask", MASK),
                            beta=beta, chunk=chunk, **kw)


CASES = [("forward", 0.5), ("reverse", 0.5), ("gkd", 0.5), ("gkd", 0.1), ("gkd", 0.9),
         ("gkd", 0.0), ("gkd", 1.0)]


# ---------------------------------------------------------------- values

@pytest.mark.parametrize("kind, beta", CASES)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_cached_losses_match_the_hand_reference(kind, beta, temp):
    value = loss(kind, temp, beta).item()
    assert value == pytest.approx(hand_loss(S, T_LOGITS, K, temp, kind, beta), rel=2e-6)


@pytest.mark.parametrize("kind, beta", CASES[:3])
def test_chunked_equals_unchunked_in_value_and_gradient(kind, beta):
    results = []
    for chunk in (1, 2, 3, 5, 100):
        s = S.clone().requires_grad_()
        value = loss(kind, 2.0, beta, chunk, s=s)
        value.backward()
        results.append((value.item(), s.grad))
    for value, grad in results[1:]:
        assert value == pytest.approx(results[0][0], rel=1e-12)
        assert torch.allclose(grad, results[0][1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["forward", "reverse", "gkd"])
def test_padding_garbage_changes_nothing(kind):
    s = S.clone().requires_grad_()
    before = loss(kind, 2.0, s=s)
    before.backward()
    garbage = S.clone()
    garbage[PAD] = float("nan")  # never read: padding rows are skipped, not masked after
    g = garbage.requires_grad_()
    topk = cache()
    topk.values[PAD] = 1e4
    topk.ids[PAD] = 5
    topk.tail_logmass[PAD] = 0.0  # "all mass in the tail": a -inf top-k if it were read
    after = loss(kind, 2.0, s=g, topk=topk)
    after.backward()
    assert after.item() == pytest.approx(before.item(), rel=1e-12)
    assert torch.equal(g.grad, s.grad) and (g.grad[PAD] == 0).all()


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_k_equal_to_vocab_is_the_dense_kl(temp):
    log_q = F.log_softmax(S / temp, -1)
    log_p = F.log_softmax(T_LOGITS / temp, -1)
    m = MASK.bool()
    forward = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)[m].mean()
    reverse = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)[m].mean()
    dense = cache(k=V)
    assert loss("forward", temp, topk=dense).item() == pytest.approx(temp**2 * forward.item(),
                                                                     rel=2e-6)
    assert loss("reverse", temp, topk=dense).item() == pytest.approx(temp**2 * reverse.item(),
                                                                     rel=2e-6)
    # the dense-logits path agrees with the same formula in float64
    rkl = loss("reverse", temp, teacher_logits=T_LOGITS).item()
    assert rkl == pytest.approx(temp**2 * reverse.item(), rel=1e-12)
    gkd = loss("gkd", temp, 0.3, topk=dense).item()
    assert gkd == pytest.approx(hand_loss(S, T_LOGITS, V, temp, "gkd", 0.3), rel=2e-6)


def test_gkd_tends_to_forward_kl_as_beta_to_0_and_reverse_kl_as_beta_to_1():
    # REFERENCES: JSD_β → forward KL as β → 0, reverse KL (scaled) as β → 1: JSD_β ≈ β·KL(p‖q)
    # and ≈ (1−β)·KL(q‖p); the endpoints themselves are the unscaled KLs (TRL's convention).
    dense = {"teacher_logits": T_LOGITS}
    forward, reverse = loss("forward", **dense).item(), loss("reverse", **dense).item()
    gaps = {}
    for beta in (1e-4, 1e-6):  # the gap closes linearly in β
        gaps[beta] = (loss("gkd", beta=beta, **dense).item() / beta / forward - 1,
                      loss("gkd", beta=1 - beta, **dense).item() / beta / reverse - 1)
    assert abs(gaps[1e-6][0]) < 1e-4 and abs(gaps[1e-6][1]) < 1e-4
    assert abs(gaps[1e-6][0]) < abs(gaps[1e-4][0]) / 50
    assert abs(gaps[1e-6][1]) < abs(gaps[1e-4][1]) / 50
    assert loss("gkd", beta=0.0, **dense).item() == pytest.approx(forward, rel=1e-12)
    assert loss("gkd", beta=1.0, **dense).item() == pytest.approx(reverse, rel=1e-12)
    assert forward != pytest.approx(reverse, rel=1e-2)  # the two limits are told apart


# ---------------------------------------------------------------- gradients

def plain_loss(s, kind, temp, beta):
    """The cached loss with plain autograd, unchunked: hand teacher buckets as constants."""
    total = 0.0
    for b, l in REAL:
        ids, p = teacher_buckets(T_LOGITS[b, l].tolist(), K, temp)
        q = torch.softmax(s[b, l] / temp, -1)
        q = torch.cat((q[ids], (1 - q[ids].sum()).reshape(1)))
        p = torch.tensor(p, dtype=torch.float64)
        if kind == "forward":
            total = total + (p * (p / q).log()).sum()
        elif kind == "reverse":
            total = total + (q * (q / p).log()).sum()
        else:
            m = beta * p + (1 - beta) * q
            total = total + beta * (p * (p / m).log()).sum() \
                + (1 - beta) * (q * (q / m).log()).sum()
    return temp ** 2 * total / len(REAL)


@pytest.mark.parametrize("kind, beta", CASES[:5])
def test_gradients_equal_plain_autograd_on_real_tokens_and_are_zero_on_padding(kind, beta):
    s = S.clone().requires_grad_()
    loss(kind, 2.0, beta, s=s).backward()
    ref = S.clone().requires_grad_()
    plain_loss(ref, kind, 2.0, beta).backward()
    assert torch.isfinite(s.grad).all() and s.grad[~PAD].abs().sum() > 0
    assert torch.allclose(s.grad, ref.grad, rtol=1e-5, atol=1e-7)
    assert (s.grad[PAD] == 0).all()


@pytest.mark.parametrize("kind", ["forward", "reverse", "gkd"])
def test_bf16_students_empty_tails_and_zero_tail_mass_give_finite_values_and_gradients(kind):
    bf16 = S.to(torch.bfloat16).requires_grad_()
    value = loss(kind, 2.0, s=bf16)
    value.backward()
    assert value.dtype == torch.float32 and bf16.grad.dtype == torch.bfloat16
    assert value.item() == pytest.approx(loss(kind, 2.0).item(), rel=2e-2)
    assert torch.isfinite(bf16.grad).all() and bf16.grad.float().abs().sum() > 0
    # k == V: a -inf tail bucket on both sides; a teacher whose tail logits are -inf: k < V but
    # tail mass exactly 0 (tail_logmass -inf)
    peaked = T_LOGITS.clone()
    peaked[..., K:] = float("-inf")
    for topk in (cache(k=V), cache(teacher=peaked)):
        s = S.clone().requires_grad_()
        value = loss(kind, 1.0, s=s, topk=topk)
        value.backward()
        assert math.isfinite(value.item()) and torch.isfinite(s.grad).all()
    assert torch.isneginf(cache(teacher=peaked).tail_logmass).all()


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def test_no_gradient_work_under_no_grad():
    s = S.clone().requires_grad_()
    seen = {}
    for grad_mode in (True, False):
        spy = _OpNames()
        with spy, torch.set_grad_enabled(grad_mode):
            loss("forward", 2.0, s=s)
        seen[grad_mode] = spy.names
    # the hand-written gradient: e scaled by each row's tail coefficient (mul_), written into
    # the student-shaped buffer (index_put_); autograd's seed for the bucket part (ones_like)
    grad_ops = {"mul_", "index_put_", "ones_like"}
    assert grad_ops <= seen[True]
    assert not grad_ops & seen[False]


class _Float32Sizes(TorchDispatchMode):
    """The largest float32 tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_float32_tensor_of_the_whole_batch_is_built():
    b, length, vocab = 2, 16, 40
    s = rand(b, length, vocab, seed=5).to(torch.bfloat16).requires_grad_()
    topk = encode_token_topk(rand(b, length, vocab, seed=6).float(), 4, torch.float16)
    sizes = {}
    for chunk in (4, length):
        spy = _Float32Sizes()
        with spy:
            token_divergence(s, kind="gkd", temperature=2.0, teacher_topk=topk,
                             chunk=chunk).backward()
        sizes[chunk] = spy.largest
    assert sizes[length] >= b * length * vocab  # unchunked: the spy sees the whole batch
    assert sizes[4] <= 2 * b * 4 * (vocab + 1)  # chunked: a chunk (the gkd stack's 2×) at most


# ---------------------------------------------------------------- the terms

def build(name, temperature=2.0, **params):
    cfg = LossTermConfig(name=name, params=params)
    return build_term(cfg, DistillConfig(temperature=temperature, losses=[cfg]), [], [])


@pytest.mark.parametrize("name, kind, params", [
    ("token_kd", "forward", {}), ("token_rkl", "reverse", {}),
    ("token_gkd", "gkd", {"beta": 0.3}), ("token_gkd", "gkd", {})])
def test_terms_read_the_cache_and_match_the_hand_reference(name, kind, params):
    term = build(name, chunk=3, **params)
    value = term(LossInputs(S, None, None, mask=MASK, teacher_topk=cache())).item()
    beta = params.get("beta", 0.5)
    assert value == pytest.approx(hand_loss(S, T_LOGITS, K, 2.0, kind, beta), rel=2e-6)


def test_token_kd_with_dense_logits_is_unchanged_and_k_equal_vocab_agrees():
    term = build("token_kd")
    dense = term(LossInputs(S, T_LOGITS, None, mask=MASK)).item()
    full = term(LossInputs(S, None, None, mask=MASK, teacher_topk=cache(k=V))).item()
    assert full == pytest.approx(dense, rel=2e-6)
    with pytest.raises(ValueError, match=r"\(exactly one\), got both"):
        term(LossInputs(S, T_LOGITS, None, mask=MASK, teacher_topk=cache()))
    with pytest.raises(ValueError, match=r"\(exactly one\), got neither"):
        term(LossInputs(S, None, None, mask=MASK))


def test_distill_loss_passes_the_cache_to_its_terms():
    distill = DistillConfig(temperature=2.0, losses=[{"name": "token_rkl"},
                                                     {"name": "token_gkd", "weight": 0.5}])
    total, values = DistillLoss(distill, {}, {})(S, None, None, {}, {}, mask=MASK,
                                                 teacher_topk=cache())
    assert values["token_rkl"] == pytest.approx(hand_loss(S, T_LOGITS, K, 2.0, "reverse"),
                                                rel=2e-6)
    assert total.item() == pytest.approx(values["token_rkl"] + 0.5 * values["token_gkd"])


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("params, field", [({"beta": 1.5}, "beta: must be <= 1"),
                                           ({"beta": -0.1}, "beta: must be >= 0"),
                                           ({"chunk": 0}, "chunk: must be > 0")])
def test_bad_params_are_config_errors_naming_the_field(params, field):
    with pytest.raises(ConfigError, match=rf"distill\.losses\.0\.params\.{field}"):
        build("token_gkd", **params)


@pytest.mark.parametrize("change, field", [
    ({"beta": 1.01}, "beta"), ({"beta": -1e-9}, "beta"), ({"chunk": 0}, "chunk"),
    ({"temp": 0.0}, "temperature"), ({"kind": "js"}, "kind"),
    ({"mask": MASK[:, :4]}, "mask"), ({"s": S[:, :4]}, "teacher_topk"),
    ({"s": S[..., :5]}, "teacher_topk"), ({"s": S[0]}, "student_logits"),
    ({"teacher_logits": T_LOGITS[:, :4]}, "teacher_logits")])
def test_bad_arguments_are_value_errors_naming_the_argument(change, field):
    kw = {"kind": "gkd", "temp": 1.0, "beta": 0.5, "chunk": 2, "s": S}
    kw.update(change)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        loss(**kw)


def test_both_or_neither_teacher_is_refused():
    with pytest.raises(ValueError, match=r"^teacher_logits / teacher_topk: .* both"):
        token_divergence(S, kind="forward", temperature=1.0, teacher_logits=T_LOGITS,
                         teacher_topk=cache())
    with pytest.raises(ValueError, match=r"^teacher_logits / teacher_topk: .* neither"):
        token_divergence(S, kind="forward", temperature=1.0)


def test_reverse_kl_against_a_teacher_with_zero_tail_mass_uses_the_documented_floor():
    # Teacher logits -inf outside its top-2: its tail mass is exactly 0 and KL(q‖p) would be
    # +inf; the teacher's log is floored at log(float32 tiny) = -87.336..., so by hand the tail
    # bucket contributes q_tail·(log q_tail + 87.336...).
    peaked = T_LOGITS.clone()
    peaked[..., K:] = float("-inf")
    floor = math.log(2.0 ** -126)
    values = []
    for b, l in REAL:
        p = softmax(peaked[b, l, :K].tolist(), 1.0)
        q = softmax(S[b, l].tolist(), 1.0)
        tail = sum(q[K:])
        values.append(sum(q[i] * math.log(q[i] / p[i]) for i in range(K))
                      + tail * (math.log(tail) - floor))
    got = loss("reverse", 1.0, topk=cache(teacher=peaked)).item()
    assert got == pytest.approx(sum(values) / len(values), rel=1e-6)


def test_rows_move_between_devices_with_their_dtypes():
    moved = cache(dtype=torch.bfloat16).to("cpu")
    assert moved.ids.dtype == torch.uint8 and moved.values.dtype == torch.bfloat16
    assert torch.equal(moved.values, cache(dtype=torch.bfloat16).values)


@pytest.mark.parametrize("kind, beta", CASES[:5])
@pytest.mark.parametrize("dtype, confident", [(torch.float64, 0.0), (torch.float64, 2000.0),
                                              (torch.float32, 0.0), (torch.float32, 300.0)])
def test_hand_written_gradient_equals_autograd_through_the_logsumexp_buckets(kind, beta, dtype,
                                                                             confident):
    """No padding and one chunk (the gradient is the buffer itself); ``confident`` puts the
    student that far above its tail on the teacher's top-k at some positions, so the tail sum
    underflows there (at T = 2: e^-1000 in float64, e^-150 in float32) and those rows take the
    logsumexp path; without it the forward KL there is off by float32's largest number."""
    topk = cache(teacher=rand(3, 4, V, seed=8))
    s = rand(3, 4, V, seed=7)
    ids = topk.ids.long()
    s[:2].scatter_add_(-1, ids[:2], torch.full_like(ids[:2], confident, dtype=s.dtype))
    s = s.to(dtype)
    got = s.clone().requires_grad_()
    value = token_divergence(got, kind=kind, temperature=2.0, teacher_topk=topk, beta=beta,
                             chunk=4)
    value.backward()
    ref = s.clone().requires_grad_()
    log_top, log_tail = teacher_log_probs(topk, 2.0)
    log_p = torch.cat((log_top, log_tail.unsqueeze(-1)), -1).to(dtype)
    log_q = student_bucket_log_probs(ref / 2.0, ids)
    expected = 4.0 * bucket_divergence(log_p, log_q, kind, beta).mean()
    expected.backward()
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4,
                                                                          "atol": 1e-6}
    assert value.item() == pytest.approx(expected.item(), rel=tol["rtol"], abs=tol["atol"])
    assert torch.isfinite(got.grad).all()
    assert torch.allclose(got.grad, ref.grad, **tol)


def test_agreement_counts_real_tokens_where_the_students_top_is_the_teachers():
    from raykd.train.lm_eval import agreement_sums

    logits = rand(2, 5, V, seed=11)
    teacher_top1 = logits.argmax(-1).to(torch.int16)  # the stored ids' narrow type
    teacher_top1[0, 0] = (teacher_top1[0, 0] + 1) % V  # two disagreements, one on padding
    teacher_top1[1, 4] = (teacher_top1[1, 4] + 1) % V
    mask = MASK.bool()
    expected = int(((logits.argmax(-1) == teacher_top1.long()) & mask).sum())
    assert agreement_sums(logits, teacher_top1, mask) == (expected, int(mask.sum()))
    assert agreement_sums(logits, teacher_top1, None) == (8.0, 10.0)


def test_a_second_backward_through_the_same_loss_is_a_clear_error():
    s = S.clone().requires_grad_()
    value = loss("forward", 1.0, s=s)
    value.backward(retain_graph=True)
    first = s.grad.clone()
    with pytest.raises(RuntimeError, match="token_divergence: its gradient was already taken"):
        value.backward()
    assert torch.equal(s.grad, first)  # nothing added by the refused call


# ---------------------------------------------------------------- ce fused with the divergence

LABELS = torch.tensor([[3, 0, -100, 1, 2], [5, 4, 4, 2, -100]])  # -100 on a real token too


def fused_and_apart(losses, temperature=1.0, labels=LABELS, topk=None, chunk=2, kind_ops=None):
    """(total, values, gradient) of one DistillLoss step fused, then with the fusion off, and
    the aten ops the fused step ran."""
    results = []
    for fuse in (True, False):
        distill = DistillConfig(temperature=temperature, losses=losses)
        loss = DistillLoss(distill, {}, {})
        for term in loss.terms:
            if hasattr(term, "chunk"):
                term.chunk = chunk
        if not fuse:
            loss.fused_ce = None
        s = S.clone().requires_grad_()
        spy = _OpNames()
        with spy:
            total, values = loss(s, None, labels, {}, {}, mask=MASK,
                                 teacher_topk=cache() if topk is None else topk)
        total.backward()
        results.append((total.item(), values, s.grad, spy.names))
    return results


@pytest.mark.parametrize("token", [{"name": "token_kd", "weight": 0.7},
                                   {"name": "token_rkl", "weight": 0.7},
                                   {"name": "token_gkd", "weight": 0.7, "params": {"beta": 0.3}}])
@pytest.mark.parametrize("chunk", [2, 5])
def test_ce_fused_with_a_token_divergence_equals_the_two_apart(token, chunk):
    (f_total, f_values, f_grad, f_ops), (total, values, grad, ops) = fused_and_apart(
        [{"name": "ce", "weight": 0.3}, token], chunk=chunk)
    assert "_log_softmax" in ops and "_log_softmax" not in f_ops  # CE had no pass of its own
    assert f_values.keys() == values.keys() == {"ce", token["name"]}
    for name in values:
        assert f_values[name] == pytest.approx(values[name], rel=1e-12)
    keep = MASK.bool() & (LABELS != -100)  # F.cross_entropy's mean, independently
    ce = F.cross_entropy(S[keep], LABELS[keep]).item()
    assert f_values["ce"] == pytest.approx(ce, rel=1e-12)
    assert f_total == pytest.approx(total, rel=1e-12)
    assert f_total == pytest.approx(0.3 * ce + 0.7 * values[token["name"]], rel=1e-12)
    assert torch.allclose(f_grad, grad, rtol=1e-9, atol=1e-14)
    assert (f_grad[~MASK.bool()] == 0).all()


@pytest.mark.parametrize("case", ["temperature", "smoothing", "no labels", "no cache"])
def test_ce_stays_apart_where_the_fusion_does_not_apply(case):
    ce = {"name": "ce", "weight": 0.5,
          "params": {"label_smoothing": 0.1} if case == "smoothing" else {}}
    losses = [ce, {"name": "token_kd", "weight": 0.5}]
    distill = DistillConfig(temperature=2.0 if case == "temperature" else 1.0, losses=losses)
    loss = DistillLoss(distill, {}, {})
    labels = torch.full_like(LABELS, -100) if case == "no labels" else LABELS
    spy = _OpNames()
    with spy:
        if case == "no cache":
            total, values = loss(S, T_LOGITS, labels, {}, {}, mask=MASK)
        else:
            total, values = loss(S, None, labels, {}, {}, mask=MASK, teacher_topk=cache())
    assert "_log_softmax" in spy.names  # F.cross_entropy ran
    assert set(values) == {"ce", "token_kd"}
    if case == "no labels":  # as F.cross_entropy: no label, no mean
        assert math.isnan(values["ce"])
    else:
        assert math.isfinite(total.item())
