"""Driver side of the teacher: start the actor, make sure the cache is fresh, hand the workers
where it is (or the live actor)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from raykd.config import ConfigError, RaykdConfig
from raykd.teacher.client import TeacherHandoff


@dataclass
class TeacherService:
    actor: Any
    handoff: TeacherHandoff
    cache: dict[str, Any]  # what ensure_cache reported (status, reason, bytes/sample, ...)
    name: str | None = None  # the actor's name (namespace ``raykd``)


def ensure_teacher(cfg: RaykdConfig, sources: list[str], tracking_uri: str, attempts: int = 5):
    """The job's actor with its cache ensured. ``get_if_exists`` can hand back an actor that an
    earlier run of this job has just killed (its name is released asynchronously): then wait
    and ask again."""
    import ray

    from raykd.teacher.actor import start_teacher_actor

    for attempt in range(attempts):
        actor = start_teacher_actor(cfg, sources, tracking_uri)
        try:
            return actor, ray.get(actor.ensure_cache.remote())
        except ray.exceptions.RayActorError as err:
            bad_input = _config_error(str(err)) if err.actor_init_failed else None
            if bad_input:  # e.g. the checkpoint is missing on the actor's node: one line
                raise ConfigError(bad_input) from None
            if err.actor_init_failed or attempt + 1 == attempts:  # a bad teacher: say so now
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def generate_with_teacher(cfg: RaykdConfig, sources: list[str], tracking_uri: str
                          ) -> dict[str, Any]:
    """Sequence-level KD: the job's teacher actor generates (or finds) the dataset of
    ``cfg.sequence_kd``; the actor is stopped afterwards (the dataset stays on disk)."""
    import ray

    from raykd.teacher.actor import actor_name, start_teacher_actor

    actor = start_teacher_actor(cfg, sources, tracking_uri)
    try:
        return ray.get(actor.generate_sequences.remote())
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
        bad_input = _config_error(str(err))
        if bad_input:  # e.g. more prompts than train blocks: one line
            raise ConfigError(bad_input) from None
        raise
    finally:  # killed and its name released: the next run's actor starts afresh
        stop_teacher(TeacherService(actor, None, {}, actor_name(cfg, sources)))


def _config_error(text: str) -> str | None:
    """The ConfigError an actor's ``__init__`` raised, from the actor error's text (Ray keeps
    the creation task's error only as text there)."""
    marker = f"{ConfigError.__module__}.{ConfigError.__qualname__}: "  # how Ray prints it
    return next((line.split(marker, 1)[1].strip() for line in text.splitlines()
                 if marker in line), None)


def serve_teacher(cfg: RaykdConfig, sources: list[str], tracking_uri: str) -> TeacherService:
    """Start (or find) the job's teacher actor and build the handoff every worker receives.

    Cached/replay: the cache's table (folder, arrays, shard bounds, per-shard checksums) from
    the actor; the workers read the files themselves, so nothing is put in the object store and
    a restarting actor disturbs no fit. Live: the actor handle."""
    import ray

    from raykd.teacher.actor import actor_name

    actor, cache = ensure_teacher(cfg, sources, tracking_uri)
    name = actor_name(cfg, sources)
    if cfg.teacher.mode == "live":
        paths = cfg.distill.layer_paths("teacher")
        shapes = ray.get(actor.feature_shapes.remote(paths)) if paths else {}
        return TeacherService(actor, TeacherHandoff(mode="live", actor=actor,
                                                  feature_shapes=shapes), cache, name)
    table, spec = ray.get([actor.cache_table.remote(), actor.cache_spec.remote()])
    handoff = TeacherHandoff(mode=cfg.teacher.mode, table=table, spec=spec,
                             bytes_per_row=int(cache["bytes_per_sample"]) * spec.views,
                             per_token=bool(cache.get("per_token")))
    return TeacherService(actor, handoff, cache, name)


def teacher_stats(service: TeacherService) -> dict[str, Any]:
    import ray

    return ray.get(service.actor.stats.remote())


def stop_teacher(target, timeout_s: float = 60.0) -> None:
    """Kill the teacher actor for good (``target``: a :class:`TeacherService` or an actor handle)
    and wait until its name is released, so that the next :func:`serve_teacher` of this job
    starts a fresh actor — which re-checks the cache on disk — instead of reaching the dying one.
    """
    import ray

    from raykd.teacher.actor import ACTOR_NAMESPACE

    actor, name = (target.actor, target.name) if isinstance(target, TeacherService) else (
        target, None)
    ray.kill(actor, no_restart=True)
    if name is None:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=ACTOR_NAMESPACE)
        except ValueError:  # no live actor holds the name any more
            return
        time.sleep(0.05)
