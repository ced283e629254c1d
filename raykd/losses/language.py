"""Language-model terms: token-level soft targets and transformer-internal matching.

Token tensors are [B, L, ...] with a padding mask [B, L] (true/1 = real token) passed as
``LossInputs.mask``; every term here averages over real tokens only. The soft-target terms
(``token_kd``, ``token_rkl``, ``token_gkd``) read dense teacher logits or a per-token top-k cache
(``LossInputs.teacher_topk``); their math is in ``token_divergence.py``. Hidden states are
[B, L, H] (or pooled [B, H]); attention scores [B, heads, L, L].
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raykd.losses.base import (TEMPERATURE, BuildContext, LossInputs, LossTerm, Param,
                               check_rank, connector_param, masked_mean)
from raykd.losses.connectors import make_connector
from raykd.losses.response import soft_kl
from raykd.losses.token_divergence import token_divergence, token_divergence_and_ce

if TYPE_CHECKING:
    from raykd.teacher.token_topk import TokenTopK


CHUNK = Param(128, "sequence positions per step on a top-k cache and for the reverse/JSD terms "
              "(dense token_kd runs in one pass); memory: about 7 float32 [batch·chunk, vocab] "
              "tensors at a time", "int", positive=True)


def _teacher(inp: LossInputs, key: str) -> tuple[Tensor, Tensor | None, TokenTopK | None]:
    """(student logits [B, L, V], dense teacher logits or None, top-k cache rows or None)."""
    if inp.student_logits is None:
        raise ValueError(f"{key}: needs student logits")
    s = inp.student_logits
    if s.dim() != 3:
        raise ValueError(f"{key}: expects logits [B, L, V], got {list(s.shape)}")
    if (inp.teacher_logits is None) == (inp.teacher_topk is None):
        raise ValueError(f"{key}: needs teacher_logits or teacher_topk (exactly one), got "
                         + ("both" if inp.teacher_logits is not None else "neither"))
    t = None if inp.teacher_logits is None else inp.teacher_logits.detach()
    return s, t, inp.teacher_topk


class TokenKD(LossTerm):
    """Per-token T²·KL(softmax(t/T) ‖ softmax(s/T)) over the vocabulary, averaged over real
    tokens: DistilBERT's L_ce (arXiv 1910.01108) and the usual sequence-model KD. With a top-k
    cache (``LossInputs.teacher_topk``) the KL is over its k ids plus one tail bucket
    (``token_divergence.py``), chunked along the sequence; dense logits take ``soft_kl``."""

    key = "token_kd"
    family = "language"
    paper = "token-level KD: Hinton et al. arXiv 1503.02531 applied per token, as DistilBERT's " \
            "L_ce (Sanh et al. 2019, arXiv 1910.01108)"
    needs = ("logits",)
    params = {"temperature": TEMPERATURE, "chunk": CHUNK}
    kind = "forward"

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__(ctx, params)
        self.temperature = params["temperature"] or ctx.temperature
        self.chunk = int(params["chunk"])
        self.beta = float(params.get("beta", 0.5))

    def forward(self, inp: LossInputs) -> Tensor:
        s, t, cache = _teacher(inp, self.key)
        if t is not None and self.kind == "forward":
            if t.shape != s.shape:
                raise ValueError(f"{self.key}: teacher logits {list(t.shape)} vs student "
                                 f"{list(s.shape)}")
            return soft_kl(s, t, self.temperature, inp.mask)
        return token_divergence(s, kind=self.kind, temperature=self.temperature,
                                teacher_logits=t, teacher_topk=cache, mask=inp.mask,
                                beta=self.beta, chunk=self.chunk)

    def forward_with_ce(self, inp: LossInputs, weight: float, ce_weight: float
                        ) -> tuple[Tensor, Tensor, Tensor] | None:
        """(weight·this + ce_weight·CE, this, CE) in one pass over the top-k cache, for
        ``DistillLoss`` (see ``token_divergence_and_ce``); None where that does not apply."""
        s = inp.student_logits
        if (inp.teacher_topk is None or s is None or s.dim() != 3 or self.temperature != 1
                or inp.labels is None or inp.labels.shape != s.shape[:2]):
            return None
        return token_divergence_and_ce(s, inp.labels, kind=self.kind, weight=weight,
                                       ce_weight=ce_weight, teacher_topk=inp.teacher_topk,
                                       mask=inp.mask, beta=self.beta, chunk=self.chunk)


class TokenRKL(TokenKD):
    """Per-token T²·KL(softmax(s/T) ‖ softmax(t/T)), the reverse (mode-seeking) KL, averaged
    over real tokens; dense logits or the top-k cache's k + 1 buckets, chunked."""

    key = "token_rkl"
    paper = "reverse KL per token: Gu et al. 2024, MiniLLM: Knowledge Distillation of Large " \
            "Language Models, arXiv 2306.08543"
    kind = "reverse"


class TokenGKD(TokenKD):
    """Per-token T²·JSD_β(p_T, p_S) = β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m), m = β·p_T + (1−β)·p_S,
    averaged over real tokens. β = 0 is forward KL and β = 1 reverse KL (the formula itself is 0
    there; TRL's convention, see ``token_divergence.py``). Supervised (fixed-data) GKD only: the
    on-policy part, training on the student's own samples, belongs to the train loop."""

    key = "token_gkd"
    paper = "generalised JSD: Agarwal et al. 2024, On-Policy Distillation of Language Models: " \
            "Learning from Self-Generated Mistakes (GKD), arXiv 2306.13649"
    params = {"temperature": TEMPERATURE, "chunk": CHUNK,
              "beta": Param(0.5, "JSD interpolation β: 0 = forward KL, 1 = reverse KL",
                            minimum=0.0, maximum=1.0)}
    kind = "gkd"


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


TERMS = (TokenKD, TokenRKL, TokenGKD, DistilBERTCosine, TinyBERTHidden, TinyBERTEmbedding,
         TinyBERTAttention)
