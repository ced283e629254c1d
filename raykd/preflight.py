"""Check everything that can be checked before a cluster or an MLflow run is started.

Config validation catches bad keys and values; this checks that the storage paths can be written
and the tracking server answers, builds the dataset description, both models and the loss terms
on a tiny probe batch, so an unknown model argument, a module path that does not
exist or feature shapes that cannot be matched become one clear line — not a worker traceback.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raykd import tracking
from raykd.config import URI_SCHEMES, ConfigError, RaykdConfig
from raykd.data import dataset_info, prepare_data
from raykd.data.cross_tokens import teacher_info, teacher_tokenizer_file
from raykd.data.labelled import labelled_split
from raykd.losses import DistillLoss
from raykd.losses.registry import check_no_peer_terms
from raykd.models import build_model
from raykd.models.hooks import probe_shapes
from raykd.models.init import init_student_from_teacher
from raykd.models.lm_checks import check_language_models
from raykd.teacher.pool import actor_gpus, check_pool_fits
from raykd.teacher.loading import local_checkpoint
from raykd.tracking import resolve_tracking_uri
from raykd.train.checkpoint import load_model
from raykd.train.storage import check_storage


def _teacher_model(cfg: RaykdConfig, info):
    """The teacher as the job will load it: every given checkpoint read here, once, in the
    driver (MLflow URIs downloaded), so a missing or corrupt one stops the job before any fit."""
    sources = cfg.teacher.ensemble or ([cfg.teacher.checkpoint] if cfg.teacher.checkpoint else [])
    if not sources:
        return build_model(cfg.teacher, info, field="teacher")

    field = "teacher.ensemble" if cfg.teacher.ensemble else "teacher.checkpoint"
    uri = resolve_tracking_uri(cfg.tracking.uri)
    models = []
    for source in sources:
        store = uri.removeprefix("sqlite:///")
        if source.startswith(URI_SCHEMES) and uri.startswith("sqlite:///") \
                and not Path(store).is_file():  # MLflow would create an empty store
            raise ConfigError(f"{field}: {source} names an MLflow run, but the tracking store "
                              f"{store} does not exist; set tracking.uri to the store that "
                              f"holds it")
        try:
            models.append(load_model(local_checkpoint(source, uri), cfg.teacher, info,
                                     field="teacher"))
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - a corrupt file raises many kinds
            first = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
            raise ConfigError(f"{field}: cannot read {source} ({type(err).__name__}: {first}); "
                              f"give a .safetensors file written by raykd, a .pt state dict or "
                              f"an MLflow URI that exists") from None
    return models[0]


def check_destinations(cfg: RaykdConfig) -> None:
    """Where the job writes: its storage folders or URIs and the tracking store (a server must
    answer within seconds) — one line naming the field, before Ray or MLflow starts."""
    check_storage(cfg)
    tracking.check_tracking(tracking.resolve_tracking_uri(cfg.tracking.uri))


def preflight(cfg: RaykdConfig, roles: tuple[str, ...] = ("teacher", "student")) -> None:
    if "student" in roles:  # `raykd online` checks its cohort itself (preflight_online)
        check_no_peer_terms(cfg.distill)
        if cfg.online is not None:  # the loop would build the cohort and train it silently
            raise ConfigError("online: this section configures `raykd online` (members trained "
                              "together); remove it for this verb, or run `raykd online`")
    check_destinations(cfg)

    prepare_data(cfg.data)  # the row store, prepared or verified before any worker starts
    info = dataset_info(cfg.data)
    if cfg.data.labelled is not None:
        _check_labelled(cfg)
    if info.sizes.get("val", 0) == 0 and cfg.train.keep_checkpoint == "best":
        raise ConfigError("train.keep_checkpoint: 'best' chooses the epoch on the validation "
                          "split, which is empty (data.val_fraction=0); set "
                          "train.keep_checkpoint=last")
    text = getattr(info, "vocab_size", None) is not None
    x = torch.zeros(2, *info.input_shape, dtype=torch.long if text else torch.float32)
    own = teacher_tokenizer_file(cfg, info) if text else None  # teacher.tokenizer
    t_info = teacher_info(info, own) if own else None
    teacher = _teacher_model(cfg, t_info or info)
    student = build_model(cfg.student, info, field="student")
    if text:
        check_language_models(cfg, info, teacher, student, roles, t_info)
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
        init_student_from_teacher(student, teacher)


def preflight_cluster(cfg: RaykdConfig, cluster: dict[str, float] | None = None) -> None:
    """GPUs the job asks for and the cluster has not: one line now, instead of a fit waiting
    for resources that never come. (An autoscaling cluster that adds GPU nodes on demand would be
    refused too; such clusters are not supported yet.)"""
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    gpus, t = float(cluster.get("GPU", 0)), cfg.train
    need = t.num_workers * t.gpus_per_worker
    if t.use_gpu and gpus < need:
        raise ConfigError(f"train.use_gpu: {t.num_workers} workers × {t.gpus_per_worker:g} GPU "
                          f"need {need:g} GPUs, the cluster has {gpus:g}; lower "
                          f"train.num_workers or train.gpus_per_worker, or set "
                          f"train.use_gpu=false")
    actor_gpus(cfg, gpus)  # teacher.use_gpu=true without room for it: one line too
    check_pool_fits(cfg, cluster)  # a teacher pool larger than the cluster: one line


def _check_labelled(cfg: RaykdConfig) -> None:
    labelled_split(cfg.data)  # a count larger than the train split: one line
    if cfg.distill.exclude_classes or cfg.distill.include_classes is not None:
        raise ConfigError("distill.exclude_classes: class filters need every label, but "
                          "data.labelled hides the pool's; unset one of them")
    if cfg.teacher.mode != "cached":
        raise ConfigError(f"teacher.mode: data.labelled pseudo-labels the pool from the "
                          f"teacher's cache; set teacher.mode=cached (not {cfg.teacher.mode})")
