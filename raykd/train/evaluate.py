"""Evaluation on a split, each rank scoring its strided share and the sums all-reduced: the
one accuracy / cross-entropy helper (:func:`evaluate_split`; token logits count real tokens,
raykd.train.lm_eval), a cohort's members (:func:`evaluate_members`) and plain accuracy."""

from __future__ import annotations

import torch
from torch import nn

from raykd.train.collective import all_reduce_sum


@torch.no_grad()
def evaluate_split(model: nn.Module, dataset, device, rank: int = 0, world: int = 1,
                   batch_size: int = 1024) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over ``dataset``, each rank scoring its strided share.
    Token logits [B, L, V] (language models) count real tokens: next-token accuracy and nats
    per token (raykd.train.lm_eval)."""
    from raykd.train.lm_eval import token_sums

    vocab = getattr(dataset.info, "vocab_size", None)
    if vocab:  # token logits: at most ~256 MB of float32 [B, L, V] per pass
        length = int(dataset.info.input_shape[0])
        batch_size = max(1, min(batch_size, (1 << 26) // (length * vocab)))
    was_training = model.training
    model.eval()
    correct = total = loss = 0.0
    idx_all = torch.arange(len(dataset))[rank::world]  # empty for a rank past the end
    for chunk in idx_all.split(batch_size):
        _, x, y = dataset.get_batch(chunk)
        logits = model(x.to(device))
        y = y.to(logits.device)
        if logits.dim() == 3:
            c, n, nll = token_sums(logits, y)
            correct, total, loss = correct + c, total + n, loss + nll
            continue
        correct += float((logits.argmax(-1) == y).sum())
        loss += float(torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
        total += len(y)
    model.train(was_training)
    correct, total, loss = all_reduce_sum([correct, total, loss], world)
    return correct / max(total, 1), loss / max(total, 1)


@torch.no_grad()
def evaluate_members(cohort: nn.Module, dataset, device, rank: int = 0, world: int = 1,
                     batch_size: int = 1024) -> dict[str, tuple[float, float]]:
    """(accuracy, mean cross-entropy) of every member of a cohort and of its ensemble
    (``cohort.members(x)``, see raykd.models.cohort), each rank scoring its strided share."""
    was_training = cohort.training
    cohort.eval()
    names = list(cohort.members(dataset.get_batch(torch.arange(min(2, len(dataset))))[1]
                                .to(device)))
    sums: dict[str, list[float]] = {}
    total = 0.0
    for chunk in torch.arange(len(dataset))[rank::world].split(batch_size):
        _, x, y = dataset.get_batch(chunk)
        y = y.to(device)
        for name, logits in cohort.members(x.to(device)).items():
            acc_loss = sums.setdefault(name, [0.0, 0.0])
            acc_loss[0] += float((logits.argmax(-1) == y).sum())
            acc_loss[1] += float(torch.nn.functional.cross_entropy(logits.float(), y,
                                                                   reduction="sum"))
        total += len(y)
    cohort.train(was_training)
    flat = [total] + [v for n in names for v in sums.get(n, [0.0, 0.0])]
    flat = all_reduce_sum(flat, world)
    total = max(flat[0], 1)
    return {n: (flat[1 + 2 * i] / total, flat[2 + 2 * i] / total) for i, n in enumerate(names)}


def evaluate(model: nn.Module, dataset, device, rank: int = 0, world: int = 1,
             batch_size: int = 1024) -> float:
    """Accuracy over ``dataset``, each rank scoring its strided share."""
    return evaluate_split(model, dataset, device, rank, world, batch_size)[0]
