"""What one optimizer step computes on a worker: the role's plan (teacher, student, baseline),
the student's forward with its hooked features and the loss in one module (DDP wraps it), and the
optimizer the config names. The loop (raykd.train.loop) drives it epoch by epoch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from raykd.config import DistillConfig, LossTermConfig, ModelConfig, RaykdConfig
from raykd.models.hooks import FeatureHooks
from raykd.train.lm_eval import agreement_sums
from raykd.train.precision import Precision, to_float32


@dataclass(frozen=True)
class RolePlan:
    """What differs between training the teacher, the student and the baseline."""

    role: str
    model: ModelConfig
    distill: DistillConfig
    epochs: int
    lr: float
    jitter: int

    @staticmethod
    def of(cfg: RaykdConfig, role: str) -> RolePlan:
        hard_labels = DistillConfig(losses=[LossTermConfig(name="ce")])
        if role == "teacher":
            return RolePlan(role, cfg.teacher, hard_labels, cfg.teacher.epochs or cfg.train.epochs,
                            cfg.teacher.lr or cfg.train.lr, cfg.teacher.jitter)
        distill = cfg.distill if role == "student" else hard_labels
        return RolePlan(role, cfg.student, distill, cfg.train.epochs, cfg.train.lr,
                        cfg.train.jitter)


class DistillStep(nn.Module):
    """Student forward (features taken by hooks) + loss in one module, so DDP sees every learned
    parameter — the student's and the loss terms' regressors — inside its forward."""

    # False when the teacher's ids are another tokenizer's (teacher.tokenizer, token_uld): the
    # same id names different strings, so top-1 agreement means nothing (set by the loop)
    count_agreement = True

    def __init__(self, student: nn.Module, loss: nn.Module, paths: list[str], precision=None):
        super().__init__()
        self.student, self.loss = student, loss
        self.precision = precision or Precision("fp32", "cpu")
        self._hooks = FeatureHooks(student, paths, "student").__enter__() if paths else None

    def forward(self, x, t_logits, y, t_feats, epoch: int, pretrain: bool, mask=None,
                t_topk=None):
        with self.precision.autocast():  # train.precision: see raykd/train/precision.py
            logits = self.student(x)
        # Language models: top-1 agreement with the teacher (its cached top-1, or its argmax
        # in live mode), read by the loop after the step.
        self.agreement = None
        top1 = t_topk.ids[..., 0] if t_topk is not None else (
            t_logits.argmax(-1) if t_logits is not None and t_logits.dim() == 3 else None)
        if not self.count_agreement:
            top1 = None
        if top1 is not None and mask is not None:
            with torch.no_grad():
                self.agreement = agreement_sums(logits, top1, mask)
        s_feats = dict(self._hooks.features) if self._hooks else {}
        if self.precision.dtype is not None:  # the loss in float32
            logits, s_feats = to_float32(logits), to_float32(s_feats)
        with self.precision.full():
            total, parts = self.loss(logits, t_logits, y, s_feats, t_feats, mask=mask,
                                     epoch=epoch, pretrain=pretrain, teacher_topk=t_topk)
        return total, parts


def topk_to(topk, device):
    """A batch's TokenTopK on the training device."""
    return dataclasses.replace(topk, values=topk.values.to(device), ids=topk.ids.to(device),
                               tail_logmass=topk.tail_logmass.to(device))


def make_optimizer(params, cfg: RaykdConfig, lr: float) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=t.weight_decay)
