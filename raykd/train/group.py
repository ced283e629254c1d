"""One Ray Train worker group that runs a job's fits one after another, as phases.

Why: starting a ``TorchTrainer`` costs far more than a small fit computes. Each start brings up
a controller and its helper actors and two worker processes that each import torch and Ray
Train (about 12 CPU-seconds of imports per worker; measured ~40 s wall on 2 cores before the
first epoch). The offline job runs three fits (teacher, student, baseline); a born-again chain
or Noisy Student runs more. A :class:`FitGroup` starts the trainer once, in a driver thread,
and its workers run ``group_loop_per_worker``: ask the :class:`FitCoordinator` actor for the
next phase, run it (``raykd.train.loop.run_phase``), hand the result back, ask again.

What stays Ray Train's: the worker group, DDP, checkpoints and restarts. A failed worker (or a
lost node) makes Train restart the group (``train.max_failures``); the restarted loop asks for
the lowest unfinished phase and resumes it from its last checkpoint (checkpoints name their
phase and hold the whole training state, raykd.train.state). The coordinator, which outlives
the worker group, records each such recovery: the epochs that had to be run again and the time
from the last finished epoch to training again.

What the coordinator carries: phases in, per-epoch metrics, the node of every rank, recoveries
and each phase's result (its selected weights as safetensors bytes) out. The driver polls it to
draw progress and to log metrics to MLflow in batches, so workers never import MLflow and never
wait on it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from raykd.errors import TrainingError
from raykd.train.ray_runtime import ensure_ray


class FitCoordinator:
    """Ray actor (threaded): the queue of phases and what comes back from them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._phases: dict[int, dict[str, Any]] = {}
        self._results: dict[int, dict[str, Any]] = {}  # until the driver takes them
        # Finished or failed phases, for good: a restarted group must not run them again after
        # the driver has taken their results.
        self._done: set[int] = set()
        self._epochs: dict[int, list[dict[str, float]]] = {}  # every report, re-runs too
        self._recoveries: dict[int, list[dict[str, float]]] = {}
        self._nodes: dict[int, dict[int, str]] = {}  # phase → rank → node id (latest start)
        self._closed = False

    def submit(self, phase_id: int, loop: list) -> None:  # [ObjectRef of the phase's loop]
        with self._cond:
            self._phases[phase_id] = loop
            self._epochs[phase_id] = []
            self._cond.notify_all()

    def next_phase(self, after: int, wait_s: float = 2.0) -> dict[str, Any] | str | None:
        """The lowest unfinished phase after ``after`` (a restarted worker passes -1 and so
        resumes the phase that was running); "wait" when none is queued yet; None once closed.
        """
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                todo = sorted(i for i in self._phases if i > after and i not in self._done)
                if todo:
                    return {"id": todo[0], "loop": self._phases[todo[0]]}
                if self._closed:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return "wait"
                self._cond.wait(left)

    def epoch(self, phase_id: int, metrics: dict[str, float]) -> None:
        with self._cond:  # a resumed phase reports the epochs after its checkpoint again
            self._epochs.setdefault(phase_id, []).append(metrics)

    def joined(self, phase_id: int, rank: int, node_id: str) -> None:
        with self._cond:
            self._nodes.setdefault(phase_id, {})[rank] = node_id

    def resumed(self, phase_id: int, epoch: int, at: float, checkpoint_ended_at: float | None
                ) -> None:
        """Rank 0 of a restarted group resumed ``phase_id`` at ``epoch`` (at time ``at``)."""
        with self._cond:
            seen = self._epochs.get(phase_id, [])
            reached = max((int(m["epoch"]) for m in seen), default=epoch - 1)
            last = max((m["_ended_at"] for m in seen if "_ended_at" in m),
                       default=checkpoint_ended_at)
            self._recoveries.setdefault(phase_id, []).append({
                "resumed_epoch": epoch,
                # finished epochs after the checkpoint, run again (the unfinished one aside)
                "epochs_lost": max(0, reached + 1 - epoch),
                # the last epoch finished before the failure → training again: detecting the
                # failure, a new worker group, restoring the state, and the unfinished epoch
                "recovery_seconds": round(at - last, 2) if last is not None else None})

    def fail(self, phase_id: int, message: str) -> None:
        """A worker's bad input (e.g. a file missing on its node): the driver raises it."""
        with self._cond:
            if phase_id not in self._done:
                self._done.add(phase_id)
                self._results[phase_id] = {"error": message}
            self._cond.notify_all()

    def finish(self, phase_id: int, result: dict[str, Any]) -> None:
        with self._cond:
            nodes = self._nodes.get(phase_id, {})
            self._done.add(phase_id)
            self._results[phase_id] = {**result,
                                       "recoveries": self._recoveries.get(phase_id, []),
                                       "worker_nodes": [nodes[r] for r in sorted(nodes)]}
            self._cond.notify_all()

    def poll(self, phase_id: int, since: int
             ) -> tuple[list[dict[str, float]], Any, list[dict[str, float]]]:
        """Epoch metrics from index ``since`` on, the phase's result once it has one, and its
        recoveries so far."""
        with self._cond:
            return (list(self._epochs.get(phase_id, [])[since:]),
                    self._results.pop(phase_id, None),
                    list(self._recoveries.get(phase_id, [])))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def group_loop_per_worker(loop: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train loop of a :class:`FitGroup`: run phases until the coordinator closes."""
    import ray
    import ray.train

    from raykd import console
    from raykd.config import ConfigError
    from raykd.train.loop import run_phase

    console.quiet_train_worker(loop.get("verbose", False))
    coordinator = loop["coordinator"]
    rank = ray.train.get_context().get_world_rank()
    node_id = ray.get_runtime_context().get_node_id()
    done, phases = -1, 0
    while True:
        phase = ray.get(coordinator.next_phase.remote(done))
        if phase == "wait":
            continue
        if phase is None:
            return {"phases": phases}
        phase_loop = ray.get(phase["loop"][0])
        ray.get(coordinator.joined.remote(phase["id"], rank, node_id))  # before finish(): threaded
        try:
            result = run_phase(phase_loop, phase["id"], coordinator, loop["report_every_epoch"])
        except ConfigError as err:  # bad input fails every restart alike: tell the driver now
            ray.get(coordinator.fail.remote(phase["id"], str(err)))
            raise
        if rank == 0:  # before the next ask: a restart must not re-run a finished phase
            ray.get(coordinator.finish.remote(phase["id"], result))
        done, phases = phase["id"], phases + 1


def scaling_key(cfg) -> tuple:
    t = cfg.train
    return (t.num_workers, t.use_gpu, t.cpus_per_worker, t.max_failures, t.placement_strategy,
            t.gpus_per_worker)


def check_cluster_fits(train) -> None:
    """Raise a one-line ConfigError when the cluster's live nodes cannot hold the worker group
    (``train``: the config's train section); Ray Train would otherwise wait for resources
    forever. Counts whole workers per node, as a placement group places them."""
    import math

    import ray

    from raykd.config import ConfigError

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpus = sum(n.get("GPU", 0) for n in nodes)  # none at all: raykd.preflight says so first

    def per_node(res: dict[str, float]) -> int:
        fit = math.floor(res.get("CPU", 0) / train.cpus_per_worker + 1e-9)
        gpu_fit = math.floor(res.get("GPU", 0) / train.gpus_per_worker + 1e-9)
        return min(fit, gpu_fit) if train.use_gpu else fit

    slots = [per_node(n) for n in nodes]
    strategy = train.placement_strategy
    fits = {"STRICT_SPREAD": sum(s > 0 for s in slots),
            "STRICT_PACK": max(slots, default=0)}.get(strategy, sum(slots))
    if fits >= train.num_workers:
        return
    cpus = sum(n.get("CPU", 0) for n in nodes)
    each = f"{train.cpus_per_worker:g} CPU" + (f" + {train.gpus_per_worker:g} GPU"
                                                if train.use_gpu else "")
    where = {"STRICT_SPREAD": " on distinct nodes", "STRICT_PACK": " on one node"}.get(strategy,
                                                                                      "")
    raise ConfigError(
        f"train.num_workers: {train.num_workers} workers of {each} each{where} do not fit the Ray "
        f"cluster ({len(nodes)} node(s), {cpus:g} CPU, {gpus:g} GPU: room for {fits}); lower "
        f"train.num_workers or train.cpus_per_worker, or add nodes")


class FitGroup:
    """A started ``TorchTrainer`` whose workers run phases; see the module docstring.

    ``fit()`` (raykd.train.fit) submits a phase and waits for it, drawing progress and logging
    each epoch to MLflow from this process. Use as a context manager, or through
    :func:`raykd.train.fit.fit_session`, which every fit of a job then shares."""

    def __init__(self, cfg, *, name: str = "raykd", storage_path: str | None = None,
                 callbacks: list | None = None, report_every_epoch: bool = False):
        self.cfg, self.name, self.storage_path = cfg, name, storage_path
        self.callbacks, self.report_every_epoch = callbacks, report_every_epoch
        self.key = scaling_key(cfg)
        self.coordinator: Any = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.result: Any = None  # the trainer's ray.train.Result, once it has ended
        self._next_id = 0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> FitGroup:
        import ray
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        from raykd import console
        from raykd.train.collective import process_group_backend, worker_resources
        from raykd.train.storage import train_storage

        ensure_ray()
        from raykd.preflight import preflight_cluster

        preflight_cluster(self.cfg)  # GPUs the cluster does not have: one line, not a hang
        t = self.cfg.train
        check_cluster_fits(t)
        if self.coordinator is not None:  # restarted after a failed trainer: a fresh queue
            ray.kill(self.coordinator)
        self.error = None
        # On the driver's node, like Ray Train's controller: the coordinator must outlive the
        # loss of any other node.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.coordinator = ray.remote(num_cpus=0, max_concurrency=64)(FitCoordinator).options(
            scheduling_strategy=here).remote()
        trainer = TorchTrainer(
            group_loop_per_worker,
            train_loop_config={"coordinator": self.coordinator,
                               "report_every_epoch": self.report_every_epoch,
                               "verbose": console.verbose()},
            scaling_config=ray.train.ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.use_gpu,
                placement_strategy=t.placement_strategy,
                resources_per_worker=worker_resources(t)),
            torch_config=TorchConfig(backend=process_group_backend(t)),
            run_config=ray.train.RunConfig(
                name=self.name, storage_path=self.storage_path or train_storage(self.cfg),
                callbacks=self.callbacks,
                failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
                logging_config=ray.train.LoggingConfig(log_level=console.train_log_level())))

        def run() -> None:
            try:
                self.result = trainer.fit()
            except BaseException as err:  # noqa: BLE001 - surfaced by the phase waiting on it
                self.error = err

        self.thread = threading.Thread(target=run, name=f"raykd-group-{self.name}", daemon=True)
        self.thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def close(self, timeout_s: float = 120.0) -> None:
        import ray

        if self.coordinator is None:
            return
        try:
            ray.get(self.coordinator.close.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the actor died with the group; nothing to close
            pass
        if self.thread is not None:
            self.thread.join(timeout_s)
        ray.kill(self.coordinator)
        self.coordinator = None

    def __enter__(self) -> FitGroup:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- phases ---------------------------------------------------------------------------
    def run(self, loop: dict[str, Any], on_epochs) -> dict[str, Any]:
        """Submit one phase and wait for its result; ``on_epochs(list_of_metrics)`` is called
        with each batch of newly finished epochs (progress, MLflow)."""
        import ray

        from raykd.config import ConfigError
        phase_id, self._next_id = self._next_id, self._next_id + 1
        # The loop goes by reference, in a list so Ray does not resolve it for the actor: the
        # coordinator never unpickles it (a teacher handoff would import torch there, ~4 s).
        loop_ref = ray.put(loop)
        ray.get(self.coordinator.submit.remote(phase_id, [loop_ref]))
        seen = told = 0
        while True:
            alive = self.alive  # read before the poll: a result may land in between
            epochs, result, recoveries = ray.get(self.coordinator.poll.remote(phase_id, seen))
            for r in recoveries[told:]:
                print(f"[{loop.get('name', 'fit')}] the worker group failed and restarted: "
                      f"resumed at epoch {r['resumed_epoch'] + 1}, {r['epochs_lost']} "
                      f"finished epoch(s) lost, {r['recovery_seconds']} s to recover",
                      flush=True)
            told = len(recoveries)
            if epochs:
                seen += len(epochs)
                on_epochs(epochs)
            if result is not None and "error" in result:
                raise ConfigError(result["error"])
            if result is not None:
                return result
            if not alive:
                # The trainer ended before this phase finished: a worker error beyond
                # train.max_failures. Say why.
                cause = self.error or "the worker group stopped before the fit finished"
                raise TrainingError(f"{loop.get('name', 'fit')}: training failed: {cause}")
            time.sleep(0.05)
