"""What every loss term shares: its inputs, its base class, its parameter schema, shape checks.

A term is an ``nn.Module`` built once from the shapes the hooks probed (so regressors and
connectors exist before the optimiser is created) and then called every step with
:class:`LossInputs`. Teacher tensors are constants in every method here: terms detach them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from raykd.errors import ConfigError

if TYPE_CHECKING:  # the teacher package imports torch models; the losses need only the type
    from raykd.teacher.token_topk import TokenTopK

NEEDS = frozenset({"labels", "logits", "features", "pairs"})


@dataclass
class LossInputs:
    """One step's tensors for one term; feature lists follow the term's layer lists."""

    student_logits: Tensor | None
    teacher_logits: Tensor | None
    labels: Tensor | None
    student_feats: list[Tensor] = field(default_factory=list)
    teacher_feats: list[Tensor] = field(default_factory=list)
    mask: Tensor | None = None  # [B, L], true/1 on real tokens, false/0 on padding
    epoch: int = 0  # 0-based; in pretrain mode it counts the pretrain epochs
    # A per-token top-k cache's rows for this batch ([B, L] positions); the language terms read
    # it instead of teacher_logits (one or the other, not both).
    teacher_topk: TokenTopK | None = None


@dataclass(frozen=True)
class Param:
    """One user-settable parameter of a term: ``kind`` is "float", "int", "bool" or "choice"."""

    default: Any
    help: str
    kind: str = "float"
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    positive: bool = False  # strictly > 0
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.help} ({'|'.join(self.choices)}, default {self.default})"
        default = "distill.temperature" if self.default is None else self.default
        return f"{self.help} (default {default})"

    def parse(self, value: Any, where: str) -> Any:
        if self.kind == "choice":
            if value not in self.choices:
                raise ConfigError(f"{where}: {value!r} is not allowed; allowed: "
                                  f"{', '.join(self.choices)}")
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if self.kind == "int":
            if float(value) != int(value):
                raise ConfigError(f"{where}: expected a whole number, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        if self.positive and value <= 0:
            raise ConfigError(f"{where}: must be > 0, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"{where}: must be >= {self.minimum:g}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigError(f"{where}: must be <= {self.maximum:g}, got {value!r}")
        return value


TEMPERATURE = Param(None, "softmax temperature T", positive=True)
PRETRAIN_EPOCHS = Param(0, "epochs of the term's own first stage before distillation", "int",
                        minimum=0)


def connector_param(default: str) -> Param:
    return Param(default, "student→teacher map: auto = identity when widths match, else "
                 "learned", "choice", choices=("auto", "learned", "identity"))


@dataclass(frozen=True)
class BuildContext:
    """What a term may know when it is built: who it is, its layers and their probed shapes."""

    field: str  # "distill.losses.3" — the prefix of every ConfigError it raises
    key: str
    student_layers: list[str]
    teacher_layers: list[str]
    student_shapes: list[torch.Size]  # with the batch dimension
    teacher_shapes: list[torch.Size]
    temperature: float  # distill.temperature, the default for `temperature` params

    def error(self, what: str) -> ConfigError:
        return ConfigError(f"{self.field}: {self.key} {what}")

    def describe_pair(self, i: int) -> str:
        return (f"student {self.student_layers[i]} {fmt_shape(self.student_shapes[i])} vs "
                f"teacher {self.teacher_layers[i]} {fmt_shape(self.teacher_shapes[i])}")


def fmt_shape(shape: Sequence[int]) -> str:
    """A probed shape without its batch dimension, as users write it: ``[64, 8, 8]``."""
    return "[" + ", ".join(str(int(d)) for d in list(shape)[1:]) + "]"


class LossTerm(nn.Module):
    """Base of every term. Subclasses set the class attributes and implement ``forward``.

    A subclass with a first stage (FitNets' hint stage, FT's paraphraser) also defines
    ``pretrain_loss(inp) -> Tensor``; ``pretrain_epochs`` then comes from its params.
    """

    key: ClassVar[str]
    family: ClassVar[str]
    paper: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]
    params: ClassVar[dict[str, Param]] = {}
    pretrain_epochs: int = 0

    def __init__(self, ctx: BuildContext, params: dict[str, Any]):
        super().__init__()
        self.ctx_field = ctx.field
        self.pretrain_epochs = int(params.get("pretrain_epochs", 0))

    @property
    def has_pretrain(self) -> bool:
        return callable(getattr(self, "pretrain_loss", None))

    def forward(self, inp: LossInputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pairs(self, inp: LossInputs) -> list[tuple[Tensor, Tensor]]:
        """(student, detached teacher) feature pairs; the teacher is a constant."""
        if len(inp.student_feats) != len(inp.teacher_feats):
            raise ValueError(f"{self.key}: {len(inp.student_feats)} student features vs "
                             f"{len(inp.teacher_feats)} teacher features")
        return [(s, t.detach()) for s, t in zip(inp.student_feats, inp.teacher_feats, strict=True)]


def require_logits(inp: LossInputs, key: str, labels: bool = False) -> tuple[Tensor, Tensor]:
    if inp.student_logits is None or inp.teacher_logits is None:
        raise ValueError(f"{key}: needs student and teacher logits")
    if labels and inp.labels is None:
        raise ValueError(f"{key}: needs labels")
    return inp.student_logits, inp.teacher_logits.detach()


def check_rank(ctx: BuildContext, ranks: tuple[int, ...], what: str) -> None:
    """Every layer of the term must have one of ``ranks`` dimensions (batch included)."""
    for i in range(len(ctx.student_shapes)):
        for side, shape, path in (("student", ctx.student_shapes[i], ctx.student_layers[i]),
                                  ("teacher", ctx.teacher_shapes[i], ctx.teacher_layers[i])):
            if len(shape) not in ranks:
                raise ctx.error(f"needs {what}; {side} {path} is {fmt_shape(shape)}")


def check_same_batch(ctx: BuildContext) -> None:
    """Relation terms compare samples, so both sides must carry the same batch."""
    for i, (s, t) in enumerate(zip(ctx.student_shapes, ctx.teacher_shapes, strict=True)):
        if s[0] != t[0]:
            raise ctx.error(f"needs the same batch size on both sides; {ctx.describe_pair(i)}")


def spatial_match(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger 4-D map to the smaller one's H×W (as RepDistiller)."""
    if s.dim() != 4 or s.shape[2:] == t.shape[2:]:
        return s, t
    h, w = min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3])
    if s.shape[2:] != (h, w):
        s = nn.functional.adaptive_avg_pool2d(s, (h, w))
    if t.shape[2:] != (h, w):
        t = nn.functional.adaptive_avg_pool2d(t, (h, w))
    return s, t


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` [B, L, ...] over the real tokens of ``mask`` [B, L] (all if None)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    while m.dim() < values.dim():
        m = m.unsqueeze(-1)
    m = m.expand_as(values)
    return (values * m).sum() / m.sum().clamp_min(1.0)
