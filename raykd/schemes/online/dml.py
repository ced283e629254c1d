"""Deep Mutual Learning (Zhang et al. 2018, arXiv 1706.00384): K peers in one data-parallel
fit, each learning the labels and the other peers' (detached) predictions at temperature T."""

from __future__ import annotations

from raykd.config import ModelConfig, RaykdConfig


def loss_terms(cfg: RaykdConfig) -> list[dict]:
    return [{"name": "dml", "params": {"temperature": cfg.online.temperature}}]


def alone(cfg: RaykdConfig) -> list[tuple[str, ModelConfig, int]]:
    """Each peer trained by itself: its model, from the same initial weights (seed + i)."""
    o = cfg.online
    specs = [o.models[min(i, len(o.models) - 1)] if o.models else
             ModelConfig(name=cfg.student.name, args=cfg.student.args) for i in range(o.peers)]
    return [(f"peer{i}", spec, cfg.train.seed + i) for i, spec in enumerate(specs)]
