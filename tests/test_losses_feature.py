"""fitnets, at, nst, ft, ab against their papers' formulas written out by hand."""

from __future__ import annotations

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


def avg_pool_blocks(x, out):
    """Average pooling of [B, C, H, W] into out×out blocks (H divisible by out), by hand."""
    b, c, h, w = x.shape
    k = h // out
    return x.reshape(b, c, out, k, out, k).mean(axis=(3, 5))


def has_grad(*tensors):
    return all(x.grad is not None and x.grad.abs().sum() > 0 for x in tensors)


# ---------------------------------------------------------------- fitnets

def test_fitnets_identity_is_half_mean_squared_error():
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 3, 4, 4, seed=2)
    term = build("fitnets", [s.shape], [t.shape])
    sn, tn = s.numpy(), t.numpy()
    expected = 0.5 * sum((sn.flat[i] - tn.flat[i]) ** 2 for i in range(sn.size)) / sn.size
    assert term(feats([s], [t])).item() == pytest.approx(expected, rel=1e-12)


def test_fitnets_conv_regressor_maps_channels():
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 5, 4, 4, seed=2)
    term = build("fitnets", [s.shape], [t.shape])
    conv = term.regressors[0]
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1)
    w = conv.weight.detach().numpy()[:, :, 0, 0]
    bias = conv.bias.detach().numpy()
    mapped = np.einsum("oc,bchw->bohw", w, s.numpy()) + bias[None, :, None, None]
    expected = 0.5 * np.mean((mapped - t.numpy()) ** 2)
    assert term(feats([s], [t])).item() == pytest.approx(expected, rel=1e-10)


def test_fitnets_linear_regressor_for_vectors_and_gradients():
    s, t = rand(4, 6, seed=1, grad=True), rand(4, 10, seed=2, grad=True)
    term = build("fitnets", [s.shape], [t.shape])
    assert isinstance(term.regressors[0], torch.nn.Linear)
    term(feats([s], [t])).backward()
    assert has_grad(s, term.regressors[0].weight)
    assert t.grad is None


def test_fitnets_zero_when_features_equal():
    s = rand(2, 3, 4, 4)
    term = build("fitnets", [s.shape], [s.shape])
    assert term(feats([s], [s.clone()])).item() == 0.0


def test_fitnets_pretrain_stage_is_the_hint_loss():
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 5, 4, 4, seed=2)
    term = build("fitnets", [s.shape], [t.shape], pretrain_epochs=3)
    assert term.pretrain_epochs == 3 and term.has_pretrain
    assert term.pretrain_loss(feats([s], [t])).item() == term(feats([s], [t])).item()


def test_fitnets_identity_connector_with_mismatched_channels_is_a_config_error():
    with pytest.raises(ConfigError, match=r"distill.losses.0: fitnets needs matching channel "
                                          r"counts.*student s0 \[3, 4, 4\] vs teacher t0 \[5"):
        build("fitnets", [(2, 3, 4, 4)], [(2, 5, 4, 4)], connector="identity")


# ---------------------------------------------------------------- at

def hand_attention(f, p=2.0):
    """Q_j = mean_c |A_c,j|^p for every sample, divided by its L2 norm."""
    out = []
    for sample in f:
        q = np.abs(sample) ** p
        q = q.mean(axis=0).reshape(-1)
        out.append(q / np.sqrt((q**2).sum()))
    return np.stack(out)


def test_at_matches_hand_formula_over_two_layer_pairs():
    s1, t1 = rand(2, 3, 4, 4, seed=1), rand(2, 6, 4, 4, seed=2)
    s2, t2 = rand(2, 4, 2, 2, seed=3), rand(2, 8, 2, 2, seed=4)
    term = build("at", [s1.shape, s2.shape], [t1.shape, t2.shape])
    expected = 0.0
    for s, t in [(s1, t1), (s2, t2)]:
        diff = hand_attention(s.numpy()) - hand_attention(t.numpy())
        expected += (diff**2).mean()
    expected *= 1000 / 2
    assert term(feats([s1, s2], [t1, t2])).item() == pytest.approx(expected, rel=1e-10)


def test_at_pools_the_larger_map_to_the_smaller():
    s, t = rand(2, 3, 8, 8, seed=1), rand(2, 6, 4, 4, seed=2)
    term = build("at", [s.shape], [t.shape], beta=2.0, p=1.0)
    s_pooled = avg_pool_blocks(s.numpy(), 4)
    diff = hand_attention(s_pooled, 1.0) - hand_attention(t.numpy(), 1.0)
    assert term(feats([s], [t])).item() == pytest.approx((diff**2).mean(), rel=1e-10)


def test_at_gradient_and_zero():
    s, t = rand(2, 3, 4, 4, seed=1, grad=True), rand(2, 6, 4, 4, seed=2, grad=True)
    term = build("at", [s.shape], [t.shape])
    term(feats([s], [t])).backward()
    assert has_grad(s) and t.grad is None
    assert term(feats([s], [s.detach().clone()])).item() == pytest.approx(0.0, abs=1e-12)


def test_at_rejects_vectors():
    with pytest.raises(ConfigError, match=r"at needs conv feature maps.*student s0 is \[8\]"):
        build("at", [(2, 8)], [(2, 8)])


# ---------------------------------------------------------------- nst

def hand_nst(s, t):
    """MMD² between the channel samples (L2-normalised spatial maps), k(x, y) = (xᵀy)²."""
    total = 0.0
    for b in range(s.shape[0]):
        xs = [v / np.linalg.norm(v) for v in s[b].reshape(s.shape[1], -1)]
        xt = [v / np.linalg.norm(v) for v in t[b].reshape(t.shape[1], -1)]
        k = lambda a, c: np.mean([[np.dot(x, y) ** 2 for y in c] for x in a])  # noqa: E731
        total += k(xt, xt) + k(xs, xs) - 2 * k(xs, xt)
    return total / s.shape[0]


def test_nst_matches_hand_mmd_with_different_channel_counts():
    s, t = rand(2, 3, 3, 3, seed=1), rand(2, 5, 3, 3, seed=2)
    term = build("nst", [s.shape], [t.shape])
    assert term(feats([s], [t])).item() == pytest.approx(hand_nst(s.numpy(), t.numpy()),
                                                         rel=1e-10)


def test_nst_gradient_and_zero():
    s, t = rand(2, 3, 4, 4, seed=1, grad=True), rand(2, 5, 4, 4, seed=2, grad=True)
    term = build("nst", [s.shape], [t.shape])
    term(feats([s], [t])).backward()
    assert has_grad(s) and t.grad is None
    assert term(feats([s], [s.detach().clone()])).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- ft

def unit_rows(x):
    x = x.reshape(x.shape[0], -1)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ft_is_l1_between_normalised_factors():
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 4, 4, 4, seed=2)
    term = build("ft", [s.shape], [t.shape])
    term.eval()  # BN on running stats: the module outputs below equal the term's own
    with torch.no_grad():
        factor_t = term.paraphrasers[0].encoder(t).numpy()
        factor_s = term.translators[0](s).numpy()
    assert factor_t.shape[1] == 2  # rate 0.5 of 4 teacher channels
    expected = np.abs(unit_rows(factor_s) - unit_rows(factor_t)).mean()
    assert term(feats([s], [t])).item() == pytest.approx(expected, rel=1e-10)


def test_ft_pretrain_is_reconstruction_of_teacher_features():
    s, t = rand(2, 3, 4, 4, seed=1), rand(2, 4, 4, 4, seed=2, grad=True)
    term = build("ft", [s.shape], [t.shape], pretrain_epochs=2, rate=0.25)
    term.eval()
    rebuilt = term.paraphrasers[0](t)[1].detach().numpy()
    expected = np.mean((rebuilt - t.detach().numpy()) ** 2)
    loss = term.pretrain_loss(feats([s], [t]))
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    term.train()
    term.pretrain_loss(feats([s], [t])).backward()
    assert has_grad(term.paraphrasers[0].encoder[0].weight) and t.grad is None
    assert term.pretrain_epochs == 2


def test_ft_gradient_reaches_student_and_translator_not_paraphraser():
    s, t = rand(2, 3, 4, 4, seed=1, grad=True), rand(2, 4, 4, 4, seed=2, grad=True)
    term = build("ft", [s.shape], [t.shape])
    term(feats([s], [t])).backward()
    assert has_grad(s, term.translators[0][0].weight)
    assert term.paraphrasers[0].encoder[0].weight.grad is None and t.grad is None


# ---------------------------------------------------------------- ab

def hand_ab(s, t, margin):
    total = 0.0
    for x, y in zip(s.reshape(-1), t.reshape(-1), strict=True):
        if y > 0 and x <= margin:
            total += (x - margin) ** 2
        elif y <= 0 and x > -margin:
            total += (x + margin) ** 2
    return total / s.shape[0]


@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_ab_matches_hand_squared_hinge(margin):
    s, t = rand(3, 2, 3, 3, seed=1), rand(3, 2, 3, 3, seed=2)
    term = build("ab", [s.shape], [t.shape], connector="identity", margin=margin)
    assert term(feats([s], [t])).item() == pytest.approx(hand_ab(s.numpy(), t.numpy(), margin),
                                                         rel=1e-12)


def test_ab_learned_connector_is_conv_bn_and_gets_gradients():
    s, t = rand(4, 2, 3, 3, seed=1, grad=True), rand(4, 5, 3, 3, seed=2, grad=True)
    term = build("ab", [s.shape], [t.shape], pretrain_epochs=1)
    conv, bn = term.connectors[0]
    assert isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
    term(feats([s], [t])).backward()
    assert has_grad(s, conv.weight) and t.grad is None
    assert term.has_pretrain and term.pretrain_epochs == 1


def test_ab_zero_when_equal_features_clear_the_margin():
    # holds only where every neuron is beyond ±μ: equal features then satisfy both hinges
    signs = torch.where(rand(2, 3, 2, 2, seed=5) > 0, 1.0, -1.0).double()
    s = signs * (1.5 + rand(2, 3, 2, 2, seed=6).abs())
    term = build("ab", [s.shape], [s.shape], connector="identity")
    assert term(feats([s], [s.clone()])).item() == 0.0
