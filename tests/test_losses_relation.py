"""rkd, sp, fsp, pkt against their papers' formulas written out by hand (loops over samples)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from raykd.config import ConfigError, DistillConfig, LossTermConfig
from raykd.losses import LossInputs, build_term


def build(name, s_shapes, t_shapes, **params):
    cfg = LossTermConfig(name=name, params=params,
                         student_layers=[f"s{i}" for i in range(len(s_shapes))],
                         teacher_layers=[f"t{i}" for i in range(len(t_shapes))])
    term = build_term(cfg, DistillConfig(losses=[cfg]), [torch.Size(s) for s in s_shapes],
                      [torch.Size(t) for t in t_shapes])
    return term.double()


def feats(s, t):
    return LossInputs(None, None, None, student_feats=list(s), teacher_feats=list(t))


def rand(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def has_grad(*tensors):
    return all(x.grad is not None and x.grad.abs().sum() > 0 for x in tensors)


def huber(x):  # smooth L1 with δ = 1
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# ---------------------------------------------------------------- rkd

def hand_rkd(s, t, w_d=25.0, w_a=50.0):
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    n = len(s)

    def dist(e):
        d = [[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)]
        off = [d[i][j] for i in range(n) for j in range(n) if i != j]
        mu = sum(off) / len(off)
        return [[d[i][j] / mu for j in range(n)] for i in range(n)]

    def angle(e):
        out = []
        for j, i, k in itertools.product(range(n), repeat=3):  # vertex j, ⟨e_ji, e_jk⟩
            a, b = e[i] - e[j], e[k] - e[j]
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            a = a / na if na > 0 else a
            b = b / nb if nb > 0 else b
            out.append(float(np.dot(a, b)))
        return out

    ds, dt = dist(s), dist(t)
    loss_d = np.mean([huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)])
    loss_a = np.mean([huber(a - b) for a, b in zip(angle(s), angle(t), strict=True)])
    return w_d * loss_d + w_a * loss_a


def test_rkd_matches_hand_distance_and_angle_losses():
    s, t = rand(5, 3, seed=1), rand(5, 2, 2, seed=2) * 3
    term = build("rkd", [s.shape], [t.shape])
    assert term(feats([s], [t])).item() == pytest.approx(hand_rkd(s.numpy(), t.numpy()),
                                                         rel=1e-9)


def test_rkd_weights_are_params():
    s, t = rand(4, 3, seed=1), rand(4, 6, seed=2)
    term = build("rkd", [s.shape], [t.shape], dist_weight=1.0, angle_weight=0.0)
    assert term(feats([s], [t])).item() == pytest.approx(
        hand_rkd(s.numpy(), t.numpy(), 1.0, 0.0), rel=1e-9)


def test_rkd_gradient_and_zero():
    s, t = rand(4, 3, seed=1, grad=True), rand(4, 6, seed=2, grad=True)
    term = build("rkd", [s.shape], [t.shape])
    term(feats([s], [t])).backward()
    assert has_grad(s) and torch.isfinite(s.grad).all() and t.grad is None
    assert term(feats([s], [s.detach().clone()])).item() == pytest.approx(0.0, abs=1e-10)


# ---------------------------------------------------------------- sp

def hand_sp(s, t):
    b = len(s)

    def g(f):
        a = f.reshape(b, -1)
        gram = [[float(np.dot(a[i], a[j])) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in gram]

    gs, gt = g(s), g(t)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_matches_hand_formula():
    s, t = rand(4, 2, 3, 3, seed=1), rand(4, 7, seed=2)
    term = build("sp", [s.shape], [t.shape])
    assert term(feats([s], [t])).item() == pytest.approx(hand_sp(s.numpy(), t.numpy()),
                                                         rel=1e-10)


def test_sp_gradient_and_zero():
    s, t = rand(4, 5, seed=1, grad=True), rand(4, 7, seed=2, grad=True)
    term = build("sp", [s.shape], [t.shape])
    term(feats([s], [t])).backward()
    assert has_grad(s) and t.grad is None
    assert term(feats([s], [s.detach().clone()])).item() == pytest.approx(0.0, abs=1e-14)


def test_relation_terms_need_one_batch():
    with pytest.raises(ConfigError, match="sp needs the same batch size"):
        build("sp", [(4, 5)], [(8, 5)])


# ---------------------------------------------------------------- fsp

def hand_fsp(f1, f2):
    b, c1, h, w = f1.shape
    c2 = f2.shape[1]
    g = np.zeros((b, c1, c2))
    for n, i, j in itertools.product(range(b), range(c1), range(c2)):
        g[n, i, j] = sum(f1[n, i, y, x] * f2[n, j, y, x] for y in range(h) for x in range(w))
    return g / (h * w)


def test_fsp_matches_hand_flow_matrices():
    s1, s2 = rand(2, 2, 3, 3, seed=1), rand(2, 3, 3, 3, seed=2)
    t1, t2 = rand(2, 2, 3, 3, seed=3), rand(2, 3, 3, 3, seed=4)
    term = build("fsp", [s1.shape, s2.shape], [t1.shape, t2.shape])
    diff = hand_fsp(s1.numpy(), s2.numpy()) - hand_fsp(t1.numpy(), t2.numpy())
    assert term(feats([s1, s2], [t1, t2])).item() == pytest.approx((diff**2).mean(), rel=1e-10)


def test_fsp_pools_within_a_pair():
    s1, s2 = rand(2, 2, 4, 4, seed=1), rand(2, 3, 2, 2, seed=2)
    t1, t2 = rand(2, 2, 2, 2, seed=3), rand(2, 3, 2, 2, seed=4)
    term = build("fsp", [s1.shape, s2.shape], [t1.shape, t2.shape])
    s1_pooled = s1.numpy().reshape(2, 2, 2, 2, 2, 2).mean(axis=(3, 5))
    diff = hand_fsp(s1_pooled, s2.numpy()) - hand_fsp(t1.numpy(), t2.numpy())
    assert term(feats([s1, s2], [t1, t2])).item() == pytest.approx((diff**2).mean(), rel=1e-10)


def test_fsp_gradient_and_zero():
    s1, s2 = rand(2, 2, 3, 3, seed=1, grad=True), rand(2, 3, 3, 3, seed=2, grad=True)
    t1, t2 = rand(2, 2, 3, 3, seed=3, grad=True), rand(2, 3, 3, 3, seed=4, grad=True)
    term = build("fsp", [s1.shape, s2.shape], [t1.shape, t2.shape], pretrain_epochs=2)
    term(feats([s1, s2], [t1, t2])).backward()
    assert has_grad(s1, s2) and t1.grad is None and t2.grad is None
    same = [s1.detach().clone(), s2.detach().clone()]
    assert term(feats([s1, s2], same)).item() == pytest.approx(0.0, abs=1e-14)
    assert term.has_pretrain and term.pretrain_epochs == 2


def test_fsp_config_errors():
    with pytest.raises(ConfigError, match=r"fsp needs two paths per pair"):
        build("fsp", [(2, 2, 3, 3)] * 3, [(2, 2, 3, 3)] * 3)
    with pytest.raises(ConfigError, match=r"distill.losses.0: fsp needs matching channel counts"
                                          r".*student s1 \[4, 3, 3\] vs teacher t1 \[3, 3, 3\]"):
        build("fsp", [(2, 2, 3, 3), (2, 4, 3, 3)], [(2, 2, 3, 3), (2, 3, 3, 3)])


# ---------------------------------------------------------------- pkt

def hand_pkt(s, t, eps=1e-7):
    b = len(s)

    def probs(f):
        a = f.reshape(b, -1)
        a = [row / (np.linalg.norm(row) + eps) for row in a]
        k = [[(float(np.dot(a[i], a[j])) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(s), probs(t)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps))
               for i in range(b) for j in range(b)) / b**2


def test_pkt_matches_hand_conditional_kl():
    s, t = rand(5, 4, seed=1), rand(5, 2, 3, seed=2)
    term = build("pkt", [s.shape], [t.shape])
    assert term(feats([s], [t])).item() == pytest.approx(hand_pkt(s.numpy(), t.numpy()),
                                                         rel=1e-9)


def test_pkt_gradient_and_zero():
    s, t = rand(5, 4, seed=1, grad=True), rand(5, 6, seed=2, grad=True)
    term = build("pkt", [s.shape], [t.shape])
    term(feats([s], [t])).backward()
    assert has_grad(s) and t.grad is None
    assert term(feats([s], [s.detach().clone()])).item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_batch_of_one_is_finite():
    s, t = rand(1, 3, seed=1, grad=True), rand(1, 4, seed=2)
    term = build("rkd", [s.shape], [t.shape])
    value = term(feats([s], [t]))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(s.grad).all()
