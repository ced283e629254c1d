"""Class-bias shifts of a trained classifier (Hinton, Vinyals & Dean 2015, arXiv 1503.02531, §3).

A student distilled on a transfer set that lacks a class (or holds only a few classes) learns the
right *relative* evidence for the class but a wrong *bias*: with every 3 removed, the bias of class
3 is far too low; with only 7s and 8s, the biases of 7 and 8 are far too high. Adding one scalar
δ to the logits bias of those classes repairs most of it. The paper chose δ on the test set; here
δ is chosen on whatever labelled split the caller passes (the Hinton job passes the held-out
validation split, never the test split), and the choice records which split it was and that
split's content checksum so a reader can check it.

Adding δ to ``head.bias[c]`` adds δ to logit c for every input, so the scan works on logits
computed once: no model call per candidate δ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from raykd.models.hooks import resolve_module


@dataclass(frozen=True)
class ShiftChoice:
    """The δ that maximised accuracy on ``split`` and what it did there."""

    classes: tuple[int, ...]
    delta: float
    split: str  # which labelled split chose δ ("val" in the Hinton job)
    dataset_checksum: str  # IndexedDataset.checksum() of that split: proof of what was used
    accuracy_before: float  # on ``split``, δ = 0
    accuracy_after: float  # on ``split``, δ chosen
    grid: tuple[float, float, float]  # low, high, step
    tied: int  # how many grid values reached the best accuracy (δ = the middle one)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["classes"], out["grid"] = list(self.classes), list(self.grid)
        return out


def shift_grid(low: float, high: float, step: float) -> torch.Tensor:
    """``low, low+step, ..., high`` (float64, rounded so 0.1 steps print as 0.1, 0.2, ...)."""
    if not (step > 0 and high >= low):
        raise ValueError(f"bias grid needs low <= high and step > 0, got {low}, {high}, {step}")
    n = int(math.floor((high - low) / step + 1e-9)) + 1
    return torch.round((low + step * torch.arange(n, dtype=torch.float64)) * 1e6) / 1e6


@torch.no_grad()
def logits_of(model: nn.Module, dataset, batch_size: int = 2048) -> torch.Tensor:
    """Float32 logits [N, C] of ``model`` (in eval mode) over an IndexedDataset."""
    was_training = model.training
    model.eval()
    out = [model(dataset.get_batch(chunk)[1]).float()
           for chunk in torch.arange(len(dataset)).split(batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def accuracy_by_shift(logits: torch.Tensor, labels: torch.Tensor, classes: list[int] | tuple,
                      deltas: torch.Tensor) -> torch.Tensor:
    """Accuracy [len(deltas)] of ``logits`` with δ added to the columns of ``classes``."""
    mask = torch.zeros(logits.shape[-1], dtype=logits.dtype)
    mask[list(classes)] = 1.0
    acc = torch.empty(len(deltas), dtype=torch.float64)
    for i, d in enumerate(deltas.tolist()):
        pred = (logits + d * mask).argmax(-1)
        acc[i] = (pred == labels).double().mean() if len(labels) else 0.0
    return acc


def best_shift(logits: torch.Tensor, labels: torch.Tensor, classes: list[int] | tuple,
               deltas: torch.Tensor) -> tuple[float, int]:
    """(δ, number of tied δs): the middle of the grid values that reach the best accuracy.

    Accuracy is flat over a range of δ (a few more or fewer borderline inputs flip); the middle
    of that plateau is the choice least sensitive to where the grid happens to start."""
    acc = accuracy_by_shift(logits, labels, classes, deltas)
    best = torch.nonzero(acc == acc.max()).flatten()
    return float(deltas[best[len(best) // 2]]), len(best)


def choose_bias_shift(model: nn.Module, classes: list[int] | tuple, dataset, split: str,
                      grid: tuple[float, float, float] = (-15.0, 15.0, 0.1)) -> ShiftChoice:
    """Scan δ over ``grid`` on ``dataset`` (a labelled IndexedDataset named ``split``); return the
    δ that maximises accuracy there. The model is not changed (see :func:`apply_bias_shift`)."""
    deltas = shift_grid(*grid)
    logits = logits_of(model, dataset)
    delta, tied = best_shift(logits, dataset.labels, classes, deltas)
    before, after = accuracy_by_shift(logits, dataset.labels, classes,
                                      torch.tensor([0.0, delta], dtype=torch.float64)).tolist()
    return ShiftChoice(classes=tuple(int(c) for c in classes), delta=delta, split=split,
                       dataset_checksum=dataset.checksum(), accuracy_before=before,
                       accuracy_after=after, grid=tuple(float(g) for g in grid), tied=tied)


def head_of(model: nn.Module, path: str = "head") -> nn.Linear:
    head = resolve_module(model, path, "student")
    if not isinstance(head, nn.Linear) or head.bias is None:
        raise ValueError(f"student: module {path!r} is not a Linear layer with a bias")
    return head


@torch.no_grad()
def apply_bias_shift(model: nn.Module, classes: list[int] | tuple, delta: float,
                     head: str = "head") -> nn.Module:
    """Add ``delta`` to the logits bias of ``classes`` in place; returns the model."""
    layer = head_of(model, head)
    layer.bias[list(classes)] += delta
    return model


@torch.no_grad()
def error_counts(model: nn.Module, dataset, classes: list[int] | tuple = ()) -> dict:
    """Errors over ``dataset``: total, and per class in ``classes`` (with that class's size)."""
    pred = logits_of(model, dataset).argmax(-1)
    wrong = pred != dataset.labels
    per_class = {int(c): int(wrong[dataset.labels == c].sum()) for c in classes}
    sizes = {int(c): int((dataset.labels == c).sum()) for c in classes}
    return {"errors": int(wrong.sum()), "total": len(dataset), "class_errors": per_class,
            "class_sizes": sizes}
