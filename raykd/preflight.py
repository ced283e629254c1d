"""Check everything that can be checked before a cluster or an MLflow run is started.

Config validation catches bad keys and values; this builds the dataset description, both models
and the loss terms on a tiny probe batch, so an unknown model argument, a module path that does not
exist or feature shapes that cannot be matched become one clear line — not a worker traceback.
"""

from __future__ import annotations

import torch

from raykd.config import ConfigError, RaykdConfig


def _teacher_model(cfg: RaykdConfig, info):
    from raykd.models import build_model

    source = (cfg.teacher.ensemble or [cfg.teacher.checkpoint])[0]
    if source and not source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        from raykd.train.checkpoint import load_model

        try:
            return load_model(source, cfg.teacher, info, field="teacher")
        except (OSError, ValueError, RuntimeError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"teacher.checkpoint: cannot read {source}: {err}; give a "
                              f".safetensors file written by raykd or a .pt state dict") from None
    return build_model(cfg.teacher, info, field="teacher")


def preflight(cfg: RaykdConfig, roles: tuple[str, ...] = ("teacher", "student")) -> None:
    from raykd.data import dataset_info
    from raykd.losses import DistillLoss
    from raykd.models import build_model
    from raykd.models.hooks import probe_shapes

    info = dataset_info(cfg.data)
    x = torch.zeros(2, *info.input_shape)
    teacher = _teacher_model(cfg, info)
    student = build_model(cfg.student, info, field="student")
    if "student" not in roles:
        return
    terms = cfg.distill.terms()
    s_paths = [p for t in terms for p in t.student_layers]
    t_paths = [p for t in terms for p in t.teacher_layers]
    if t_paths and cfg.teacher.mode != "online":
        raise ConfigError(f"teacher.mode: feature losses need teacher features ({t_paths[0]}); "
                          f"set teacher.mode=online")
    for c in [*cfg.distill.exclude_classes, *(cfg.distill.include_classes or [])]:
        if not 0 <= c < info.num_classes:
            raise ConfigError(f"distill.exclude_classes: class {c} is outside "
                              f"0..{info.num_classes - 1}; use class numbers of {info.name}")
    if cfg.teacher.mode == "replay" and not (cfg.train.jitter or cfg.train.flip):
        raise ConfigError("teacher.mode: replay caches augmented views, but train.jitter=0 and "
                          "train.flip=false; set one of them or use teacher.mode=cached")
    s_shapes = probe_shapes(student, s_paths, x, "student") if s_paths else {}
    t_shapes = probe_shapes(teacher, t_paths, x, "teacher") if t_paths else {}
    DistillLoss(cfg.distill, s_shapes, t_shapes)
    if cfg.student.init_from_teacher:
        from raykd.models.init import init_student_from_teacher

        init_student_from_teacher(student, teacher)
