"""The cache build as batch inference on a pool of teacher replicas (Ray Data).

``map_batches`` with a callable class runs :class:`TeacherReplica` on a fixed pool of
``teacher.replicas`` actors, each holding the teacher once (loaded by the same code as the
teacher actor, ``loading.py``) with ``teacher.replica_cpus`` CPUs and ``teacher.replica_gpus``
GPUs. Its input is the (index, input) rows of the train split's shards that are still missing,
one block per ``teacher.batch_size`` rows and one block per batch (``batch_size=None``), so a
batch holds the same rows whatever the number of replicas or the order they finish in: a cache
built by 2 replicas is bit for bit the one built by 1. Each replica returns (index, encoded rows
of every view); the actor's writer places them by index (``shards.py``) as they stream back.
A language model's per-token top-k cache goes the same way: its spec (``token_cache.py``)
encodes a batch's [B, L, V] logits into top-k rows and caps a batch's rows
(``spec.teacher_batch``) exactly as the actor does, so 2 replicas build the 1-replica cache.

Placement: a pool larger than the cluster would wait for resources forever, so
:func:`check_pool_fits` refuses it before anything runs, in one line naming ``teacher.replicas``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from raykd.config import ConfigError, RaykdConfig, validate
from raykd.teacher.cache import BuildResult, CacheError, fill_cache
from raykd.teacher.shards import batch_ranges

GPU_FRACTION = 0.25


def teacher_device() -> torch.device:
    """Inside a Ray actor: the GPU Ray assigned to it, else the CPU. Ray leaves every GPU of the
    node visible to an actor that asked for none, so ``torch.cuda.is_available()`` alone would
    put the teacher on a GPU the training workers hold. In-process (benchmarks, tests): CUDA
    when there is one."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def actor_gpus(cfg: RaykdConfig, cluster_gpus: float) -> float:
    """The teacher actor's GPU share (``teacher.use_gpu``). Unset (auto): a fraction when the
    cluster has GPUs to spare beside the training workers (each takes a whole GPU), otherwise
    0 — taking a slice the workers need would leave the fit waiting for resources forever.
    true: the same fraction, or a ConfigError when it does not fit beside the workers.
    false: none."""
    t = cfg.train
    workers = t.num_workers * t.gpus_per_worker if t.use_gpu else 0
    fits = cluster_gpus - workers >= GPU_FRACTION
    if cfg.teacher.use_gpu is None:
        return GPU_FRACTION if fits else 0.0
    if not cfg.teacher.use_gpu:
        return 0.0
    if not fits:
        raise ConfigError(
            f"teacher.use_gpu: the teacher actor needs {GPU_FRACTION:g} GPU beside the "
            f"training workers' {workers:g}, and the cluster has {cluster_gpus:g} GPUs; add a "
            f"GPU, lower train.num_workers or train.gpus_per_worker, or set "
            f"teacher.use_gpu=false (teacher on CPU)")
    return GPU_FRACTION


def replica_resources(cfg: RaykdConfig, cluster_gpus: float) -> tuple[float, float]:
    """(CPUs, GPUs) of one replica: ``teacher.replica_gpus`` null follows ``teacher.use_gpu``."""
    t = cfg.teacher
    gpus = actor_gpus(cfg, cluster_gpus) if t.replica_gpus is None else float(t.replica_gpus)
    return float(t.replica_cpus), gpus


def check_pool_fits(cfg: RaykdConfig, cluster: dict[str, float]) -> None:
    """One line naming ``teacher.replicas`` when the pool asks for more than the cluster has."""
    if cfg.teacher.mode == "live":
        return
    n = cfg.teacher.replicas
    cpus, gpus = replica_resources(cfg, float(cluster.get("GPU", 0)))
    for kind, each, have in (("CPU", cpus, float(cluster.get("CPU", 0))),
                             ("GPU", gpus, float(cluster.get("GPU", 0)))):
        if each and n * each > have:
            raise ConfigError(
                f"teacher.replicas: {n} teacher replicas × {each:g} {kind} need {n * each:g} "
                f"{kind}s, the cluster has {have:g}; lower teacher.replicas (or "
                f"teacher.replica_{kind.lower()}s), or add nodes")


class TeacherReplica:
    """One replica of the pool: loads the teacher once, then labels batches of (index, x) rows
    with every view's raw logits, encoded as the cache stores them (``spec.encode``: class
    logits per view, or a language model's per-token top-k)."""

    def __init__(self, config: dict[str, Any], sources: list[str], tracking_uri: str, info,
                 spec):
        from raykd.teacher.cache import teacher_fingerprint
        from raykd.teacher.loading import load_teacher_models

        self.cfg = validate(config)
        self.spec = spec
        self.device = teacher_device()
        self.models = [m.to(self.device).eval() for m in
                       load_teacher_models(sources, self.cfg, info, tracking_uri)]
        got = teacher_fingerprint([m.state_dict() for m in self.models])
        if got != spec.teacher_fingerprint:  # e.g. the checkpoint was overwritten meanwhile
            raise CacheError(f"the teacher loaded by a replica ({got[:12]}) is not the one the "
                             f"cache is built for ({spec.teacher_fingerprint[:12]})")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raykd.teacher.client import cache_view
        from raykd.teacher.loading import ensemble_logits

        idx = torch.tensor(batch["index"], dtype=torch.int64)
        x = batch["x"]  # Ray Data hands read-only arrays; torch wants to own writable memory
        x = torch.from_numpy(x if x.flags.writeable and x.flags.c_contiguous else x.copy())
        per_view = [ensemble_logits(self.models, cache_view(x, idx, view, self.spec,
                                                            self.cfg.train).to(self.device))
                    for view in range(self.spec.views)]
        start = int(idx[0])
        return {"index": batch["index"], **self.spec.encode(per_view, start, start + len(idx))}


def input_rows(dataset, todo: list[tuple[int, int]], batch_size: int):
    """A Ray Dataset of the (index, x) rows of the row ranges ``todo``: one block per batch.
    Each block is put in the object store as it is made and the dataset built from the refs
    (``from_arrow`` took 2-5× longer for the same blocks: 0.4-1.0 s against 0.2 s at 54,000
    MNIST rows, measured; all of it before the replicas start)."""
    import pyarrow as pa
    import ray
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    refs = []
    for start, end in batch_ranges(todo, batch_size):
        idx, x, _ = dataset.get_batch(torch.arange(start, end))
        refs.append(ray.put(pa.table({"index": pa.array(idx.numpy()),
                                      "x": ArrowTensorArray.from_numpy(x.numpy())})))
    return ray.data.from_arrow_refs(refs)


def build_with_pool(cfg: RaykdConfig, sources: list[str], tracking_uri: str, dataset, spec,
                    root: Path, progress: bool = True) -> BuildResult:
    """Build (or finish) the cache for ``spec`` on a pool of ``teacher.replicas`` replicas."""
    import ray

    cpus, gpus = replica_resources(cfg, ray.cluster_resources().get("GPU", 0))
    data_context = ray.data.DataContext.get_current()
    # The writer has its own progress line (one every 10 s in an actor); Ray Data's bars and
    # start-of-execution banner would repeat it in every run's output.
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False

    def compute(todo: list[tuple[int, int]]):
        batch = spec.teacher_batch(cfg.teacher.batch_size)  # the actor's batches, exactly
        labelled = input_rows(dataset, todo, batch).map_batches(
            TeacherReplica, batch_size=None, batch_format="numpy",
            fn_constructor_args=(cfg.to_dict(), list(sources), tracking_uri, dataset.info, spec),
            concurrency=cfg.teacher.replicas, num_cpus=cpus, num_gpus=gpus or None)
        for batch in labelled.iter_batches(batch_size=None, batch_format="numpy"):
            yield batch.pop("index"), batch

    return fill_cache(root, spec, cfg.teacher.shard_size, compute, progress)
