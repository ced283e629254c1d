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


class TrainingError(RuntimeError):
    """A training run failed on the cluster; the message names the run and the cause."""


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


def init_ray(attempts: int = 3, **kwargs) -> None:
    """``ray.init`` that retries a local start whose raylet missed Ray's fixed 30 s start-up
    window (seen on an overloaded 2-core machine); a cluster address is never retried."""
    import time

    import ray

    for attempt in range(attempts):
        try:
            ray.init(**kwargs)
            return
        except Exception as err:
            retry = "timed out during startup" in str(err) or "already occupied" in str(err)
            if not retry or attempt + 1 == attempts or kwargs.get("address"):
                raise
            ray.shutdown()
            if "dashboard_port" in kwargs:  # the failed start's dashboard may still hold it
                kwargs.update(local_ray_options())
            time.sleep(2)


# Train V2's controller polls its workers at this interval (default 2 s), and every
# ``ray.train.report`` waits for a poll: 2.02 s per report measured, 0.11 s at 0.1. Ray Train
# copies the variable from the driver to its controller (ENV_VARS_TO_PROPAGATE). The preemption
# watcher is one more actor process per fit, of no use on a local cluster.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
             "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


RAY_START: dict[str, float] = {}  # how long this process's ray.init took (benchmarks)


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (ray job submit sets it) or start a local one."""
    import ray

    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        # The dashboard hosts the State API: without it Ray Train's PlacementGroupCleaner cannot
        # see its controller, logs "Failed to query Ray Train Controller actor state" every few
        # seconds for the rest of the session and never removes a dead run's placement group.
        # It costs ~2 s of start-up here (7.0-8.2 s against 5.2-6.1 s measured).
        import time

        from raykd import console

        address = os.environ.get("RAY_ADDRESS")
        started = time.perf_counter()
        init_ray(address=address, log_to_driver=True, logging_level=console.ray_logging_level(),
                 configure_logging=True, **({} if address else local_ray_options()))
        RAY_START["seconds"] = round(time.perf_counter() - started, 2)


def local_ray_options() -> dict[str, Any]:
    """``ray.init`` options for a local cluster this process starts: the dashboard on a free
    port, whose address every Ray process inherits (RAY_API_SERVER_ADDRESS, set here before the
    raylet starts). Ray Train's PlacementGroupCleaner finds the State API by that variable;
    without it, it scans the machine for Ray clusters and, when it finds more than one (two jobs
    or test sessions at once), its monitor thread dies with a "Found multiple active Ray
    instances" traceback on the job's console. (Not a job ``runtime_env``: that would make every
    worker process wait for a runtime-env set-up and skip Ray's pre-started workers.)"""
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range (32768+ on Linux) and above Ray's
    worker ports (10002-19999). A port taken with ``bind(0)`` and released is what the kernel
    hands the next ``bind(0)`` — one of Ray's own processes starting just before the dashboard
    — so the dashboard then failed with "already occupied" (2 of 3 test sessions on a busy
    machine)."""
    import random
    import socket

    for port in random.sample(range(20000, 32000), 50):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    from raykd.train.loop import RolePlan

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
