"""Be Your Own Teacher (Zhang et al. 2019, arXiv 1905.08094): exits hooked at
``online.exits`` learn from the labels, the deepest exit's soft output and the deepest
features; the deployable model is the backbone without its exits."""

from __future__ import annotations

from raykd.config import ModelConfig, RaykdConfig
from raykd.data import dataset_info
from raykd.models.cohort import build_cohort


def loss_terms(cfg: RaykdConfig) -> list[dict]:
    paths = build_cohort(cfg, dataset_info(cfg.data)).feature_paths()
    o = cfg.online
    return [{"name": "byot", "student_layers": paths,
             "params": {"alpha": o.alpha, "hint_weight": o.hint_weight,
                        "temperature": cfg.online.temperature}}]


def alone(cfg: RaykdConfig) -> list[tuple[str, ModelConfig, int]]:
    """The plain network, without exits."""
    return [("student", ModelConfig(name=cfg.student.name, args=cfg.student.args),
             cfg.train.seed)]
