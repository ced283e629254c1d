"""token_kd, distilbert_cos, tinybert_* against their papers' formulas written out by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from raykd.config import ConfigError, DistillConfig, LossTermConfig
from raykd.losses import LossInputs, build_term

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # two sequences of length 4, padded
REAL = [(b, l) for b in range(2) for l in range(4) if MASK[b, l]]


def build(name, s_shapes=(), t_shapes=(), temperature=4.0, **params):
    cfg = LossTermConfig(name=name, params=params,
                         student_layers=[f"s{i}" for i in range(len(s_shapes))],
                         teacher_layers=[f"t{i}" for i in range(len(t_shapes))])
    term = build_term(cfg, DistillConfig(temperature=temperature, losses=[cfg]),
                      [torch.Size(s) for s in s_shapes], [torch.Size(t) for t in t_shapes])
    return term.double()


def rand(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def feats(s, t, mask=None):
    return LossInputs(None, None, None, student_feats=list(s), teacher_feats=list(t), mask=mask)


def has_grad(*tensors):
    return all(x.grad is not None and x.grad.abs().sum() > 0 for x in tensors)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


# ---------------------------------------------------------------- token_kd

def hand_token_kd(s, t, temp):
    kls = []
    for b, l in REAL:
        p, q = softmax(t[b, l] / temp), softmax(s[b, l] / temp)
        kls.append(sum(p[v] * math.log(p[v] / q[v]) for v in range(len(p))))
    return temp**2 * sum(kls) / len(kls)


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_token_kd_matches_hand_per_token_kl_over_real_tokens(temp):
    s, t = rand(2, 4, 6, seed=1), rand(2, 4, 6, seed=2)
    term = build("token_kd", temperature=temp)
    value = term(LossInputs(s, t, None, mask=MASK)).item()
    assert value == pytest.approx(hand_token_kd(s.numpy(), t.numpy(), temp), rel=1e-10)


def test_token_kd_ignores_masked_positions():
    s, t = rand(2, 4, 6, seed=1), rand(2, 4, 6, seed=2)
    term = build("token_kd")
    before = term(LossInputs(s, t, None, mask=MASK)).item()
    s2, t2 = s.clone(), t.clone()
    s2[~MASK.bool()] = 100 * rand(3, 6, seed=3)
    t2[~MASK.bool()] = -50 * rand(3, 6, seed=4)
    assert term(LossInputs(s2, t2, None, mask=MASK)).item() == pytest.approx(before, rel=1e-12)


def test_token_kd_gradient_only_on_real_tokens_and_zero():
    s, t = rand(2, 4, 6, seed=1, grad=True), rand(2, 4, 6, seed=2, grad=True)
    term = build("token_kd")
    term(LossInputs(s, t, None, mask=MASK)).backward()
    assert has_grad(s) and t.grad is None
    assert s.grad[~MASK.bool()].abs().sum() == 0
    same = term(LossInputs(s, s.detach().clone(), None, mask=MASK)).item()
    assert same == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- distilbert_cos

def hand_cos_loss(s, t):
    vals = []
    for b, l in REAL:
        x, y = s[b, l], t[b, l]
        vals.append(1 - float(np.dot(x, y)) / (np.linalg.norm(x) * np.linalg.norm(y)))
    return sum(vals) / len(vals)


def test_distilbert_cos_matches_hand_cosine_embedding_loss():
    s, t = rand(2, 4, 5, seed=1), rand(2, 4, 5, seed=2)
    term = build("distilbert_cos", [s.shape], [t.shape])
    assert isinstance(term.projections[0], torch.nn.Identity)
    value = term(feats([s], [t], MASK)).item()
    assert value == pytest.approx(hand_cos_loss(s.numpy(), t.numpy()), rel=1e-10)


def test_distilbert_cos_projects_a_narrower_student_and_trains_it():
    s, t = rand(2, 4, 3, seed=1, grad=True), rand(2, 4, 5, seed=2, grad=True)
    term = build("distilbert_cos", [s.shape], [t.shape])
    proj = term.projections[0]
    w, bias = proj.weight.detach().numpy(), proj.bias.detach().numpy()
    mapped = np.einsum("oh,blh->blo", w, s.detach().numpy()) + bias
    value = term(feats([s], [t], MASK))
    assert value.item() == pytest.approx(hand_cos_loss(mapped, t.detach().numpy()), rel=1e-10)
    value.backward()
    assert has_grad(s, proj.weight) and t.grad is None


def test_distilbert_cos_zero_when_equal():
    s = rand(2, 4, 5, seed=1)
    term = build("distilbert_cos", [s.shape], [s.shape])
    assert term(feats([s], [s.clone()], MASK)).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- tinybert_hidden / _emb

@pytest.mark.parametrize("key", ["tinybert_hidden", "tinybert_emb"])
def test_tinybert_mse_with_learned_w_matches_hand(key):
    s, t = rand(2, 4, 3, seed=1), rand(2, 4, 5, seed=2)
    term = build(key, [s.shape], [t.shape])
    lin = term.maps[0]
    w, bias = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    sn, tn = s.numpy(), t.numpy()
    sq = [sum((float(np.dot(w[o], sn[b, l])) + bias[o] - tn[b, l, o]) ** 2 for o in range(5))
          for b, l in REAL]
    expected = sum(sq) / (len(REAL) * 5)
    assert term(feats([s], [t], MASK)).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("key", ["tinybert_hidden", "tinybert_emb"])
def test_tinybert_w_is_learned_even_for_equal_widths_and_gets_gradients(key):
    s, t = rand(2, 4, 5, seed=1, grad=True), rand(2, 4, 5, seed=2, grad=True)
    term = build(key, [s.shape, s.shape], [t.shape, t.shape])
    assert all(isinstance(m, torch.nn.Linear) for m in term.maps)
    term(feats([s, s], [t, t], MASK)).backward()
    assert has_grad(s, term.maps[0].weight, term.maps[1].weight) and t.grad is None


@pytest.mark.parametrize("key", ["tinybert_hidden", "tinybert_emb"])
def test_tinybert_zero_with_identity_w(key):
    s = rand(2, 4, 5, seed=1)
    term = build(key, [s.shape], [s.shape], connector="identity")
    assert term(feats([s], [s.clone()], MASK)).item() == 0.0


def test_tinybert_rejects_different_sequence_lengths():
    with pytest.raises(ConfigError, match=r"tinybert_hidden needs the same sequence length.*"
                                          r"student s0 \[4, 5\] vs teacher t0 \[6, 5\]"):
        build("tinybert_hidden", [(2, 4, 5)], [(2, 6, 5)])


# ---------------------------------------------------------------- tinybert_attn

def hand_attn(s, t, mask=None):
    """Mean squared difference of scores over (batch, head, real query, real key); heads are
    averaged first when their counts differ; scores <= -100 count as 0."""
    s = np.where(s <= -100, 0.0, s)
    t = np.where(t <= -100, 0.0, t)
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdims=True), t.mean(1, keepdims=True)
    b, h, n, _ = s.shape
    total, count = 0.0, 0
    for i, k, q, key in itertools.product(range(b), range(h), range(n), range(n)):
        if mask is None or (mask[i, q] and mask[i, key]):
            total += (s[i, k, q, key] - t[i, k, q, key]) ** 2
            count += 1
    return total / count


def test_tinybert_attn_matches_hand_mse_on_scores():
    s, t = rand(2, 2, 4, 4, seed=1), rand(2, 2, 4, 4, seed=2)
    term = build("tinybert_attn", [s.shape], [t.shape])
    assert term(feats([s], [t])).item() == pytest.approx(hand_attn(s.numpy(), t.numpy()),
                                                         rel=1e-10)
    masked = term(feats([s], [t], MASK)).item()
    assert masked == pytest.approx(hand_attn(s.numpy(), t.numpy(), MASK.numpy()), rel=1e-10)


def test_tinybert_attn_averages_heads_when_counts_differ_and_zeroes_mask_scores():
    s, t = rand(2, 2, 4, 4, seed=1), rand(2, 4, 4, 4, seed=2)
    t[:, :, :, 3] = -10000.0  # BERT's additive padding mask on the last key
    term = build("tinybert_attn", [s.shape], [t.shape])
    assert term(feats([s], [t])).item() == pytest.approx(hand_attn(s.numpy(), t.numpy()),
                                                         rel=1e-10)


def test_tinybert_attn_gradient_and_zero():
    s, t = rand(2, 2, 4, 4, seed=1, grad=True), rand(2, 2, 4, 4, seed=2, grad=True)
    term = build("tinybert_attn", [s.shape], [t.shape])
    term(feats([s], [t], MASK)).backward()
    assert has_grad(s) and t.grad is None
    assert term(feats([s], [s.detach().clone()], MASK)).item() == 0.0
