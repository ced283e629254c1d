"""Online terms: members trained together teach each other (``raykd online``).

Their student logits are a cohort's training output, the members' logits stacked ``[M, B, C]``
(see :mod:`raykd.schemes.online.cohort`); there is no separate teacher. Every target a member
learns from is another member's (or the ensemble's) output, detached: a constant, as the papers
treat it.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from raykd.losses.base import TEMPERATURE, BuildContext, LossInputs, LossTerm, Param
from raykd.losses.response import soft_kl


def _stacked(inp: LossInputs, key: str, members: int = 2) -> Tensor:
    s = inp.student_logits
    if s is None or s.dim() != 3 or s.shape[0] < members or inp.labels is None:
        raise ValueError(f"{key}: needs a cohort's stacked logits [members, B, C] and labels "
                         f"(use it through `raykd online`)")
    return s


class _OnlineTerm(LossTerm):
    """What every online term shares: the members' temperature (``online.temperature``)."""

    family = "online"

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        self.temperature = params["temperature"] or ctx.temperature


class MutualLearning(_OnlineTerm):
    """DML: each peer k learns CE(z_k, y) + T²·mean_{j≠k} KL(p_j ‖ p_k), the other peers'
    predictions detached (Zhang et al. 2018, arXiv 1706.00384); the sum over peers."""

    key = "dml"
    paper = "Zhang et al. 2018, Deep Mutual Learning, arXiv 1706.00384"
    needs = ("labels",)
    params = {"temperature": TEMPERATURE}

    def forward(self, inp: LossInputs) -> Tensor:
        s = _stacked(inp, self.key)
        k = s.shape[0]
        total = s.new_zeros(())
        for i in range(k):
            mimic = sum(soft_kl(s[i], s[j], self.temperature) for j in range(k) if j != i)
            total = total + F.cross_entropy(s[i], inp.labels) + mimic / (k - 1)
        return total


class OnTheFlyEnsemble(_OnlineTerm):
    """ONE: Σ_i CE(z_i) + CE(z_e) + T²·Σ_i KL(p_e ‖ p_i), where the last member is the gated
    ensemble z_e = Σ_i g_i z_i and its soft targets are detached (Lan et al. 2018,
    arXiv 1806.04606)."""

    key = "one"
    paper = "Lan, Zhu, Gong 2018, Knowledge Distillation by On-the-Fly Native Ensemble, " \
            "arXiv 1806.04606"
    needs = ("labels",)
    params = {"temperature": TEMPERATURE}

    def forward(self, inp: LossInputs) -> Tensor:
        s = _stacked(inp, self.key, members=3)
        branches, ensemble = s[:-1], s[-1]
        total = F.cross_entropy(ensemble, inp.labels)
        for z in branches:
            total = total + F.cross_entropy(z, inp.labels) + soft_kl(z, ensemble,
                                                                     self.temperature)
        return total


class BeYourOwnTeacher(_OnlineTerm):
    """BYOT: the deepest exit learns CE; each shallower exit (1−α)·CE + α·T²·KL(p_deep ‖ p_i)
    + λ·‖f_i − f_deep‖², f_i its bottleneck's features and f_deep the deepest features, both
    hooked (``student_layers``: the exits' bottlenecks, then the deepest features), the deepest
    side detached (Zhang et al. 2019, arXiv 1905.08094)."""

    key = "byot"
    paper = "Zhang et al. 2019, Be Your Own Teacher: self distillation, arXiv 1905.08094"
    needs = ("labels", "features")
    student_only = True  # its features are the student's own: no teacher_layers
    params = {"temperature": TEMPERATURE,
              "alpha": Param(0.5, "KD weight of the shallow exits (1 − alpha: CE)", minimum=0.0),
              "hint_weight": Param(0.03, "weight λ of the feature hint", minimum=0.0)}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        self.alpha, self.hint_weight = params["alpha"], params["hint_weight"]

    def forward(self, inp: LossInputs) -> Tensor:
        s = _stacked(inp, self.key)
        *shallow, deep = s
        *bottlenecks, deep_feats = inp.student_feats
        if len(bottlenecks) != len(shallow):
            raise ValueError(f"byot: {len(shallow)} shallow exits but {len(bottlenecks)} "
                             f"bottleneck features")
        target = deep_feats.detach().flatten(1)
        total = F.cross_entropy(deep, inp.labels)
        for z, f in zip(shallow, bottlenecks, strict=True):
            total = (total + (1 - self.alpha) * F.cross_entropy(z, inp.labels)
                     + self.alpha * soft_kl(z, deep, self.temperature)
                     + self.hint_weight * F.mse_loss(f.flatten(1), target, reduction="sum")
                     / len(target))
        return total


class Codistillation(_OnlineTerm):
    """Codistillation: CE(z, y) + w·T²·KL(p_peers ‖ p), p_peers the other groups' stale copies'
    averaged prediction on the same batch (passed as the teacher logits); CE alone during
    burn-in, when there is none yet (Anil et al. 2018, arXiv 1804.03235)."""

    key = "codistill"
    paper = "Anil et al. 2018, Large scale distributed neural network training through online " \
            "distillation, arXiv 1804.03235"
    needs = ("labels",)
    params = {"temperature": TEMPERATURE,
              "distill_weight": Param(1.0, "weight w of the distillation term", minimum=0.0)}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        self.weight = params["distill_weight"]

    def forward(self, inp: LossInputs) -> Tensor:
        if inp.student_logits is None or inp.labels is None:
            raise ValueError("codistill: needs student logits and labels")
        loss = F.cross_entropy(inp.student_logits, inp.labels)
        if inp.teacher_logits is not None and self.weight > 0:
            loss = loss + self.weight * soft_kl(inp.student_logits, inp.teacher_logits,
                                                self.temperature)
        return loss


TERMS = (MutualLearning, OnTheFlyEnsemble, BeYourOwnTeacher, Codistillation)
