"""ONE (Lan et al. 2018, arXiv 1806.04606): one student with a shared trunk up to
``online.split_at``, K branch copies of the rest and a gate; the gated ensemble teaches every
branch. Each branch, exported with the trunk, is an ordinary model of the student's
architecture."""

from __future__ import annotations

from raykd.config import ModelConfig, RaykdConfig


def loss_terms(cfg: RaykdConfig) -> list[dict]:
    return [{"name": "one", "params": {"temperature": cfg.online.temperature}}]


def alone(cfg: RaykdConfig) -> list[tuple[str, ModelConfig, int]]:
    """The student's architecture trained by itself (the backbone without branches)."""
    return [("student", ModelConfig(name=cfg.student.name, args=cfg.student.args),
             cfg.train.seed)]
