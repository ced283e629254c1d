"""Hinton-style fully connected classifier (Hinton, Vinyals & Dean 2015, MNIST experiments)."""

from __future__ import annotations

import math

import torch
from torch import nn

from raykd.models.args import PositiveInt, Probability


class HiddenLayer(nn.Module):
    """Linear → ReLU → dropout, as named submodules so each stage can be hooked separately."""

    def __init__(self, in_features: int, out_features: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = nn.ReLU()  # not inplace: hooks on `linear` must keep the pre-activation value
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(self.linear(x)))


class MLP(nn.Module):
    """Flatten → optional input dropout → hidden layers → linear logits.

    Module paths (for feature hooks / ``student_layers``):

    - ``flatten``: the input as ``[B, C*H*W]``.
    - ``layers.{i}``: hidden layer *i* output (after ReLU and dropout), ``[B, hidden_sizes[i]]``.
    - ``layers.{i}.linear``: its pre-activation (before ReLU) — e.g. for Activation Boundaries.
    - ``layers.{i}.act``: after ReLU, before dropout.
    - ``head``: the logits, ``[B, num_classes]``.
    """

    def __init__(self, in_features: int, num_classes: int, hidden_sizes: list[int],
                 dropout: float = 0.0, input_dropout: float = 0.0):
        super().__init__()
        self.hidden_sizes = list(hidden_sizes)
        self.flatten = nn.Flatten()
        self.input_dropout = nn.Dropout(input_dropout)
        widths = [in_features, *self.hidden_sizes]
        self.layers = nn.ModuleList(HiddenLayer(a, b, dropout) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(self.flatten(x))
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def describe(self) -> str:
        return f"mlp(hidden_sizes={self.hidden_sizes})"


def build_mlp(info, *, hidden_sizes: list[PositiveInt] = (800, 800), dropout: Probability = 0.0,
              input_dropout: Probability = 0.0) -> MLP:
    """Hinton's MNIST nets: 2×1200 (teacher, dropout 0.5, input dropout 0.2), 2×800 (student)."""
    in_features = math.prod(info.input_shape)
    return MLP(in_features, info.num_classes, list(hidden_sizes), dropout, input_dropout)
