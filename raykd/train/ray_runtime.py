"""Starting or joining Ray for a job: the local cluster's options, the Train V2 settings raykd
relies on, and the retries a busy 2-core machine needs. A leaf of raykd.train: the fit and its
worker group both use it, and it imports neither."""

from __future__ import annotations

import os
from typing import Any


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
