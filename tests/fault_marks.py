"""A Ray Train callback that holds a fit at its first checkpoint while a test injects a fault
(kills a worker process, removes a node), and the test side of that handshake.

The callback runs on the Train controller. The workers' next ``ray.train.report`` waits for the
controller, so the fault surely lands mid-fit however fast the epochs are. The callback class is
made inside a function, so cloudpickle ships it by value (the controller cannot import tests/).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def pause_at_first_checkpoint(folder: str | Path, wait_s: float = 120.0):
    from ray.train import UserCallback

    folder = str(folder)

    class PauseAtFirstCheckpoint(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is None or any(p.startswith("ckpt-") for p in os.listdir(folder)):
                return
            open(os.path.join(folder, f"ckpt-{int(metrics[0]['epoch'])}"), "w").close()
            deadline = time.monotonic() + wait_s
            while not os.path.exists(os.path.join(folder, "released")) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)

    return PauseAtFirstCheckpoint()


def wait_for_pause(folder: str | Path, running, timeout_s: float = 600.0) -> list[str]:
    """Wait until the fit stands at its first checkpoint (or ``running()`` turns false); returns
    the marks (["ckpt-EPOCH"]), empty when the fit ended without pausing."""
    deadline = time.monotonic() + timeout_s
    while running() and time.monotonic() < deadline:
        marks = [p.name for p in Path(folder).iterdir() if p.name.startswith("ckpt-")]
        if marks:
            return marks
        time.sleep(0.05)
    return []


def release(folder: str | Path) -> None:
    (Path(folder) / "released").touch()
