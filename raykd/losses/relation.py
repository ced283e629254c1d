"""Relation-based terms: the student matches how the teacher relates samples (or layers).

RKD, SP and PKT compare batch-level structure, so student and teacher widths may differ freely;
FSP compares channel×channel flow matrices between two layers, so channels must agree. Each term
sums over its layer pairs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from raykd.losses.base import (PRETRAIN_EPOCHS, BuildContext, LossInputs, LossTerm, Param,
                               check_rank, check_same_batch, fmt_shape, spatial_match)


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances [B, B] with an exact-zero diagonal (clamped before the sqrt so the
    gradient stays finite, as RepDistiller's pdist)."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=e.dtype, device=e.device))


def normalised_distances(e: Tensor) -> Tensor:
    """ψ_D = ‖e_i − e_j‖ / μ, μ the mean of the non-zero distances (arXiv 1904.05068, eq. (4)).

    Written without boolean indexing (no host sync); a batch of one gives 0, not NaN.
    """
    d = pairwise_distances(e)
    mu = d.sum() / (d > 0).sum().clamp_min(1)
    return d / mu.clamp_min(1e-12)


def angles(e: Tensor) -> Tensor:
    """ψ_A(i, j, k) = ⟨e_ij, e_kj⟩ with unit difference vectors e_ij (eq. (6)), all triplets."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


class RelationalKD(LossTerm):
    """RKD-DA: w_d·Huber(ψ_D^S, ψ_D^T) + w_a·Huber(ψ_A^S, ψ_A^T) (smooth L1, δ = 1)."""

    key = "rkd"
    family = "relation"
    paper = "Park et al. 2019, Relational Knowledge Distillation, arXiv 1904.05068"
    needs = ("features",)
    params = {"dist_weight": Param(25.0, "weight of the distance loss", minimum=0.0),
              "angle_weight": Param(50.0, "weight of the angle loss", minimum=0.0)}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        check_same_batch(ctx)
        self.dist_weight, self.angle_weight = params["dist_weight"], params["angle_weight"]

    def forward(self, inp: LossInputs) -> Tensor:
        total = 0.0
        for s, t in self.pairs(inp):
            s, t = s.flatten(1), t.flatten(1)
            loss_d = F.smooth_l1_loss(normalised_distances(s), normalised_distances(t))
            loss_a = F.smooth_l1_loss(angles(s), angles(t))
            total = total + self.dist_weight * loss_d + self.angle_weight * loss_a
        return total


def similarity_matrix(f: Tensor) -> Tensor:
    """G = row-L2-normalised A·Aᵀ, A the batch's flattened activations (arXiv 1907.09682, eq. 2)."""
    a = f.flatten(1)
    return F.normalize(a @ a.t(), p=2, dim=1)


class SimilarityPreserving(LossTerm):
    """‖G_T − G_S‖²_F / b² (arXiv 1907.09682, eq. (4))."""

    key = "sp"
    family = "relation"
    paper = "Tung & Mori 2019, Similarity-Preserving Knowledge Distillation, arXiv 1907.09682"
    needs = ("features",)
    params = {}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        check_same_batch(ctx)

    def forward(self, inp: LossInputs) -> Tensor:
        total = 0.0
        for s, t in self.pairs(inp):
            b = s.shape[0]
            total = total + (similarity_matrix(t) - similarity_matrix(s)).pow(2).sum() / b**2
        return total


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """G[b, i, j] = Σ_{s,t} F1[b, i, s, t]·F2[b, j, s, t] / (h·w), maps pooled to a common size."""
    first, second = spatial_match(first, second)
    f1, f2 = first.flatten(2), second.flatten(2)
    return torch.bmm(f1, f2.transpose(1, 2)) / f1.shape[-1]


class FlowOfSolution(LossTerm):
    """Mean squared difference of FSP matrices (Yim et al., CVPR 2017, eq. (2) up to its
    per-pair weights λ_i, which are equal in the paper).

    ``student_layers`` and ``teacher_layers`` list two paths per pair: [a1, a2, b1, b2, ...].
    """

    key = "fsp"
    family = "relation"
    paper = "Yim et al. 2017, A Gift from Knowledge Distillation: Fast Optimization, Network " \
            "Minimization and Transfer Learning, CVPR 2017"
    needs = ("features", "pairs")
    params = {"pretrain_epochs": PRETRAIN_EPOCHS}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        check_rank(ctx, (4,), "conv feature maps [C, H, W]")
        if len(ctx.student_layers) % 2:
            raise ctx.error(f"needs two paths per pair in student_layers and teacher_layers; got "
                            f"{len(ctx.student_layers)} paths")
        for i in range(len(ctx.student_shapes)):
            if ctx.student_shapes[i][1] != ctx.teacher_shapes[i][1]:
                raise ctx.error(f"needs matching channel counts (FSP matrices are C1×C2); "
                                f"{ctx.describe_pair(i)}")
        for i in range(0, len(ctx.student_shapes), 2):
            for side, shapes, paths in (("student", ctx.student_shapes, ctx.student_layers),
                                        ("teacher", ctx.teacher_shapes, ctx.teacher_layers)):
                if shapes[i][0] != shapes[i + 1][0]:
                    raise ctx.error(f"needs both layers of a pair from one batch; {side} "
                                    f"{paths[i]} {fmt_shape(shapes[i])} vs {paths[i + 1]}")

    def forward(self, inp: LossInputs) -> Tensor:
        pairs = self.pairs(inp)
        total = 0.0
        for (s1, t1), (s2, t2) in zip(pairs[0::2], pairs[1::2], strict=True):
            total = total + (fsp_matrix(s1, s2) - fsp_matrix(t1, t2)).pow(2).mean()
        return total

    def pretrain_loss(self, inp: LossInputs) -> Tensor:
        return self.forward(inp)


def conditional_probabilities(f: Tensor, eps: float) -> Tensor:
    """Cosine kernel scaled to [0, 1], rows normalised to sum 1 (arXiv 1803.10837, eq. (9)–(10))."""
    a = f.flatten(1)
    a = a / (a.norm(dim=1, keepdim=True) + eps)
    k = (a @ a.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


class ProbabilisticKT(LossTerm):
    """KL(teacher ‖ student) between the conditional probabilities, averaged over all b² entries
    with eps = 1e-7 inside the log, as the authors' code (passalis/probabilistic_kt)."""

    key = "pkt"
    family = "relation"
    paper = "Passalis & Tefas 2018, Learning Deep Representations with Probabilistic " \
            "Knowledge Transfer, arXiv 1803.10837"
    needs = ("features",)
    params = {"eps": Param(1e-7, "ε in the normalisation and the log", positive=True)}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        check_same_batch(ctx)
        self.eps = params["eps"]

    def forward(self, inp: LossInputs) -> Tensor:
        total = 0.0
        for s, t in self.pairs(inp):
            p_s = conditional_probabilities(s, self.eps)
            p_t = conditional_probabilities(t, self.eps)
            total = total + (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()
        return total


TERMS = (RelationalKD, SimilarityPreserving, FlowOfSolution, ProbabilisticKT)
