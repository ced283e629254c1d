"""The model registry: names → builders, argument checking, and ``build_model``.

A builder is ``builder(info, **args) -> nn.Module`` where ``info`` is any object with
``.input_shape`` ``(C, H, W)`` and ``.num_classes`` (a ``raykd.data.DatasetInfo``). Its keyword-only
parameters are the user's ``ModelConfig.args``, except those the registry fixes per name
(e.g. ``depth`` for ``resnet32``). Parameters come from torch's global RNG: seed before building
for reproducible initialisations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raykd.errors import ConfigError
from raykd.models.args import BadArgs, check_args
from raykd.models.cifar_resnet import CIFAR_RESNETS, build_cifar_resnet
from raykd.models.cnn import build_cnn
from raykd.models.hf import HF_MODEL, build_hf_causal_lm
from raykd.models.mlp import build_mlp
from raykd.models.torchvision_models import PREFIX, build_torchvision, is_torchvision_model
from raykd.models.transformer import build_tiny_transformer
from raykd.models.wrn import WIDE_RESNETS, build_wrn

if TYPE_CHECKING:  # the config validates names through this registry: no import back at run time
    from raykd.config import ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    fixed: dict[str, Any] = field(default_factory=dict)  # builder arguments implied by the name


def _registry() -> dict[str, ModelSpec]:
    specs = [
        ModelSpec("mlp", build_mlp, "Hinton-style fully connected net (flattens the input)"),
        ModelSpec("cnn", build_cnn, "small conv net for 8x8..32x32 images"),
        ModelSpec("tiny_transformer", build_tiny_transformer,
                  "tiny BERT-shaped token classifier / LM (input: token ids [B, L])"),
        ModelSpec(HF_MODEL, build_hf_causal_lm,
                  "Hugging Face transformers causal LM: a save_pretrained folder (pretrained) "
                  "or built from model_type + config; token ids [B, L] → logits [B, L, V]"),
    ]
    for name, (depth, filters) in CIFAR_RESNETS.items():
        specs.append(ModelSpec(name, build_cifar_resnet, f"CIFAR ResNet-{depth}, filters {filters}",
                               {"depth": depth, "filters": filters}))
    for name, (depth, widen) in WIDE_RESNETS.items():
        specs.append(ModelSpec(name, build_wrn, f"Wide ResNet depth {depth}, widen factor {widen}",
                               {"depth": depth, "widen": widen}))
    return {spec.name: spec for spec in specs}


MODELS: dict[str, ModelSpec] = _registry()


def model_names() -> list[str]:
    """Registry names (``torchvision:NAME`` is accepted on top of these)."""
    return sorted(MODELS)


def is_known_model(name: str) -> bool:
    # Checked without importing torchvision unless the name asks for it (the import is slow).
    return name in MODELS or is_torchvision_model(name)


def build_model(cfg: ModelConfig, info, field: str = "student") -> nn.Module:
    """A freshly initialised model for ``info``; bad ``cfg.args`` → one-line ``ConfigError``."""
    try:
        if cfg.name.startswith(PREFIX):
            if not is_torchvision_model(cfg.name):
                raise ConfigError(f"{field}.name: unknown torchvision model {cfg.name!r}; allowed: "
                                  f"torchvision:NAME for a torchvision.models classifier")
            return build_torchvision(cfg.name, info, cfg.args)
        spec = MODELS.get(cfg.name)
        if spec is None:
            raise ConfigError(f"{field}.name: unknown model {cfg.name!r}; allowed: "
                              f"{', '.join(model_names())} or torchvision:NAME")
        args = check_args(cfg.name, spec.builder, cfg.args, spec.fixed)
        return spec.builder(info, **spec.fixed, **args)
    except BadArgs as err:
        raise ConfigError(f"{field}.args: {err}") from None


def count_params(model: nn.Module) -> int:
    """Trainable parameters (frozen ones, e.g. a fixed teacher's, are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def example_input(model: nn.Module, info, batch_size: int = 2) -> torch.Tensor:
    """A zero batch the model accepts, for shape probes: token ids for token models, else images."""
    if getattr(model, "takes_tokens", False):
        shape = tuple(getattr(info, "input_shape", ()))  # token blocks: (block_size,)
        length = shape[0] if len(shape) == 1 else model.max_len
        return torch.zeros(batch_size, length, dtype=torch.long)
    return torch.zeros(batch_size, *info.input_shape)
