"""A chain of models, each taught by the one before it through the teacher actor.

Born-again networks and Noisy Student are both such chains: member 0 is a teacher (trained now,
or given), member i learns from member i−1's soft labels — a new teacher actor and a new cache
per member, since the cache is fingerprinted by the teacher's weights. These two functions train
one member each, as a child run of the lineage (see :mod:`raykd.schemes.lineage`), out of what
the offline scheme already has: ``train_teacher``, ``serve_teacher``, ``run_student``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from raykd import tracking
from raykd.config import ModelConfig, RaykdConfig
from raykd.schemes.lineage import Lineage, Member, lineage_run, member_tags
from raykd.schemes.offline import (_json_safe, count_checkpoint_params, evaluate_checkpoints,
                                   log_config, run_student, train_teacher)
from raykd.teacher.loading import local_checkpoint
from raykd.teacher.service import serve_teacher, stop_teacher
from raykd.train.checkpoint import read_checkpoint
from raykd.train.fit import RAY_START, ensure_ray, fit_session

# What each member reports beside its accuracy (see offline._fit_part / run_student).
FIT_KEYS = ("val_accuracy", "best_epoch", "epochs", "wall_seconds", "worker_start_seconds",
            "compute_seconds", "epoch_overhead_seconds", "transfer_size", "transfer")


def given_model(cfg: RaykdConfig) -> ModelConfig:
    """The model of a given teacher checkpoint (its file says which; an MLflow URI is fetched
    once), else the teacher section."""
    source = cfg.teacher.checkpoint
    spec = _checkpoint_spec(source, tracking.resolve_tracking_uri(cfg.tracking.uri)) \
        if source else None
    return ModelConfig(**spec) if spec else ModelConfig(name=cfg.teacher.name,
                                                        args=cfg.teacher.args)


@functools.lru_cache(maxsize=16)
def _checkpoint_spec(source: str, uri: str) -> dict | None:
    try:
        _, spec, _ = read_checkpoint(local_checkpoint(source, uri))
    except Exception:  # noqa: BLE001 - unreadable: preflight / the actor say why, in one line
        return None
    return spec


def taught_config(cfg: RaykdConfig, teacher: ModelConfig, student: ModelConfig,
                  extra: dict[str, Any] | None = None) -> RaykdConfig:
    """``cfg`` for a member: ``student`` learns from a ``teacher`` whose weights the scheme hands
    to the actor (so ``teacher.checkpoint`` / ``ensemble`` are cleared here)."""
    return cfg.with_overrides({"teacher.name": teacher.name, "teacher.args": teacher.args,
                               "teacher.checkpoint": None, "teacher.ensemble": [],
                               "student.name": student.name, "student.args": student.args,
                               **(extra or {})})


def first_member(cfg: RaykdConfig, uri: str, lineage: Lineage) -> Member:
    """Member 0: the given ``teacher.checkpoint`` (evaluated, logged as a child run) or a
    teacher trained now with Ray Train (on the labelled part only, with ``data.labelled``)."""
    name = f"{lineage.word}-0"
    tags = member_tags(lineage.scheme, 0, None, None)
    source = cfg.teacher.checkpoint
    if source:
        with tracking.tracked_run(uri, cfg.tracking.experiment, name, lineage.parent,
                                  {"raykd.role": "teacher", "raykd.source": source, **tags}
                                  ) as run_id:
            acc = evaluate_checkpoints([source], cfg, uri)
            params = count_checkpoint_params(source, uri)
            tracking.log_metrics(uri, run_id, {"test_accuracy": acc, "params": params})
        member = Member(0, run_id, None, source, acc, params)
    else:
        part = train_teacher(cfg, uri, lineage.parent, name=name, tags=tags)
        member = Member(0, part["run_id"], None,
                        f"runs:/{part['run_id']}/teacher/model.safetensors", part["accuracy"],
                        part["params"], fit={k: part[k] for k in FIT_KEYS if k in part})
    lineage.record(member)
    return member


def taught_member(cfg: RaykdConfig, index: int, teacher: Member, uri: str, lineage: Lineage
                  ) -> Member:
    """Member ``index``: ``cfg.student`` trained by ``teacher`` (the previous member) through a
    fresh teacher actor, whose cache is keyed by that teacher's weights."""
    service = serve_teacher(cfg, [teacher.source], uri)
    try:
        key = service.cache.get("key")
        part = run_student(cfg, "student", uri, lineage.parent, service.handoff,
                           name=f"{lineage.word}-{index}",
                           tags=member_tags(lineage.scheme, index, teacher.run_id, key))
    finally:  # the cache on disk outlives the actor; the next member gets its own
        stop_teacher(service)
    fit = {k: part[k] for k in FIT_KEYS if k in part}
    fit["cache"] = {k: service.cache.get(k) for k in ("status", "key", "fingerprint")}
    member = Member(index, part["run_id"], teacher.run_id,
                    f"runs:/{part['run_id']}/checkpoint/model.safetensors", part["accuracy"],
                    part["params"], key, fit=fit)
    lineage.record(member)
    return member


def train_chain(cfg: RaykdConfig, length: int, member_config, uri: str, lineage: Lineage
                ) -> list[Member]:
    """Members 0…``length``: the finished ones of a resumed lineage as they are, member 0 by
    :func:`first_member`, member i with ``member_config(i)`` taught by member i−1."""
    members: list[Member] = []
    for i in range(length + 1):
        if i in lineage.finished:
            members.append(lineage.finished[i])
        elif i == 0:
            members.append(first_member(cfg, uri, lineage))
        else:
            members.append(taught_member(member_config(i), i, members[-1], uri, lineage))
    return members


@contextmanager
def chain_run(cfg: RaykdConfig, scheme: str, resume: bool, config_path: str | None
              ) -> Iterator[tuple[str, Lineage, Callable[[dict[str, Any]], dict[str, Any]]]]:
    """A chain scheme's run (born-again, Noisy Student): Ray up, one worker group for every member
    (they share the scaling: one start, not one per member) and the lineage's parent run, its
    config logged once. Yields (tracking URI, lineage, ``finish``): ``finish(summary)`` adds
    what every chain's summary holds (MLflow run, resumed members, seconds) and logs it."""
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    ensure_ray()
    started = time.perf_counter()
    with fit_session(cfg, scheme, start=True), lineage_run(
            uri, cfg, scheme, resume, scheme) as lineage:
        if not lineage.finished:  # a resumed parent has its config already
            log_config(uri, lineage.parent, cfg, config_path)

        def finish(summary: dict[str, Any]) -> dict[str, Any]:
            summary.update({
                "mlflow": {"tracking_uri": uri, "run_id": lineage.parent,
                           "experiment": cfg.tracking.experiment},
                "resumed": sorted(lineage.finished),
                "seconds": round(time.perf_counter() - started, 1),
                "ray_start_seconds": RAY_START.get("seconds")})
            tracking.log_dict(uri, lineage.parent, _json_safe(summary), "summary.json")
            return summary

        yield uri, lineage, finish
