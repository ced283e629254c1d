"""Driver side of the teacher: start the actor, make sure the cache is fresh, hand out shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raykd.config import RaykdConfig
from raykd.teacher.client import TeacherHandoff


@dataclass
class TeacherService:
    actor: Any
    handoff: TeacherHandoff
    cache: dict[str, Any]  # what ensure_cache reported (status, reason, bytes/sample, ...)


def teacher_feature_paths(cfg: RaykdConfig) -> list[str]:
    paths: list[str] = []
    for term in cfg.distill.terms():
        paths += [p for p in term.teacher_layers if p not in paths]
    return paths


def serve_teacher(cfg: RaykdConfig, sources: list[str], tracking_uri: str) -> TeacherService:
    """Start (or find) the job's teacher actor and build the handoff every worker receives.

    Shard references are created here, by the driver, so the driver owns them: they stay valid
    while the actor restarts."""
    import ray

    from raykd.teacher.actor import start_teacher_actor

    actor = start_teacher_actor(cfg, sources, tracking_uri)
    cache = ray.get(actor.ensure_cache.remote())
    if cfg.teacher.mode == "online":
        paths = teacher_feature_paths(cfg)
        shapes = ray.get(actor.feature_shapes.remote(paths)) if paths else {}
        return TeacherService(actor, TeacherHandoff(mode="online", actor=actor,
                                                    feature_shapes=shapes), cache)
    bounds = ray.get(actor.shard_bounds.remote())
    refs = [actor.shard.remote(i) for i in range(len(bounds))]
    spec = ray.get(actor.cache_spec.remote())
    handoff = TeacherHandoff(mode=cfg.teacher.mode, bounds=bounds, refs=refs, spec=spec,
                             bytes_per_row=int(cache["bytes_per_sample"]) * spec.views)
    return TeacherService(actor, handoff, cache)


def teacher_stats(service: TeacherService) -> dict[str, Any]:
    import ray

    return ray.get(service.actor.stats.remote())
