"""Feature-based terms: the student matches what the teacher computes inside, layer by layer.

Each term gets its layer pairs in the order of ``student_layers`` / ``teacher_layers`` and sums
its per-pair loss over them (as the authors' code does for AT, NST and FSP). Conv maps of
different H×W are adaptive-average-pooled to the smaller size (RepDistiller's convention).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raykd.losses.base import (PRETRAIN_EPOCHS, BuildContext, LossInputs, LossTerm, Param,
                               check_rank, connector_param, spatial_match)
from raykd.losses.connectors import Paraphraser, Translator, connect, make_connector


class FitNets(LossTerm):
    """Hint loss ½‖u_T − r(v_S)‖² with a learned regressor r (arXiv 1412.6550, eq. (3)).

    Mean-reduced over elements as RepDistiller's HintLoss (``nn.MSELoss``), keeping the paper's ½
    (so RepDistiller's β = 100 is weight 200 here). r is a 1×1 conv for conv maps, linear for
    vectors, identity when the widths already match. The hint stage (stage 1) is
    ``pretrain_epochs`` epochs of this loss alone.
    """

    key = "fitnets"
    family = "feature"
    paper = "Romero et al. 2015, FitNets: Hints for Thin Deep Nets, arXiv 1412.6550"
    needs = ("features",)
    params = {"pretrain_epochs": PRETRAIN_EPOCHS, "connector": connector_param("auto")}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        self.regressors = nn.ModuleList(make_connector(ctx, i, params["connector"])
                                        for i in range(len(ctx.student_shapes)))

    def forward(self, inp: LossInputs) -> Tensor:
        total = 0.0
        for regressor, (s, t) in zip(self.regressors, self.pairs(inp), strict=True):
            s, t = connect(regressor, s, t)
            total = total + 0.5 * (s - t).pow(2).mean()
        return total

    def pretrain_loss(self, inp: LossInputs) -> Tensor:
        return self.forward(inp)


def attention_map(f: Tensor, p: float) -> Tensor:
    """Q = vec(mean_c |A_c|^p), L2-normalised per sample (arXiv 1612.03928, §3.1; the mean
    instead of the paper's sum is the authors' code and cancels in the normalisation)."""
    return F.normalize(f.abs().pow(p).mean(1).reshape(f.shape[0], -1), dim=1)


class AttentionTransfer(LossTerm):
    """(β/2)·Σ_pairs mean_{b,j}(Q_S − Q_T)², as szagoruyko/attention-transfer's cifar.py.

    The paper's eq. (2) writes a p-norm of the difference; the authors' code (and RepDistiller)
    use the mean squared difference, with β = 1000 and the ½ (RepDistiller drops the ½).
    """

    key = "at"
    family = "feature"
    paper = "Zagoruyko & Komodakis 2017, Paying More Attention to Attention, arXiv 1612.03928"
    needs = ("features",)
    params = {"p": Param(2.0, "power p of |A|^p", positive=True),
              "beta": Param(1000.0, "β; the loss is (β/2)·Σ mean (Q_S − Q_T)²", minimum=0.0)}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        check_rank(ctx, (4,), "conv feature maps [C, H, W]")
        self.p, self.beta = params["p"], params["beta"]

    def forward(self, inp: LossInputs) -> Tensor:
        total = 0.0
        for s, t in self.pairs(inp):
            s, t = spatial_match(s, t)
            diff = attention_map(s, self.p) - attention_map(t, self.p)
            total = total + diff.pow(2).mean()
        return self.beta / 2 * total


def poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """mean over the batch and channel pairs of k(a_i, b_j) = (a_iᵀ b_j)², a, b [B, C, N]."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


class NeuronSelectivityTransfer(LossTerm):
    """Squared MMD between the channel distributions, polynomial kernel d=2, c=0.

    Each channel's spatial map, L2-normalised, is one sample (arXiv 1707.01219, eq. (5)); so the
    channel counts may differ and only H×W must agree (pooled to the smaller).
    """

    key = "nst"
    family = "feature"
    paper = "Huang & Wang 2017, Like What You Like: Neuron Selectivity Transfer, arXiv 1707.01219"
    needs = ("features",)
    params = {}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        check_rank(ctx, (4,), "conv feature maps [C, H, W]")

    def forward(self, inp: LossInputs) -> Tensor:
        total = 0.0
        for s, t in self.pairs(inp):
            s, t = spatial_match(s, t)
            s = F.normalize(s.reshape(s.shape[0], s.shape[1], -1), dim=2)
            t = F.normalize(t.reshape(t.shape[0], t.shape[1], -1), dim=2)
            total = total + (poly_kernel_mean(t, t) + poly_kernel_mean(s, s)
                             - 2 * poly_kernel_mean(s, t))
        return total


class FactorTransfer(LossTerm):
    """‖F_T/‖F_T‖₂ − F_S/‖F_S‖₂‖₁ (element mean) between paraphrased teacher factors and
    translated student factors (arXiv 1802.04977, eq. (3), p = 1).

    The paraphraser is trained on teacher features with the reconstruction loss ‖x − P(x)‖²
    (eq. (1)) during ``pretrain_epochs``; afterwards it is fixed, so F_T is a constant. With
    ``pretrain_epochs: 0`` it stays at its random initialisation (RepDistiller trains it 30).
    """

    key = "ft"
    family = "feature"
    paper = "Kim, Park, Kwak 2018, Paraphrasing Complex Network: Network Compression via " \
            "Factor Transfer, arXiv 1802.04977"
    needs = ("features",)
    params = {"pretrain_epochs": PRETRAIN_EPOCHS,
              "rate": Param(0.5, "paraphrase rate k: factor channels = k · teacher channels",
                            positive=True)}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        check_rank(ctx, (4,), "conv feature maps [C, H, W]")
        paraphrasers, translators = [], []
        for s_shape, t_shape in zip(ctx.student_shapes, ctx.teacher_shapes, strict=True):
            factor = max(1, round(params["rate"] * int(t_shape[1])))
            paraphrasers.append(Paraphraser(int(t_shape[1]), factor))
            translators.append(Translator(int(s_shape[1]), factor))
        self.paraphrasers = nn.ModuleList(paraphrasers)
        self.translators = nn.ModuleList(translators)

    def forward(self, inp: LossInputs) -> Tensor:
        total = 0.0
        for paraphraser, translator, (s, t) in zip(self.paraphrasers, self.translators,
                                                   self.pairs(inp), strict=True):
            s, t = spatial_match(s, t)
            with torch.no_grad():
                factor_t, _ = paraphraser(t)
            factor_s = translator(s)
            diff = (F.normalize(factor_s.flatten(1), dim=1)
                    - F.normalize(factor_t.flatten(1), dim=1))
            total = total + diff.abs().mean()
        return total

    def pretrain_loss(self, inp: LossInputs) -> Tensor:
        total = 0.0
        for paraphraser, (_, t) in zip(self.paraphrasers, self.pairs(inp), strict=True):
            _, rebuilt = paraphraser(t)
            total = total + (rebuilt - t).pow(2).mean()
        return total


def ab_hinge(source: Tensor, target: Tensor, margin: float) -> Tensor:
    """Σ squared hinge of arXiv 1811.03233 eq. (4): where the teacher neuron is active (> 0) the
    student should exceed +μ, where inactive stay below −μ."""
    on = (target > 0).to(source.dtype)
    return ((source + margin).pow(2) * ((source > -margin).to(source.dtype) * (1 - on))
            + (source - margin).pow(2) * ((source <= margin).to(source.dtype) * on)).sum()


class ActivationBoundaries(LossTerm):
    """Activation-boundary transfer: squared hinge, margin μ, summed over neurons, averaged over
    the batch, on connector-mapped student pre-activations vs the teacher's sign.

    Hook pre-ReLU tensors (``path:input``). The connector is a 1×1 conv + BN as the paper's
    (§3.3). The AB authors weight layers by 2^(i−n+1) and scale by 3/1000; here each layer pair
    counts once and the scale is the term's weight (several terms give per-layer weights). The
    paper uses AB as initialisation: ``weight: 0`` with ``pretrain_epochs: N`` does exactly that.
    """

    key = "ab"
    family = "feature"
    paper = "Heo et al. 2019, Knowledge Transfer via Distillation of Activation Boundaries " \
            "Formed by Hidden Neurons, arXiv 1811.03233"
    needs = ("features",)
    params = {"margin": Param(1.0, "margin μ", minimum=0.0),
              "pretrain_epochs": PRETRAIN_EPOCHS,
              "connector": connector_param("learned")}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        self.margin = params["margin"]
        self.connectors = nn.ModuleList(make_connector(ctx, i, params["connector"],
                                                       batch_norm=True)
                                        for i in range(len(ctx.student_shapes)))

    def forward(self, inp: LossInputs) -> Tensor:
        total = 0.0
        for connector, (s, t) in zip(self.connectors, self.pairs(inp), strict=True):
            s, t = connect(connector, s, t)
            total = total + ab_hinge(s, t, self.margin) / s.shape[0]
        return total

    def pretrain_loss(self, inp: LossInputs) -> Tensor:
        return self.forward(inp)


TERMS = (FitNets, AttentionTransfer, NeuronSelectivityTransfer, FactorTransfer,
         ActivationBoundaries)
