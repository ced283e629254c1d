"""Language-model terms: token-level soft targets and transformer-internal matching.

Token tensors are [B, L, ...] with a padding mask [B, L] (true/1 = real token) passed as
``LossInputs.mask``; every term here averages over real tokens only. Hidden states are
[B, L, H] (or pooled [B, H]); attention scores [B, heads, L, L].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raykd.losses.base import (TEMPERATURE, BuildContext, LossInputs, LossTerm,
                               check_rank, connector_param, masked_mean, require_logits)
from raykd.losses.connectors import make_connector
from raykd.losses.response import soft_kl


class TokenKD(LossTerm):
    """Per-token T²·KL(softmax(t/T) ‖ softmax(s/T)) over the vocabulary, averaged over real
    tokens: DistilBERT's L_ce (arXiv 1910.01108) and the usual sequence-model KD."""

    key = "token_kd"
    family = "language"
    paper = "token-level KD: Hinton et al. arXiv 1503.02531 applied per token, as DistilBERT's " \
            "L_ce (Sanh et al. 2019, arXiv 1910.01108)"
    needs = ("logits",)
    params = {"temperature": TEMPERATURE}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        self.temperature = params["temperature"] or ctx.temperature

    def forward(self, inp: LossInputs) -> Tensor:
        s, t = require_logits(inp, self.key)
        if s.dim() != 3:
            raise ValueError(f"token_kd: expects logits [B, L, V], got {list(s.shape)}")
        return soft_kl(s, t, self.temperature, inp.mask)


def _token_mask(inp: LossInputs, feat: Tensor) -> Tensor | None:
    return inp.mask if inp.mask is not None and feat.dim() == 3 else None


class DistilBERTCosine(LossTerm):
    """L_cos = mean over real tokens of 1 − cos(h_S, h_T), the cosine embedding loss with target 1
    (arXiv 1910.01108, §3). A linear projection maps the student width when it differs."""

    key = "distilbert_cos"
    family = "language"
    paper = "Sanh et al. 2019, DistilBERT, a distilled version of BERT, arXiv 1910.01108"
    needs = ("features",)
    params = {"connector": connector_param("auto")}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        check_rank(ctx, (2, 3), "hidden states [L, H] or [H]")
        self.projections = nn.ModuleList(make_connector(ctx, i, params["connector"])
                                         for i in range(len(ctx.student_shapes)))

    def forward(self, inp: LossInputs) -> Tensor:
        total = 0.0
        for projection, (s, t) in zip(self.projections, self.pairs(inp), strict=True):
            cos = F.cosine_similarity(projection(s), t, dim=-1)
            total = total + masked_mean(1.0 - cos, _token_mask(inp, s))
        return total


class TinyBERTHidden(LossTerm):
    """MSE(H_S·W_h, H_T) over real tokens, W_h learned (arXiv 1909.10351, eq. (8)).

    TinyBERT always learns W (``connector: learned``); ``identity`` compares directly. The
    authors' code averages over padding too; here padding is masked out.
    """

    key = "tinybert_hidden"
    family = "language"
    paper = "Jiao et al. 2020, TinyBERT: Distilling BERT for Natural Language Understanding, " \
            "arXiv 1909.10351 (hidden-state loss)"
    needs = ("features",)
    params = {"connector": connector_param("learned")}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        check_rank(ctx, (2, 3), "hidden states [L, H] or [H]")
        self.maps = nn.ModuleList(make_connector(ctx, i, params["connector"])
                                  for i in range(len(ctx.student_shapes)))

    def forward(self, inp: LossInputs) -> Tensor:
        total = 0.0
        for w, (s, t) in zip(self.maps, self.pairs(inp), strict=True):
            total = total + masked_mean((w(s) - t).pow(2), _token_mask(inp, s))
        return total


class TinyBERTEmbedding(TinyBERTHidden):
    """MSE(E_S·W_e, E_T) on the embedding-layer outputs (arXiv 1909.10351, eq. (9))."""

    key = "tinybert_emb"
    paper = "Jiao et al. 2020, TinyBERT, arXiv 1909.10351 (embedding-layer loss)"


class TinyBERTAttention(LossTerm):
    """MSE between unnormalised attention scores [B, heads, L, L] (arXiv 1909.10351, eq. (7)).

    Scores ≤ −100 (the additive −10000 padding mask) are set to 0 as in the authors' code; with a
    token mask only (real query, real key) entries count. Head counts that differ are compared
    after averaging each side over its heads.
    """

    key = "tinybert_attn"
    family = "language"
    paper = "Jiao et al. 2020, TinyBERT, arXiv 1909.10351 (attention-score loss)"
    needs = ("features",)
    params = {}

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        check_rank(ctx, (4,), "attention scores [heads, L, L]")
        for i, (s, t) in enumerate(zip(ctx.student_shapes, ctx.teacher_shapes, strict=True)):
            if s[2:] != t[2:] or s[2] != s[3]:
                raise ctx.error(f"needs square attention maps of one sequence length; "
                                f"{ctx.describe_pair(i)}")

    def forward(self, inp: LossInputs) -> Tensor:
        total = 0.0
        for s, t in self.pairs(inp):
            s = torch.where(s <= -100, torch.zeros_like(s), s)
            t = torch.where(t <= -100, torch.zeros_like(t), t)
            if s.shape[1] != t.shape[1]:
                s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
            sq = (s - t).pow(2)  # [B, heads, L, L]
            if inp.mask is None:
                total = total + sq.mean()
                continue
            m = inp.mask.to(sq.dtype)
            pair_mask = (m.unsqueeze(2) * m.unsqueeze(1)).unsqueeze(1).expand_as(sq)
            total = total + (sq * pair_mask).sum() / pair_mask.sum().clamp_min(1.0)
        return total


TERMS = (TokenKD, DistilBERTCosine, TinyBERTHidden, TinyBERTEmbedding, TinyBERTAttention)
