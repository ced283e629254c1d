"""raykd.models: registry, feature hooks, teacher→student initialisation (no Ray, CPU only)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from raykd.config import ConfigError, ModelConfig
from raykd.models import (
    FeatureHooks,
    build_model,
    count_params,
    example_input,
    init_student_from_teacher,
    is_known_model,
    model_names,
    probe_shapes,
    resolve_module,
)


def info(channels: int = 3, size: int = 16, num_classes: int = 10) -> SimpleNamespace:
    """Stand-in for raykd.data.DatasetInfo: only the two attributes models read."""
    return SimpleNamespace(input_shape=(channels, size, size), num_classes=num_classes)


def build(name: str, dataset=None, field: str = "student", **args) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, args=args), dataset or info(), field)


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- registry ----------------------------------------------------------------------------------

EXPECTED_NAMES = {"mlp", "cnn", "tiny_transformer", "resnet8", "resnet14", "resnet20", "resnet32",
                  "resnet56", "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2", "wrn_40_1",
                  "wrn_16_1"}


def test_registry_lists_the_contract_models():
    assert EXPECTED_NAMES <= set(model_names())
    assert all(is_known_model(name) for name in model_names())
    assert not is_known_model("resnet9000")


# hf_causal_lm needs a source (a folder or a model_type) and emits token logits [B, L, V]:
# tests/test_lm_models.py covers it.
@pytest.mark.parametrize("name", [n for n in model_names() if n != "hf_causal_lm"])
def test_every_model_builds_and_returns_logits(name):
    dataset = info(channels=3, size=16, num_classes=7)
    model = build(name, dataset)
    x = example_input(model, dataset, batch_size=2)
    assert model(x).shape == (2, 7)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet8", "resnet8x4", "wrn_16_1"])
def test_image_models_take_any_channels_and_8x8_inputs(name):
    dataset = info(channels=1, size=8, num_classes=10)
    model = build(name, dataset)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("name, expected", [("resnet8x4", 1.2e6), ("resnet32x4", 7.4e6),
                                            ("wrn_16_2", 0.7e6), ("wrn_40_2", 2.2e6)])
def test_param_counts_match_the_literature(name, expected):
    model = build(name, info(num_classes=100))
    assert count_params(model) == pytest.approx(expected, rel=0.10)


def test_count_params_skips_frozen_parameters():
    model = build("mlp", info(channels=1, size=4), hidden_sizes=[8])
    total = count_params(model)
    model.head.requires_grad_(False)
    assert count_params(model) == total - (8 * 10 + 10)


def test_mlp_and_cnn_arguments_shape_the_network():
    mlp = build("mlp", info(channels=1, size=8), hidden_sizes=[32, 16], dropout=0.5,
                input_dropout=0.2)
    assert [layer.linear.out_features for layer in mlp.layers] == [32, 16]
    assert mlp.layers[0].dropout.p == 0.5 and mlp.input_dropout.p == 0.2
    cnn = build("cnn", info(channels=1, size=8), channels=[8, 8, 8, 8], hidden=16)
    assert cnn(torch.randn(2, 1, 8, 8)).shape == (2, 10)  # 8→4→2→1, then no pooling


def test_tiny_transformer_classifier_and_lm_head():
    dataset = SimpleNamespace(input_shape=(12,), num_classes=3)
    ids = torch.randint(0, 50, (2, 12))
    clf = build("tiny_transformer", dataset, vocab_size=50, hidden=16, layers=2, heads=2)
    assert clf(ids).shape == (2, 3)
    assert clf.max_len == 12  # taken from the 1-D input shape
    lm = build("tiny_transformer", dataset, vocab_size=50, hidden=16, layers=2, heads=2,
               lm_head=True)
    assert lm(ids).shape == (2, 12, 50)
    assert isinstance(lm.encoder.layer[1], torch.nn.TransformerEncoderLayer)


@pytest.mark.parametrize("name, args, expected", [
    ("mlp", {"hiden_sizes": [10]},
     "student.args: unknown argument 'hiden_sizes' for model mlp; allowed: hidden_sizes, dropout, "
     "input_dropout"),
    ("mlp", {"dropout": "lots"}, "student.args: dropout='lots' is not valid for model mlp"),
    ("mlp", {"dropout": 1.5}, "allowed: dropout: float >= 0.0 and < 1.0"),
    ("mlp", {"hidden_sizes": [0]}, "allowed: hidden_sizes: list of int >= 1"),
    ("cnn", {"channels": []}, "student.args: channels=[]"),
    ("resnet8", {"depth": 20},
     "unknown argument 'depth' for model resnet8; allowed: stochastic_depth"),
    ("wrn_16_2", {"widen": 4}, "allowed: dropout"),
    ("tiny_transformer", {"hidden": 10, "heads": 3}, "not divisible by heads=3"),
])
def test_bad_args_raise_one_line_config_errors(name, args, expected):
    with pytest.raises(ConfigError) as err:
        build(name, info(), **args)
    message = str(err.value)
    assert message.startswith("student.args: ") and "allowed:" in message and "\n" not in message
    assert expected in message


def test_bad_args_name_the_field_they_came_from():
    with pytest.raises(ConfigError, match=r"^teacher\.args: unknown argument 'width'"):
        build("cnn", info(), field="teacher", width=3)


def test_torchvision_names_are_known_and_validated():
    assert is_known_model("torchvision:resnet18")
    assert not is_known_model("torchvision:nope")
    assert not is_known_model("resnet18")  # only with the prefix
    with pytest.raises(ValidationError, match="unknown model 'torchvision:nope'"):
        ModelConfig(name="torchvision:nope")
    with pytest.raises(ConfigError, match=r"^student\.args: 'weights' cannot be set"):
        build("torchvision:resnet18", info(), weights="IMAGENET1K_V1")
    with pytest.raises(ConfigError, match=r"^student\.args: torchvision:resnet18 rejected"):
        build("torchvision:resnet18", info(), no_such_arg=1)


@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28)])
def test_torchvision_resnet18_runs_on_small_inputs(channels, size):
    model = build("torchvision:resnet18", info(channels=channels, size=size, num_classes=10))
    assert model.conv1.in_channels == channels
    assert model(torch.randn(2, channels, size, size)).shape == (2, 10)


# --- hooks -------------------------------------------------------------------------------------

def test_hooks_capture_resnet_stage_and_mlp_preactivation():
    resnet = build("resnet8x4", info(size=32, num_classes=100))
    with FeatureHooks(resnet, ["layer2", "fc"], "student_layers") as hooks:
        logits = resnet(torch.randn(2, 3, 32, 32))
    assert hooks.features["layer2"].shape == (2, 128, 16, 16)
    assert torch.equal(hooks.features["fc"], logits)

    mlp = build("mlp", info(channels=1, size=8), hidden_sizes=[32])
    with FeatureHooks(mlp, ["layers.0.linear", "layers.0"], "student_layers") as hooks:
        mlp(torch.randn(4, 1, 8, 8))
    pre, post = hooks.features["layers.0.linear"], hooks.features["layers.0"]
    assert pre.shape == (4, 32) and (pre < 0).any()  # before the ReLU
    assert torch.equal(post, pre.relu())


def test_input_suffix_captures_the_module_input():
    model = build("resnet8", info())
    paths = ["layer1.0.relu2:input", "layer1.0.relu2"]
    with FeatureHooks(model, paths, "student_layers") as hooks:
        model(torch.randn(2, 3, 16, 16))
    pre, post = (hooks.features[p] for p in paths)
    assert (pre < 0).any() and torch.equal(post, pre.relu())


def test_captures_survive_inplace_ops_after_the_hooked_module():
    # torchvision's BasicBlock does `out = bn2(...); out += identity; relu_(out)`; the captured
    # bn2 output must still be the BN output, not the rewritten tensor.
    model = build("torchvision:resnet18", info(size=32))
    with FeatureHooks(model, ["layer1.0.bn2", "layer1.0"], "teacher_layers") as hooks:
        model(torch.randn(2, 3, 32, 32))
    assert (hooks.features["layer1.0.bn2"] < 0).any()
    assert not torch.equal(hooks.features["layer1.0.bn2"], hooks.features["layer1.0"])


def test_gradients_flow_through_captured_features():
    model = build("mlp", info(channels=1, size=8), hidden_sizes=[16, 16])
    with FeatureHooks(model, ["layers.1.linear"], "student_layers") as hooks:
        model(torch.randn(4, 1, 8, 8))
    hooks.features["layers.1.linear"].pow(2).mean().backward()
    assert model.layers[0].linear.weight.grad.abs().sum() > 0
    assert model.head.weight.grad is None  # only what the feature depends on


def test_hooks_are_removed_on_exit_even_after_an_error():
    model = build("resnet8", info())
    with FeatureHooks(model, ["layer1", "layer2.0.relu2:input"], "student_layers"):
        assert not no_hooks_left(model)
    assert no_hooks_left(model)
    with pytest.raises(RuntimeError), FeatureHooks(model, ["layer3"], "student_layers"):
        model(torch.randn(2, 5, 16, 16))  # wrong channel count
    assert no_hooks_left(model)


def test_missing_path_suggests_nearby_paths():
    model = build("resnet8x4", info())
    with pytest.raises(ConfigError) as err:
        FeatureHooks(model, ["layr2"], "distill.losses.0.student_layers")
    message = str(err.value)
    assert message.startswith("distill.losses.0.student_layers: module path 'layr2' not found in "
                              "CifarResNet; nearby paths: ")
    assert "layer2" in message.split("nearby paths: ")[1]
    mlp = build("mlp", info(), hidden_sizes=[8, 8])
    with pytest.raises(ConfigError) as err:
        resolve_module(mlp, "layers.7", "student_layers")
    assert {"layers.0", "layers.1"} <= set(str(err.value).split("nearby paths: ")[1].split(", "))
    with pytest.raises(ConfigError, match="unknown suffix ':output'"):
        resolve_module(mlp, "head:output", "student_layers")


def test_probe_shapes_leaves_modes_and_statistics_alone():
    model = build("resnet8", info())
    model.train()
    model.layer1[0].bn1.eval()  # a deliberately frozen BN must stay frozen
    stats = model.bn1.running_mean.clone()
    shapes = probe_shapes(model, ["layer1", "layer3", "flatten"], torch.randn(2, 3, 16, 16),
                          "student_layers")
    assert shapes == {"layer1": (2, 16, 16, 16), "layer3": (2, 64, 4, 4), "flatten": (2, 64)}
    assert model.training and model.layer2.training and not model.layer1[0].bn1.training
    assert torch.equal(model.bn1.running_mean, stats)
    assert no_hooks_left(model)


def test_transformer_hidden_states_and_attention_maps():
    dataset = SimpleNamespace(input_shape=(10,), num_classes=4)
    model = build("tiny_transformer", dataset, vocab_size=30, hidden=16, layers=2, heads=4).eval()
    ids = torch.randint(0, 30, (3, 10))
    with torch.no_grad():
        plain = model(ids)  # fused fast path, no hooks
        paths = ["embeddings", "encoder.layer.1", "encoder.layer.0.attn_probs"]
        with FeatureHooks(model, paths, "student_layers") as hooks:
            hooked = model(ids)
    assert torch.allclose(plain, hooked, atol=1e-5)  # hooking does not change the result
    assert hooks.features["embeddings"].shape == (3, 10, 16)
    assert hooks.features["encoder.layer.1"].shape == (3, 10, 16)
    attention = hooks.features["encoder.layer.0.attn_probs"]
    assert attention.shape == (3, 4, 10, 10)
    assert torch.allclose(attention.sum(-1), torch.ones(3, 4, 10), atol=1e-5)


# --- init_student_from_teacher -----------------------------------------------------------------

def test_init_transformer_student_takes_every_other_teacher_layer():
    dataset = SimpleNamespace(input_shape=(8,), num_classes=5)
    shape = {"vocab_size": 40, "hidden": 16, "heads": 2}
    teacher = build("tiny_transformer", dataset, layers=6, **shape)
    student = build("tiny_transformer", dataset, layers=3, **shape)
    torch.manual_seed(1)
    for p in teacher.parameters():  # make sure nothing matches by accident
        p.data.normal_()
    copied = init_student_from_teacher(student, teacher)
    for i, j in [(0, 0), (1, 2), (2, 4)]:
        s_state = student.encoder.layer[i].state_dict()
        t_state = teacher.encoder.layer[j].state_dict()
        assert all(torch.equal(s_state[k], t_state[k]) for k in s_state)
    assert torch.equal(student.embeddings.word_embeddings.weight,
                       teacher.embeddings.word_embeddings.weight)
    assert torch.equal(student.head.weight, teacher.head.weight)
    assert "encoder.layer.2.linear1.weight" in copied and "head.bias" in copied
    assert len(copied) == len(list(student.parameters()))


def test_init_mlp_student_maps_hidden_layers_and_head():
    dataset = info(channels=1, size=8)
    teacher = build("mlp", dataset, hidden_sizes=[32, 32, 32, 32])
    student = build("mlp", dataset, hidden_sizes=[32, 32])
    copied = init_student_from_teacher(student, teacher)
    assert torch.equal(student.layers[0].linear.weight, teacher.layers[0].linear.weight)
    assert torch.equal(student.layers[1].linear.weight, teacher.layers[2].linear.weight)
    assert torch.equal(student.head.weight, teacher.head.weight)
    assert sorted(copied) == sorted(name for name, _ in student.named_parameters())

    narrow = build("mlp", dataset, hidden_sizes=[32, 8])  # layer 1 and head cannot match
    assert init_student_from_teacher(narrow, teacher) == ["layers.0.linear.weight",
                                                          "layers.0.linear.bias"]


@pytest.mark.parametrize("student_name, student_args", [("mlp", {"hidden_sizes": [16]}),
                                                        ("cnn", {})])
def test_init_without_anything_to_copy_is_a_config_error(student_name, student_args):
    dataset = info(channels=1, size=8)
    teacher = build("mlp", dataset, hidden_sizes=[32, 32])
    student = build(student_name, dataset, **student_args)
    with pytest.raises(ConfigError, match=r"^student\.init_from_teacher: .*same family and "
                                          r"matching widths; student .* vs teacher mlp"):
        init_student_from_teacher(student, teacher)
