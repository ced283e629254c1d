"""Run one training role (teacher, student, baseline) on a Ray Train worker group.

``fit()`` runs one phase on a :class:`~raykd.train.group.FitGroup`: the job's shared group when
it runs inside :func:`fit_session`, else a group started for this fit alone. The driver side
draws progress (:mod:`raykd.train.progress`) and logs each epoch to MLflow in batches.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raykd.config import RaykdConfig
# Re-exported: the schemes, tests and benchmarks start Ray and catch failed fits through fit.
from raykd.errors import TrainingError  # noqa: F401
from raykd.train.ray_runtime import (RAY_START, TRAIN_ENV, ensure_ray, free_port,  # noqa: F401
                                     init_ray, local_ray_options)
from raykd.train.step import RolePlan


@dataclass
class FitResult:
    role: str
    checkpoint: Path  # local folder holding model.safetensors
    history: list[dict[str, float]]
    params: int
    run_id: str | None
    transfer_size: int
    init_copied: list[str]
    test_accuracy: float | None = None  # of the selected (best or last) weights
    test_loss: float | None = None  # its mean cross-entropy (language models: nats per token)
    best_epoch: int | None = None
    checkpoints: list[int] = field(default_factory=list)  # epochs checkpointed to Ray Train
    wall_seconds: float = 0.0
    worker_start_seconds: float = 0.0  # submitted → the phase began on the workers
    transfer: dict[str, int] = field(default_factory=dict)  # labelled / pool / pseudo_labelled
    members: dict[str, float] = field(default_factory=dict)  # cohorts: test accuracy per member
    exports: dict[str, Path] = field(default_factory=dict)  # cohorts: member → its checkpoint
    # each restart of the worker group in this fit: resumed_epoch, epochs_lost, recovery_seconds
    recoveries: list[dict[str, float]] = field(default_factory=list)
    worker_nodes: list[str] = field(default_factory=list)  # the node id of each rank
    train_checkpoint: Any = None  # Ray Train's last checkpoint, of a fit with its own trainer

    @property
    def epoch_overhead_seconds(self) -> float | None:
        """Median time between two epochs' ends beyond the epoch's own compute (training and
        validation): reporting, checkpoints, waiting on the controller."""
        import statistics

        h = self.history
        gaps = [h[i]["_ended_at"] - h[i - 1]["_ended_at"] - h[i]["epoch_seconds"]
                - h[i].get("eval_seconds", 0.0) for i in range(1, len(h)) if "_ended_at" in h[i]]
        return statistics.median(gaps) if gaps else None


_SESSION: list = []  # the innermost fit_session's group


@contextmanager
def fit_session(cfg: RaykdConfig, name: str = "job", start: bool = False) -> Iterator:
    """Every ``fit()`` inside shares one worker group, started at the first fit (or at once
    with ``start``) and closed on exit, instead of one group per fit (the per-fit start is most
    of a small job's time). Fits whose scaling (workers, GPUs, CPUs, max_failures) differs get
    their own group."""
    from raykd.train.group import FitGroup, scaling_key

    if _SESSION and _SESSION[-1].key == scaling_key(cfg):  # a scheme inside a scheme
        yield _SESSION[-1]
        return
    group = FitGroup(cfg, name=f"{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    _SESSION.append(group)
    failed = True
    try:
        if start:
            group.start()
        yield group
        failed = False
    finally:
        _SESSION.remove(group)
        # After an error or Ctrl-C do not wait for a running phase: the driver is about to
        # exit, and Ray ends the job's workers with it.
        group.close(timeout_s=5.0 if failed else 120.0)


def fit(cfg: RaykdConfig, role: str, *, tracking_uri: str | None = None,
        run_id: str | None = None, teacher=None, name: str | None = None,
        init_from: str | None = None, callbacks: list | None = None,
        storage_path: str | None = None, resume_from=None,
        extra: dict[str, Any] | None = None) -> FitResult:
    """``callbacks``: Ray Train ``UserCallback``s (Tune trials relay reports through one; such a
    fit reports every epoch to Train); ``storage_path``: where the run keeps its checkpoints
    (default ``train.storage_path``); ``resume_from``: a ``Checkpoint`` to continue from (a
    Tune trial restored or exploited); ``extra``: more keys for the worker loop
    (codistillation's exchange)."""
    import time

    from raykd import tracking
    from raykd.train.checkpoint import write_bytes
    from raykd.train.group import FitGroup, scaling_key
    from raykd.train.progress import FitProgress

    ensure_ray()
    name = name or role
    shared = _SESSION[-1] if _SESSION else None
    own = (shared is None or callbacks or storage_path
           or shared.key != scaling_key(cfg))
    group = (FitGroup(cfg, name=f"{name}-{run_id or os.getpid()}", storage_path=storage_path,
                      callbacks=callbacks, report_every_epoch=bool(callbacks))
             if own else shared)
    loop: dict[str, Any] = {"config": cfg.to_dict(), "role": role, "tracking_uri": tracking_uri,
                            "teacher": teacher, "name": name, "init_from": init_from,
                            "resume_from": resume_from, **(extra or {})}
    progress = FitProgress(name, RolePlan.of(cfg, role).epochs)

    def on_epochs(epochs: list[dict[str, float]]) -> None:
        for m in epochs:
            progress.update(m)
        if tracking_uri and run_id:
            tracking.log_epochs(tracking_uri, run_id, epochs)

    submitted = time.time()
    try:
        if not group.alive:
            group.start()
        ret = group.run(loop, on_epochs)
    finally:
        progress.close()
        if own:
            group.close()
    from raykd.train.storage import weights_dir

    folder = weights_dir(cfg) / f"{name}-{run_id or os.getpid()}"
    weights = write_bytes(ret["weights"], folder)
    exports = {name: write_bytes(data, folder / name)
               for name, data in ret.get("exports", {}).items()}
    return FitResult(role=role, checkpoint=weights.parent, history=ret.get("history", []),
                     params=int(ret.get("params", 0)), run_id=run_id,
                     transfer_size=int(ret.get("transfer_size", 0)),
                     transfer=ret.get("transfer", {}), members=ret.get("members", {}),
                     exports=exports,
                     init_copied=ret.get("init_copied", []),
                     test_accuracy=ret.get("test_accuracy"), test_loss=ret.get("test_loss"),
                     best_epoch=ret.get("best_epoch"),
                     checkpoints=ret.get("checkpoints", []),
                     recoveries=ret.get("recoveries", []),
                     worker_nodes=ret.get("worker_nodes", []),
                     train_checkpoint=group.result.checkpoint if own and group.result else None,
                     wall_seconds=time.time() - submitted,
                     worker_start_seconds=max(0.0, ret.get("started_at", submitted) - submitted))
