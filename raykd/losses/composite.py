"""``DistillLoss``: the weighted sum of a config's terms, and the one object the train loop calls.

Its parameters (regressors, connectors, FT's paraphraser) train with the student: hand
``list(student.parameters()) + list(distill_loss.parameters())`` to the optimiser.

Decisions:
- A term with weight 0 is built (so its config is checked) but neither computed nor reported in
  the distillation stage (with ``alpha: 1`` the default ``ce`` is absent from the dict): every
  reported number is a real, computed value. ``student_paths``/``teacher_paths`` (what to hook
  each step) leave its layers out unless it has a first stage; ``feature_paths(distill)`` (what
  to probe before building) keeps them all.
- Reported values are unweighted, keyed by the term's name, ``name_1``, ``name_2``... on repeats.
- Pretrain mode (FitNets' hint stage, FT's paraphraser, AB/FSP initialisation): only terms with a
  ``pretrain_loss`` and ``epoch < term.pretrain_epochs`` take part, UNWEIGHTED, as RepDistiller's
  init stage sums the raw losses (a weight tuned for the distillation stage, e.g. FT's 500, would
  otherwise scale the reconstruction loss). ``epoch`` counts the pretrain epochs from 0. The
  weight belongs to the distillation stage only, so ``weight: 0`` with ``pretrain_epochs: 30``
  is AB/FSP used purely as initialisation, RepDistiller's setup for both.
- ``ce`` beside a per-token divergence on a top-k cache at T = 1 (the usual language-model mix)
  is computed with it in one pass (``token_divergence_and_ce``): both need the student's
  softmax over the vocabulary, which costs more than the rest of a small student's loss. Same
  values, same gradient, each still reported under its own name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from raykd.errors import ConfigError
from raykd.losses.base import LossInputs
from raykd.losses.language import TokenKD
from raykd.losses.registry import LOSSES, build_term, term_field
from raykd.losses.response import CrossEntropy

if TYPE_CHECKING:  # the config validates names through the loss registry: no import back
    from raykd.config import DistillConfig
    from raykd.teacher.token_topk import TokenTopK


def _shapes(shapes: Mapping[str, torch.Size], paths: list[str], side: str, where: str,
            key: str) -> list[torch.Size]:
    missing = [p for p in paths if p not in shapes]
    if missing:
        raise ConfigError(f"{where}.{side}_layers: no {side} feature {missing[0]!r} was probed "
                          f"for {key}; known paths: {', '.join(shapes) or 'none'}")
    return [torch.Size(shapes[p]) for p in paths]


def _unique_names(keys: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for key in keys:
        n = seen.get(key, 0)
        names.append(key if n == 0 else f"{key}_{n}")
        seen[key] = n + 1
    return names


class DistillLoss(nn.Module):
    """Σ weight·term over ``distill.terms()``; see the module docstring for the decisions."""

    def __init__(self, distill: DistillConfig, student_shapes: Mapping[str, torch.Size],
                 teacher_shapes: Mapping[str, torch.Size]):
        super().__init__()
        cfgs = distill.terms()
        self.names = _unique_names([c.name for c in cfgs])
        self.weights = [float(c.weight) for c in cfgs]
        self.term_student_layers = [list(c.student_layers) for c in cfgs]
        self.term_teacher_layers = [list(c.teacher_layers) for c in cfgs]
        terms = []
        for cfg in cfgs:
            where = term_field(cfg, distill)
            s_paths = list(cfg.student_layers)
            t_paths = list(cfg.teacher_layers)
            own = getattr(LOSSES[cfg.name].cls, "student_only", False)
            s_shapes = _shapes(student_shapes, s_paths, "student", where, cfg.name) \
                if "features" in LOSSES[cfg.name].needs and s_paths and (t_paths or own) else []
            t_shapes = _shapes(teacher_shapes, t_paths, "teacher", where, cfg.name) \
                if s_shapes else []
            terms.append(build_term(cfg, distill, s_shapes, t_shapes, field=where))
        self.terms = nn.ModuleList(terms)
        staged = [i for i, t in enumerate(self.terms) if t.has_pretrain and t.pretrain_epochs > 0]
        active = [i for i, w in enumerate(self.weights) if w > 0 or i in staged]
        self.student_paths = _union(self.term_student_layers[i] for i in active)
        self.teacher_paths = _union(self.term_teacher_layers[i] for i in active)
        self.needs_teacher_features = bool(self.teacher_paths)
        self.needs_teacher_logits = any("logits" in LOSSES[cfgs[i].name].needs for i in active)
        self.needs_labels = any("labels" in LOSSES[cfgs[i].name].needs for i in active)
        self.pretrain_epochs = max((self.terms[i].pretrain_epochs for i in staged), default=0)
        self.fused_ce = _fusable_ce(self.terms, self.weights)

    def forward(self, student_logits: Tensor | None, teacher_logits: Tensor | None,
                labels: Tensor | None, s_feats: Mapping[str, Tensor],
                t_feats: Mapping[str, Tensor], mask: Tensor | None = None, epoch: int = 0,
                pretrain: bool = False, teacher_topk: TokenTopK | None = None
                ) -> tuple[Tensor, dict[str, float]]:
        """(total, {name: unweighted value}); teacher tensors are detached here and in terms.
        ``teacher_topk``: a per-token top-k cache's rows for this batch, read by the language
        terms in place of ``teacher_logits``."""
        if teacher_logits is not None:
            teacher_logits = teacher_logits.detach()
        total: Tensor | None = None
        values: dict[str, float] = {}
        fused = None
        if self.fused_ce and not pretrain and teacher_topk is not None and labels is not None:
            ce_i, token_i = self.fused_ce
            fused = self.terms[token_i].forward_with_ce(
                LossInputs(student_logits=student_logits, teacher_logits=None, labels=labels,
                           mask=mask, epoch=epoch, teacher_topk=teacher_topk),
                self.weights[token_i], self.weights[ce_i])
        for i, term in enumerate(self.terms):
            weight = self.weights[i]
            if fused is not None and i in self.fused_ce:  # both terms' values, one total
                _, divergence, ce = fused
                values[self.names[i]] = float(ce if i == self.fused_ce[0] else divergence)
                if i == min(self.fused_ce):
                    total = fused[0] if total is None else total + fused[0]
                continue
            if pretrain and not (term.has_pretrain and epoch < term.pretrain_epochs):
                continue
            if not pretrain and weight <= 0:
                continue
            inp = LossInputs(
                student_logits=student_logits, teacher_logits=teacher_logits, labels=labels,
                student_feats=[s_feats[p] for p in self.term_student_layers[i]],
                teacher_feats=[t_feats[p].detach() for p in self.term_teacher_layers[i]],
                mask=mask, epoch=epoch, teacher_topk=teacher_topk)
            value = term.pretrain_loss(inp) if pretrain else term(inp)
            contribution = value if pretrain else weight * value
            total = contribution if total is None else total + contribution
            values[self.names[i]] = float(value.detach())
        if total is None:
            total = self._zero(student_logits, s_feats)
        return total, values

    def _zero(self, student_logits: Tensor | None, s_feats: Mapping[str, Tensor]) -> Tensor:
        """A 0 that still belongs to the graph (so ``backward()`` works when nothing applies)."""
        if student_logits is not None:
            return student_logits.sum() * 0.0
        for feat in s_feats.values():
            return feat.sum() * 0.0
        return torch.zeros((), requires_grad=True)


def _fusable_ce(terms, weights: list[float]) -> tuple[int, int] | None:
    """(index of ``ce``, index of the per-token divergence) when the two can share one pass:
    the first unsmoothed ``ce`` and the first token term at T = 1, both weighted above 0."""
    ce = [i for i, t in enumerate(terms) if type(t) is CrossEntropy and weights[i] > 0
          and t.label_smoothing == 0]
    token = [i for i, t in enumerate(terms) if isinstance(t, TokenKD) and weights[i] > 0
             and t.temperature == 1]
    return (ce[0], token[0]) if ce and token else None


def feature_paths(distill: DistillConfig) -> tuple[list[str], list[str]]:
    """(student paths, teacher paths) to probe before building ``DistillLoss``: every layer any
    term of the config names, weight-0 terms included (they are built, so checked, too)."""
    cfgs = distill.terms()
    return (_union(c.student_layers for c in cfgs), _union(c.teacher_layers for c in cfgs))


def _union(lists) -> list[str]:
    out: list[str] = []
    for paths in lists:
        out.extend(p for p in paths if p not in out)
    return out
