"""Run one training role (teacher, student, baseline) as a Ray Train TorchTrainer fit."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


def runs_dir() -> Path:
    return (Path.cwd() / ".raykd" / "runs").resolve()


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
            if "timed out during startup" not in str(err) or attempt + 1 == attempts \
                    or kwargs.get("address"):
                raise
            ray.shutdown()
            time.sleep(2)


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (ray job submit sets it) or start a local one."""
    import ray

    if not ray.is_initialized():
        # The dashboard hosts the State API: without it Ray Train's PlacementGroupCleaner cannot
        # see its controller, logs "Failed to query Ray Train Controller actor state" every few
        # seconds for the rest of the session and never removes a dead run's placement group.
        # It costs ~2 s of start-up here (7.0-8.2 s against 5.2-6.1 s measured).
        init_ray(address=os.environ.get("RAY_ADDRESS"), include_dashboard=True,
                 log_to_driver=True, logging_level="WARNING", configure_logging=True)


def fit(cfg: RaykdConfig, role: str, *, tracking_uri: str | None = None,
        run_id: str | None = None, teacher=None, name: str | None = None,
        init_from: str | None = None, callbacks: list | None = None,
        storage_path: str | None = None, resume_from=None) -> FitResult:
    """``callbacks``: Ray Train ``UserCallback``s (Tune trials relay reports through one);
    ``storage_path``: where the run keeps its checkpoints (default ``runs_dir()``);
    ``resume_from``: a ``Checkpoint`` to continue from (a Tune trial restored or exploited)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raykd.train.loop import train_loop_per_worker

    ensure_ray()
    name = name or role
    loop: dict[str, Any] = {"config": cfg.to_dict(), "role": role, "tracking_uri": tracking_uri,
                            "run_id": run_id, "teacher": teacher, "name": name,
                            "init_from": init_from, "resume_from": resume_from}
    t = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=f"{name}-{run_id or os.getpid()}", storage_path=storage_path or str(runs_dir()),
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # TrainingFailedError wraps the worker's exception
        raise TrainingError(f"{name}: training failed: {err}") from err
    if result.error is not None or result.checkpoint is None:
        cause = result.error or "no checkpoint was reported"
        raise TrainingError(f"{name}: training failed: {cause}")
    ret = result.return_value or {}
    return FitResult(role=role, checkpoint=Path(result.checkpoint.path), history=ret.get(
        "history", []), params=int(ret.get("params", 0)), run_id=run_id,
        transfer_size=int(ret.get("transfer_size", 0)), init_copied=ret.get("init_copied", []))
