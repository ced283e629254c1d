"""Run by tests/test_cluster.py in its own process: a two-node Ray cluster on this machine.

    python tests/two_node_cluster.py WORKDIR TEACHER_CHECKPOINT RESULT_JSON [--set KEY=VALUE ...]

Starts a head node (2 CPUs, the dashboard on a free port) and a second node (1 CPU) with
``ray.cluster_utils.Cluster``, all under a temp dir of its own (RAY_TMPDIR, set by the caller),
so the test session's Ray instance and any other cluster on the machine are never touched. Then:

1. ``raykd distill`` (the CLI's code, in this process) with ``train.placement_strategy=SPREAD``:
   one worker per node, so the worker on the second node reads the teacher's cache, which the
   teacher actor wrote on the head, from the cache files (one machine: the disk is shared, as
   ``teacher.cache_dir`` must be on a real cluster);
2. a baseline fit of the same config that is held at its first checkpoint while the second node
   is removed (``Cluster.remove_node`` kills its raylet and every process on it); Ray Train
   restarts the group on the head, which has room for both workers.

Writes what it saw to RESULT_JSON and shuts down only the nodes it started.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


def teacher_actor_nodes() -> list[str]:
    from ray.util.state import list_actors

    return sorted({a.node_id for a in list_actors(filters=[("class_name", "=", "TeacherActor")],
                                                 limit=100)})


def wait_for_free_cpus(total: float, timeout_s: float = 180.0) -> float:
    """Wait until every CPU of the cluster is free again (the previous fit's placement group is
    removed by Ray Train's cleaner, which lags on a loaded machine); returns the seconds waited.
    Until then SPREAD would place both workers on the head, and removing the other node would
    test nothing."""
    import ray

    started = time.monotonic()
    while ray.available_resources().get("CPU", 0) < total \
            and time.monotonic() - started < timeout_s:
        time.sleep(0.5)
    return round(time.monotonic() - started, 1)


def freeze_train_workers() -> list[int]:
    """SIGSTOP every Ray Train worker process on this machine (both nodes run here) and return
    their PIDs. Train V2's workers do not wait for the controller that the pause holds: left
    running, they finished the fit's last epochs before the node was gone (seen under load), and
    there was no failure left to survive."""
    import signal

    stopped = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGSTOP)
                stopped.append(int(entry.name))
        except (OSError, ProcessLookupError):  # gone meanwhile, or not ours to read
            continue
    return stopped


def thaw(pids: list[int]) -> None:
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:  # the removed node's worker: killed with its node
            pass


def alive_nodes_once_settled(expected: int, timeout_s: float = 90.0) -> int:
    """The cluster's live nodes, once the GCS has caught up with a removal (its health checks
    lag on a loaded machine: a removed node was still listed alive right after the fit)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        if alive <= expected or time.monotonic() > deadline:
            return alive
        time.sleep(1.0)


def train_workers() -> list[tuple[str, int]]:
    """(node id, pid) of every live Ray Train worker, sorted."""
    from ray.util.state import list_actors

    return sorted((a.node_id, a.pid) for a in list_actors(
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], limit=100))


def kill_pids(pids: list[int]) -> None:
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone with its node
            pass


def remove_node_mid_fit(cluster, node, cfg, workdir: Path) -> dict:
    from fault_marks import pause_at_first_checkpoint, release, wait_for_pause

    from raykd.train.fit import fit

    marks = workdir / "marks"
    marks.mkdir()
    box: dict = {}

    def train() -> None:
        try:
            box["result"] = fit(cfg, "baseline", name="node-loss",
                                callbacks=[pause_at_first_checkpoint(marks)])
        except BaseException as err:  # noqa: BLE001 - reported in the JSON
            box["error"] = f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    paused = wait_for_pause(marks, thread.is_alive)
    frozen = freeze_train_workers() if paused else []
    workers = train_workers() if paused else []
    workers_before = [n for n, _ in workers]
    removed_at = time.time()
    if paused:
        cluster.remove_node(node, allow_graceful=False)
        # A lost machine takes its processes with it. Here the removed raylet's worker outlives
        # it until it notices, and, thawed, could still finish the fit (seen in CI: no failure,
        # no recovery), so it is killed, as the machine's loss would.
        kill_pids([pid for n, pid in workers if n == node.node_id])
    thaw(frozen)
    release(marks)
    thread.join(timeout=900)
    if "error" in box or "result" not in box:
        return {"paused": paused, "workers_before": workers_before,
                "error": box.get("error", "the fit did not end")}
    result = box["result"]
    at = result.recoveries[0]["resumed_epoch"] if result.recoveries else 1
    resumed = [h for h in result.history if h["epoch"] == at]
    return {"paused": paused, "workers_before": workers_before, "removed_node": node.node_id,
            "epochs": [h["epoch"] for h in result.history],
            "test_accuracy": result.test_accuracy, "recoveries": result.recoveries,
            "worker_nodes": result.worker_nodes,
            "removed_to_resumed_epoch_end": round(resumed[0]["_ended_at"] - removed_at, 2)
            if resumed else None}


def main() -> int:
    workdir, teacher, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    overrides = sys.argv[4:]
    os.chdir(workdir)
    from raykd.train.fit import free_port

    port = free_port()
    # Ray Train's placement-group cleaner finds the State API by this address (see
    # raykd.train.fit.local_ray_options); it must be set before the nodes start.
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    import ray
    from ray.cluster_utils import Cluster

    from raykd.cli import main as raykd_main
    from raykd.config import load_config

    report: dict = {}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": port})
    try:
        second = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        report["head_node"] = ray.get_runtime_context().get_node_id()
        args = ["--set", f"teacher.checkpoint={teacher}", *overrides,
                "--set", "train.placement_strategy=SPREAD"]
        started = time.perf_counter()
        rc = raykd_main(["distill", *args, "--summary", str(workdir / "summary.json")])
        report["distill_seconds"] = round(time.perf_counter() - started, 1)
        report["distill_rc"] = rc
        if rc == 0:
            report["summary"] = json.loads((workdir / "summary.json").read_text())
            report["teacher_actor_nodes"] = teacher_actor_nodes()
            cfg = load_config(None, [a for a in args if a != "--set"])
            report["waited_for_free_cpus_s"] = wait_for_free_cpus(3)
            report["node_loss"] = remove_node_mid_fit(cluster, second, cfg, workdir)
            report["alive_nodes_after"] = alive_nodes_once_settled(expected=1)
    finally:
        out.write_text(json.dumps(report, default=str))
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
