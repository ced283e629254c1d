"""Check everything that can be checked before a cluster or an MLflow run is started.

Config validation catches bad keys and values; this checks that the storage paths can be written
and the tracking server answers, builds the dataset description, both models and the loss terms
on a tiny probe batch, so an unknown model argument, a module path that does not
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


def check_destinations(cfg: RaykdConfig) -> None:
    """Where the job writes: its storage folders or URIs and the tracking store (a server must
    answer within seconds) — one line naming the field, before Ray or MLflow starts."""
    from raykd import tracking
    from raykd.train.storage import check_storage

    check_storage(cfg)
    tracking.check_tracking(tracking.resolve_tracking_uri(cfg.tracking.uri))


def preflight(cfg: RaykdConfig, roles: tuple[str, ...] = ("teacher", "student")) -> None:
    from raykd.data import dataset_info

    check_destinations(cfg)
    from raykd.losses import DistillLoss
    from raykd.models import build_model
    from raykd.models.hooks import probe_shapes

    info = dataset_info(cfg.data)
    if cfg.data.labelled is not None:
        _check_labelled(cfg)
    if info.sizes.get("val", 0) == 0 and cfg.train.keep_checkpoint == "best":
        raise ConfigError("train.keep_checkpoint: 'best' chooses the epoch on the validation "
                          "split, which is empty (data.val_fraction=0); set "
                          "train.keep_checkpoint=last")
    x = torch.zeros(2, *info.input_shape)
    teacher = _teacher_model(cfg, info)
    student = build_model(cfg.student, info, field="student")
    if "student" not in roles:
        return
    terms = cfg.distill.terms()
    s_paths = [p for t in terms for p in t.student_layers]
    t_paths = [p for t in terms for p in t.teacher_layers]
    if t_paths and cfg.teacher.mode != "live":
        raise ConfigError(f"teacher.mode: feature losses need teacher features ({t_paths[0]}); "
                          f"set teacher.mode=live")
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


def _check_labelled(cfg: RaykdConfig) -> None:
    from raykd.data.labelled import labelled_split

    labelled_split(cfg.data)  # a count larger than the train split: one line
    if cfg.distill.exclude_classes or cfg.distill.include_classes is not None:
        raise ConfigError("distill.exclude_classes: class filters need every label, but "
                          "data.labelled hides the pool's; unset one of them")
    if cfg.teacher.mode != "cached":
        raise ConfigError(f"teacher.mode: data.labelled pseudo-labels the pool from the "
                          f"teacher's cache; set teacher.mode=cached (not {cfg.teacher.mode})")
