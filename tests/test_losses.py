"""The loss zoo's contract: the catalogue, DistillLoss, and the ConfigErrors users see."""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest
import torch

from raykd.config import ConfigError, DistillConfig, LossTermConfig
from raykd.losses import (LOSSES, DistillLoss, LossSpec, build_term, describe_losses,
                          feature_paths)

KEYS = {"ce", "kd", "dkd", "token_kd", "token_rkl", "token_gkd", "token_uld", "fitnets", "at",
        "nst", "ft", "ab", "distilbert_cos", "tinybert_hidden", "tinybert_emb", "tinybert_attn",
        "rkd", "sp", "fsp", "pkt", "dml", "one", "byot", "codistill"}  # last 4: online
S_SHAPES = {"layer2": torch.Size([4, 8, 4, 4]), "layer3": torch.Size([4, 16, 2, 2]),
            "fc": torch.Size([4, 32])}
T_SHAPES = {"layer2": torch.Size([4, 16, 4, 4]), "layer3": torch.Size([4, 32, 2, 2]),
            "fc": torch.Size([4, 64])}


def batch(seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    s_logits, t_logits = r(4, 10), r(4, 10)
    labels = torch.tensor([1, 0, 3, 9])
    s_feats = {k: r(*v) for k, v in S_SHAPES.items()}
    t_feats = {k: r(*v) for k, v in T_SHAPES.items()}
    return s_logits, t_logits, labels, s_feats, t_feats


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


# ---------------------------------------------------------------- catalogue

def test_every_key_is_registered_with_a_complete_spec():
    assert set(LOSSES) == KEYS
    for key, spec in LOSSES.items():
        assert isinstance(spec, LossSpec) and spec.key == key and spec.cls.key == key
        assert spec.family in {"response", "feature", "relation", "language", "online"}
        assert set(spec.needs) <= {"labels", "logits", "features", "pairs"} and spec.needs
        assert spec.paper and all("default" in d for d in spec.params.values())


def test_specs_are_frozen_and_describe_losses_has_one_row_per_key():
    with pytest.raises(AttributeError):
        LOSSES["kd"].key = "other"  # type: ignore[misc]
    rows = describe_losses()
    assert [r["key"] for r in rows] == list(LOSSES)
    assert set(rows[0]) == {"key", "family", "paper", "needs", "params"}
    assert {r["key"]: r for r in rows}["dkd"]["params"].keys() >= {"alpha", "beta", "temperature"}


def test_import_does_not_need_config_first():
    # fresh import of raykd.losses before raykd.config (config imports LOSSES lazily); the
    # original modules are put back so other tests keep their class identities
    saved = {k: v for k, v in sys.modules.items() if k == "raykd" or k.startswith("raykd.")}
    try:
        for k in saved:
            del sys.modules[k]
        fresh = importlib.import_module("raykd.losses")
        assert set(fresh.LOSSES) == KEYS
        config = importlib.import_module("raykd.config")
        assert config.LossTermConfig(name="pkt").name == "pkt"
    finally:
        for k in [k for k in sys.modules if k == "raykd" or k.startswith("raykd.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_config_validator_knows_the_keys():
    assert LossTermConfig(name="rkd").name == "rkd"
    with pytest.raises(Exception, match="unknown loss 'nope'"):
        LossTermConfig(name="nope")


# ---------------------------------------------------------------- DistillLoss

def test_default_is_one_minus_alpha_ce_plus_alpha_t2_kl():
    distill = DistillConfig(temperature=3.0, alpha=0.7)
    loss = DistillLoss(distill, {}, {})
    s, t, y, _, _ = batch()
    total, values = loss(s, t, y, {}, {})
    sn, tn = s.detach().double().numpy(), t.detach().double().numpy()
    ce = np.mean([-math.log(softmax(sn[i])[y[i]]) for i in range(4)])
    kl = np.mean([sum(p * math.log(p / q) for p, q in zip(softmax(tn[i] / 3), softmax(sn[i] / 3),
                                                         strict=True)) for i in range(4)])
    assert set(values) == {"ce", "kd"}
    assert values["ce"] == pytest.approx(ce, rel=1e-5)
    assert values["kd"] == pytest.approx(9 * kl, rel=1e-5)
    assert total.item() == pytest.approx(0.3 * ce + 0.7 * 9 * kl, rel=1e-5)
    assert loss.needs_teacher_logits and not loss.needs_teacher_features
    assert loss.student_paths == [] and loss.pretrain_epochs == 0


def test_total_is_weighted_sum_of_reported_unweighted_values_with_unique_names():
    distill = DistillConfig(losses=[
        {"name": "ce", "weight": 0.5},
        {"name": "fitnets", "weight": 2.0, "student_layers": ["layer2"],
         "teacher_layers": ["layer2"]},
        {"name": "fitnets", "weight": 3.0, "student_layers": ["layer3"],
         "teacher_layers": ["layer3"]},
        {"name": "rkd", "weight": 0.1, "student_layers": ["fc"], "teacher_layers": ["fc"]},
    ])
    loss = DistillLoss(distill, S_SHAPES, T_SHAPES)
    s, t, y, sf, tf = batch()
    total, values = loss(s, None, y, sf, tf)
    assert list(values) == ["ce", "fitnets", "fitnets_1", "rkd"]
    expected = (0.5 * values["ce"] + 2 * values["fitnets"] + 3 * values["fitnets_1"]
                + 0.1 * values["rkd"])
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert all(isinstance(v, float) for v in values.values())
    assert loss.student_paths == ["layer2", "layer3", "fc"] == loss.teacher_paths
    assert loss.needs_teacher_features and not loss.needs_teacher_logits


def test_gradients_reach_student_and_connectors_never_teacher():
    distill = DistillConfig(losses=[
        {"name": "kd"},
        {"name": "fitnets", "student_layers": ["layer2"], "teacher_layers": ["layer2"]},
        {"name": "ab", "student_layers": ["layer3"], "teacher_layers": ["layer3"]},
    ])
    loss = DistillLoss(distill, S_SHAPES, T_SHAPES)
    s, t, y, sf, tf = batch()
    total, _ = loss(s, t, y, sf, tf)
    total.backward()
    assert s.grad is not None and sf["layer2"].grad is not None and sf["layer3"].grad is not None
    assert t.grad is None and all(v.grad is None for v in tf.values())
    params = list(loss.parameters())
    assert params and all(p.grad is not None for p in params if p.requires_grad)


def test_weight_zero_terms_are_skipped_and_not_reported():
    loss = DistillLoss(DistillConfig(alpha=1.0), {}, {})
    s, t, y, _, _ = batch()
    total, values = loss(s, t, y, {}, {})
    assert list(values) == ["kd"] and total.item() == pytest.approx(values["kd"])
    distill = DistillConfig(losses=[{"name": "ce"}, {"name": "at", "weight": 0.0,
                                                     "student_layers": ["layer2"],
                                                     "teacher_layers": ["layer2"]}])
    loss = DistillLoss(distill, S_SHAPES, T_SHAPES)
    assert loss.student_paths == [] and not loss.needs_teacher_features
    assert feature_paths(distill) == (["layer2"], ["layer2"])  # probed, so it is still checked
    _, values = loss(s, None, y, {}, {})  # no features needed for a skipped term
    assert list(values) == ["ce"]


def test_pretrain_mode_runs_only_first_stage_terms_unweighted_while_their_epochs_last():
    distill = DistillConfig(losses=[
        {"name": "ce"},
        {"name": "fitnets", "weight": 100.0, "student_layers": ["layer2"],
         "teacher_layers": ["layer2"], "params": {"pretrain_epochs": 2}},
        {"name": "ft", "weight": 500.0, "student_layers": ["layer3"],
         "teacher_layers": ["layer3"], "params": {"pretrain_epochs": 5}},
    ])
    loss = DistillLoss(distill, S_SHAPES, T_SHAPES)
    assert loss.pretrain_epochs == 5
    s, t, y, sf, tf = batch()
    total, values = loss(s, None, y, sf, tf, epoch=0, pretrain=True)
    assert list(values) == ["fitnets", "ft"]
    assert total.item() == pytest.approx(values["fitnets"] + values["ft"], rel=1e-6)
    _, values = loss(s, None, y, sf, tf, epoch=3, pretrain=True)
    assert list(values) == ["ft"]
    _, values = loss(s, None, y, sf, tf, epoch=0)
    assert list(values) == ["ce", "fitnets", "ft"]


def test_pretrain_with_nothing_to_do_returns_a_differentiable_zero():
    loss = DistillLoss(DistillConfig(), {}, {})
    s, t, y, _, _ = batch()
    total, values = loss(s, t, y, {}, {}, pretrain=True)
    assert values == {} and total.item() == 0.0
    total.backward()


def test_token_mask_reaches_terms_through_distill_loss():
    distill = DistillConfig(temperature=2.0, losses=[{"name": "token_kd"}])
    loss = DistillLoss(distill, {}, {})
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    a, _ = loss(s, t, None, {}, {}, mask=mask)
    s[:, 2], t[:, 2] = 9.0, -9.0
    b, _ = loss(s, t, None, {}, {}, mask=mask)
    assert a.item() == pytest.approx(b.item())


# ---------------------------------------------------------------- ConfigErrors

def build(name, s_layers=(), t_layers=(), s_shapes=(), t_shapes=(), **params):
    cfg = LossTermConfig(name=name, params=params, student_layers=list(s_layers),
                         teacher_layers=list(t_layers))
    distill = DistillConfig(losses=[LossTermConfig(name="ce"), cfg])
    return build_term(cfg, distill, [torch.Size(s) for s in s_shapes],
                      [torch.Size(t) for t in t_shapes])


def test_unknown_param_names_the_field_and_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        build("fitnets", ["a"], ["b"], [(2, 4)], [(2, 4)], x=1)
    assert str(err.value) == ("distill.losses.1.params: unknown parameter 'x' for fitnets; "
                              "allowed: connector, pretrain_epochs")
    with pytest.raises(ConfigError, match="unknown parameter 'T' for kd; allowed: temperature"):
        build("kd", T=2)
    with pytest.raises(ConfigError, match="unknown parameter 'p' for sp; allowed: none"):
        build("sp", ["a"], ["b"], [(2, 4)], [(2, 4)], p=2)


@pytest.mark.parametrize("name, params, match", [
    ("kd", {"temperature": -1}, r"distill.losses.1.params.temperature: must be > 0"),
    ("kd", {"temperature": "hot"}, r"params.temperature: expected a number, got 'hot'"),
    ("dkd", {"warmup": 1.5}, r"params.warmup: expected a whole number"),
    ("dkd", {"beta": -8}, r"params.beta: must be >= 0"),
    ("fitnets", {"connector": "conv"}, r"params.connector: 'conv' is not allowed; allowed: auto"),
])
def test_bad_param_values(name, params, match):
    layers = (["a"], ["b"], [(2, 4)], [(2, 4)]) if name == "fitnets" else ()
    with pytest.raises(ConfigError, match=match):
        build(name, *layers, **params)


def test_feature_term_without_layers_says_to_set_them():
    with pytest.raises(ConfigError, match=r"distill.losses.1: at compares features; set "
                                          r"student_layers and teacher_layers"):
        build("at")


def test_logit_term_with_layers_is_rejected():
    with pytest.raises(ConfigError, match=r"kd uses logits, not layers"):
        build("kd", ["a"], ["b"], [(2, 4)], [(2, 4)])


def test_layer_count_mismatch_names_the_paths():
    with pytest.raises(ConfigError, match=r"distill.losses.1: sp pairs student_layers with "
                                          r"teacher_layers one to one; got 2 student paths "
                                          r"\['a', 'b'\] and 1 teacher paths \['c'\]"):
        build("sp", ["a", "b"], ["c"], [(2, 4), (2, 4)], [(2, 4)])


def test_unmatchable_shapes_name_term_paths_and_shapes():
    with pytest.raises(ConfigError) as err:
        build("fitnets", ["layer3"], ["layer3"], [(2, 16, 8)], [(2, 12, 8)])
    assert str(err.value) == ("distill.losses.1: fitnets needs the same sequence length on both "
                              "sides; student layer3 [16, 8] vs teacher layer3 [12, 8]")
    with pytest.raises(ConfigError, match=r"fitnets needs features of the same rank.*"
                                          r"student fc \[64\] vs teacher layer3 \[256, 8, 8\]"):
        build("fitnets", ["fc"], ["layer3"], [(2, 64)], [(2, 256, 8, 8)])


def test_distill_loss_reports_paths_without_probed_shapes():
    distill = DistillConfig(losses=[{"name": "sp", "student_layers": ["layer9"],
                                     "teacher_layers": ["fc"]}])
    with pytest.raises(ConfigError, match=r"distill.losses.0.student_layers: no student feature "
                                          r"'layer9' was probed for sp"):
        DistillLoss(distill, S_SHAPES, T_SHAPES)


def test_weight_zero_term_with_a_first_stage_is_initialisation_only():
    # RepDistiller's AB: AB loss during the init stage, then KD without it
    distill = DistillConfig(losses=[
        {"name": "kd"},
        {"name": "ab", "weight": 0.0, "student_layers": ["layer3"], "teacher_layers": ["layer3"],
         "params": {"pretrain_epochs": 30}},
    ])
    loss = DistillLoss(distill, S_SHAPES, T_SHAPES)
    assert loss.pretrain_epochs == 30 and loss.student_paths == ["layer3"]
    s, t, y, sf, tf = batch()
    total, values = loss(s, t, y, sf, tf, epoch=29, pretrain=True)
    assert list(values) == ["ab"] and total.item() == pytest.approx(values["ab"], rel=1e-6)
    total, values = loss(s, t, y, sf, tf)
    assert list(values) == ["kd"]
