"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016), as in RepDistiller / mdistiller:
wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (depth 6n+4, widths 16-16k-32k-64k).

As in cifar_resnet.py, ``conv1`` takes any number of input channels and the final pool is
adaptive so inputs of at least 8×8 run; parameter counts are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raykd.models.args import Probability
from raykd.models.init import repdistiller_init


class WideBasicBlock(nn.Module):
    """Pre-activation block: ``conv2(relu2(bn2(conv1(relu1(bn1(x)))))) + shortcut``.

    When the width changes, the shortcut is a 1×1 conv applied to the *pre-activated* input
    ``relu1(bn1(x))`` — the original WRN / RepDistiller wiring, kept so parameter counts and
    feature statistics match the papers.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()  # not inplace: hooks on `bn1` must keep the pre-activation value
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """Module paths:

    - ``conv1``: the stem ``[B, 16, H, W]``.
    - ``layer1``, ``layer2``, ``layer3``: the three stages (RepDistiller's block1..3),
      ``[B, 16k | 32k | 64k, H | H/2 | H/4, ...]``. Being pre-activation, a stage's output is
      already its pre-ReLU feature; ``bn`` is the final BN before ``relu``.
    - ``relu``: the last activation; ``avgpool`` → ``flatten`` ``[B, 64k]`` (penultimate feature);
      ``fc``: the logits ``[B, num_classes]``.
    """

    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int,
                 dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.depth, self.widen = depth, widen
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.layer1 = _stage(widths[0], widths[1], blocks, 1, dropout)
        self.layer2 = _stage(widths[1], widths[2], blocks, 2, dropout)
        self.layer3 = _stage(widths[2], widths[3], blocks, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        repdistiller_init(self, zero_linear_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(self.flatten(self.avgpool(x)))


def _stage(in_planes: int, out_planes: int, blocks: int, stride: int, dropout: float
           ) -> nn.Sequential:
    return nn.Sequential(WideBasicBlock(in_planes, out_planes, stride, dropout),
                         *(WideBasicBlock(out_planes, out_planes, 1, dropout)
                           for _ in range(blocks - 1)))


# name → (depth, widen factor)
WIDE_RESNETS: dict[str, tuple[int, int]] = {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}


def build_wrn(info, *, depth: int, widen: int, dropout: Probability = 0.0) -> WideResNet:
    """``depth`` and ``widen`` are fixed per registry name; ``dropout`` is WRN's dropRate."""
    return WideResNet(depth, widen, info.input_shape[0], info.num_classes, dropout)
