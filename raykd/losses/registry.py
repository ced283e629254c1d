"""The catalogue of loss terms (``LOSSES``) and the one place a config entry becomes a term.

``build_term`` checks the user's entry against the term's spec (params, layer lists, shapes) and
raises :class:`ConfigError` naming ``distill.losses.<i>`` before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from raykd.errors import ConfigError
from raykd.losses import feature, language, online, relation, response, uld
from raykd.losses.base import NEEDS, BuildContext, LossTerm

if TYPE_CHECKING:  # the config validates names through this registry: no import back at run time
    from raykd.config import DistillConfig, LossTermConfig


@dataclass(frozen=True)
class LossSpec:
    key: str
    family: str  # response | feature | relation | language | online
    paper: str
    needs: tuple[str, ...]  # ⊆ {"labels", "logits", "features", "pairs"}
    params: dict[str, str]  # param → description with its default
    cls: type[LossTerm]


def _spec(cls: type[LossTerm]) -> LossSpec:
    assert set(cls.needs) <= NEEDS, cls.needs
    return LossSpec(cls.key, cls.family, cls.paper, tuple(cls.needs),
                    {name: p.describe() for name, p in cls.params.items()}, cls)


LOSSES: dict[str, LossSpec] = {
    cls.key: _spec(cls)
    for module in (response, feature, relation, language, uld, online)
    for cls in module.TERMS
}


def describe_losses() -> list[dict[str, Any]]:
    """One row per term for ``raykd losses``: key, family, paper, needs, params."""
    return [{"key": s.key, "family": s.family, "paper": s.paper, "needs": list(s.needs),
             "params": dict(s.params)} for s in LOSSES.values()]


def term_field(cfg: LossTermConfig, distill: DistillConfig) -> str:
    """``distill.losses.<i>`` for a user-listed term; ``distill`` for the default ce + kd."""
    for i, item in enumerate(distill.losses or []):
        if item is cfg:
            return f"distill.losses.{i}"
    for i, item in enumerate(distill.losses or []):
        if item == cfg:
            return f"distill.losses.{i}"
    return "distill"


def check_no_peer_terms(distill: DistillConfig) -> None:
    """Online terms (family ``online``: DML, ONE, BYOT, codistillation) learn from peers trained
    together, which only ``raykd online`` builds; every other verb calls this before Ray starts,
    since there such a term fails in a worker or, codistillation, falls back to CE silently."""
    for i, item in enumerate(distill.losses or []):
        if LOSSES[item.name].family == "online":
            raise ConfigError(f"distill.losses.{i}: {item.name!r} is an online term that needs "
                              f"peers trained together, which only `raykd online` has; run "
                              f"`raykd online --scheme {item.name}` or list an offline term "
                              f"(see `raykd losses`)")


def _parse_params(spec: LossSpec, raw: dict[str, Any], where: str) -> dict[str, Any]:
    schema = spec.cls.params
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        allowed = ", ".join(sorted(schema)) or "none"
        raise ConfigError(f"{where}.params: unknown parameter {unknown[0]!r} for {spec.key}; "
                          f"allowed: {allowed}")
    parsed = {}
    for name, param in schema.items():
        if name in raw and not (param.default is None and raw[name] is None):
            parsed[name] = param.parse(raw[name], f"{where}.params.{name}")
        else:
            parsed[name] = param.default
    return parsed


def _check_layers(spec: LossSpec, cfg: LossTermConfig, where: str,
                  student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> None:
    s_layers, t_layers = list(cfg.student_layers), list(cfg.teacher_layers)
    if "features" not in spec.needs:
        if s_layers or t_layers:
            raise ConfigError(f"{where}: {spec.key} uses logits, not layers; remove "
                              f"student_layers/teacher_layers")
        return
    if getattr(spec.cls, "student_only", False):  # the student's own features, no pairs
        if not s_layers or t_layers:
            raise ConfigError(f"{where}: {spec.key} reads the student's own features; set "
                              f"student_layers only")
        return
    if not s_layers or not t_layers:
        example = "[layer1, layer2, layer3, layer4]" if "pairs" in spec.needs else "[layer3]"
        raise ConfigError(f"{where}: {spec.key} compares features; set student_layers and "
                          f"teacher_layers (module paths, e.g. {example})")
    if len(s_layers) != len(t_layers):
        raise ConfigError(f"{where}: {spec.key} pairs student_layers with teacher_layers "
                          f"one to one; got {len(s_layers)} student paths {s_layers} and "
                          f"{len(t_layers)} teacher paths {t_layers}")
    for side, paths, shapes in (("student", s_layers, student_shapes),
                                ("teacher", t_layers, teacher_shapes)):
        if len(shapes) != len(paths):
            raise ConfigError(f"{where}: {spec.key} got {len(shapes)} {side} shapes for "
                              f"{len(paths)} {side}_layers {paths}")
        for path, shape in zip(paths, shapes, strict=True):
            if len(shape) < 2:
                raise ConfigError(f"{where}: {spec.key} needs batched features; {side} "
                                  f"{path} has shape {list(shape)}")


def build_term(cfg: LossTermConfig, distill: DistillConfig,
               student_shapes: list[torch.Size], teacher_shapes: list[torch.Size],
               *, field: str | None = None) -> LossTerm:
    """The term for one config entry, its connectors sized from the probed shapes.

    ``student_shapes`` / ``teacher_shapes`` follow ``cfg.student_layers`` / ``teacher_layers``
    and include the batch dimension. ``field`` overrides the error prefix (default: the entry's
    position in ``distill.losses``).
    """
    where = field or term_field(cfg, distill)
    spec = LOSSES.get(cfg.name)
    if spec is None:
        raise ConfigError(f"{where}.name: unknown loss {cfg.name!r}; allowed: "
                          f"{', '.join(sorted(LOSSES))}")
    params = _parse_params(spec, dict(cfg.params), where)
    student_shapes = [torch.Size(s) for s in student_shapes]
    teacher_shapes = [torch.Size(s) for s in teacher_shapes]
    _check_layers(spec, cfg, where, student_shapes, teacher_shapes)
    ctx = BuildContext(field=where, key=spec.key, student_layers=list(cfg.student_layers),
                       teacher_layers=list(cfg.teacher_layers), student_shapes=student_shapes,
                       teacher_shapes=teacher_shapes, temperature=float(distill.temperature))
    return spec.cls(ctx, params)


__all__ = ["LOSSES", "LossSpec", "build_term", "check_no_peer_terms", "describe_losses",
           "term_field"]
