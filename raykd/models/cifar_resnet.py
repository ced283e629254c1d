"""CIFAR ResNets as used throughout the KD literature (He et al. 2016, §4.2; the RepDistiller /
mdistiller definitions: resnet8 … resnet110 with filters 16-16-32-64, and the ×4-wide
resnet8x4 / resnet32x4 with filters 32-64-128-256).

Two deliberate differences from those repositories, neither changing the parameter count:
``conv1`` takes any number of input channels, and the fixed ``AvgPool2d(8)`` is an adaptive
average pool so any input of at least 8×8 works (on 32×32 inputs the two are identical).
"""

from __future__ import annotations

import torch
from torch import nn

from raykd.models.args import Probability
from raykd.models.init import repdistiller_init


class BasicBlock(nn.Module):
    """Post-activation residual block: ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.

    The two ReLUs are separate modules (and not inplace) so ``relu2:input`` is the block's
    pre-activation output — RepDistiller's ``preact`` feature used by Activation Boundaries.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, drop: float = 0.0):
        super().__init__()
        # Stochastic depth (Huang et al. 2016): the residual branch is dropped per sample while
        # training; absent at 0, so the state dict and the hook paths are those of a plain block.
        self.drop = None
        if drop > 0:
            from torchvision.ops import StochasticDepth  # torchvision only when asked for

            self.drop = StochasticDepth(drop, "row")
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.drop is not None:
            out = self.drop(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    """Module paths:

    - ``conv1`` / ``bn1`` / ``relu``: the stem, ``[B, filters[0], H, W]``.
    - ``layer1``, ``layer2``, ``layer3``: the three stages (stride 1, 2, 2):
      ``[B, filters[1], H, W]``, ``[B, filters[2], H/2, W/2]``, ``[B, filters[3], H/4, W/4]``.
      ``layerK.{j}`` is block *j*; ``layerK.{last}.relu2:input`` is the stage's pre-activation
      output (RepDistiller's ``preact`` features).
    - ``avgpool``: ``[B, filters[3], 1, 1]``; ``flatten``: the penultimate feature
      ``[B, filters[3]]`` (what CRD / RKD / PKT use); ``fc``: the logits ``[B, num_classes]``.
    """

    def __init__(self, depth: int, filters: tuple[int, int, int, int], in_channels: int,
                 num_classes: int, stochastic_depth: float = 0.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.depth, self.filters = depth, tuple(filters)
        self.conv1 = nn.Conv2d(in_channels, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU()
        # The linear decay rule: block b of n drops its branch with p·b/n (the last one p).
        drops = [stochastic_depth * (b + 1) / (3 * blocks) for b in range(3 * blocks)]
        self.layer1 = _stage(filters[0], filters[1], blocks, 1, drops[:blocks])
        self.layer2 = _stage(filters[1], filters[2], blocks, 2, drops[blocks:2 * blocks])
        self.layer3 = _stage(filters[2], filters[3], blocks, 2, drops[2 * blocks:])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(filters[3], num_classes)
        repdistiller_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _stage(in_planes: int, planes: int, blocks: int, stride: int, drops: list[float]
           ) -> nn.Sequential:
    # Only the first block changes resolution / width; the rest keep it.
    return nn.Sequential(BasicBlock(in_planes, planes, stride, drops[0]),
                         *(BasicBlock(planes, planes, 1, drops[j]) for j in range(1, blocks)))


# name → (depth, filters), exactly the RepDistiller / mdistiller table.
CIFAR_RESNETS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}


def build_cifar_resnet(info, *, depth: int, filters: tuple[int, int, int, int],
                       stochastic_depth: Probability = 0.0) -> CifarResNet:
    """``depth`` and ``filters`` are fixed per registry name (not user arguments);
    ``stochastic_depth`` is the last block's drop probability (Noisy Student's noise)."""
    return CifarResNet(depth, filters, info.input_shape[0], info.num_classes, stochastic_depth)
