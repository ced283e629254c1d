"""A small conv net for 8×8 … 32×32 images (digits, MNIST, CIFAR-sized quick runs)."""

from __future__ import annotations

import torch
from torch import nn

from raykd.models.args import BadArgs, PositiveInt, Probability


class ConvStage(nn.Module):
    """3×3 conv → BN → ReLU → optional 2×2 max-pool; each a named submodule for hooks."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()  # not inplace: a hook on `bn` must keep the pre-activation value
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


class SmallCNN(nn.Module):
    """Conv stages → global average pool → hidden linear layer → logits.

    Module paths:

    - ``features.{i}``: stage *i* output ``[B, channels[i], H_i, W_i]`` (after ReLU and pooling).
    - ``features.{i}.bn``: its pre-activation; ``features.{i}.conv``, ``features.{i}.act`` too.
    - ``pool``: ``[B, channels[-1], 1, 1]``; ``hidden``: ``[B, hidden]`` (after ReLU).
    - ``hidden.linear``: the hidden pre-activation; ``head``: the logits ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, channels: list[int],
                 hidden: int, dropout: float):
        super().__init__()
        stages, size = [], image_size
        for c_in, c_out in zip([in_channels, *channels], channels):
            # Halve the resolution only while something is left to halve, so deep configurations
            # still run on 8×8 inputs instead of pooling down to an empty feature map.
            pool = size >= 2
            stages.append(ConvStage(c_in, c_out, pool))
            size = size // 2 if pool else size
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential()
        self.hidden.add_module("linear", nn.Linear(channels[-1], hidden))
        self.hidden.add_module("act", nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.pool(self.features(x)))
        return self.head(self.dropout(self.hidden(x)))


def build_cnn(info, *, channels: list[PositiveInt] = (32, 64), hidden: PositiveInt = 128,
              dropout: Probability = 0.0) -> SmallCNN:
    in_channels, height, width = info.input_shape
    if not channels:
        raise BadArgs("channels=[] is not valid for model cnn; allowed: a list of at least one int")
    return SmallCNN(in_channels, min(height, width), info.num_classes, list(channels), hidden,
                    dropout)
