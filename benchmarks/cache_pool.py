"""The teacher cache built by a pool of teacher replicas (Ray Data ``map_batches``): build
samples/s with 2 replicas ÷ 1 (one CPU each), and the 1-replica build ÷ raw batched teacher
inference in one process (one torch thread, as a 1-CPU replica gets), on the shared MNIST copy.

    flock /tmp/raykd-heavy.lock .venv/bin/python benchmarks/cache_pool.py \\
        --json benchmarks/results/cache_pool.json

A benchmark, not a test. The teacher is a random MLP wide enough that inference dominates (its
labels are not the point; the cost of producing them is). Each round times, interleaved: the raw
loop (``get_batch`` → forward, the same batches), ``TeacherActor.ensure_cache()`` with 1 replica
and with 2 (a fresh cache folder each time: Ray Data start-up, replica start-up and teacher
load, forwards, fp16 encoding, memmap writes, per-shard and whole-file sha256, publish, reopen).
1 replica is the actor's own teacher (no pool), 2 replicas are the Ray Data pool; both builds
run the in-process actor with one torch thread, as Ray runs the real one. Also recorded: the
pool's start-up (``first_rows_s``: until its first labelled rows are back) and its rate after
it, the default digits cache build (what README command 1 pays), and ``uptime`` before and
after (the load of the machine's other jobs).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from raykd.config import load_config

MNIST = "/work/shared/data/mnist"
TEACHER_HIDDEN = [4096, 4096]


def save_teacher(cfg, path: Path) -> Path:
    from raykd.data import dataset_info
    from raykd.models import build_model
    from raykd.train.checkpoint import save_checkpoint

    info = dataset_info(cfg.data)
    torch.manual_seed(0)
    model = build_model(cfg.teacher, info, field="teacher")
    return save_checkpoint(model, {"name": cfg.teacher.name, "args": cfg.teacher.args}, info,
                           path)


def timed_build(cfg, ckpt: Path) -> tuple[float, dict[str, Any]]:
    """``ensure_cache()`` of an in-process TeacherActor with one torch thread: what the real actor
    gets (Ray sets OMP_NUM_THREADS=1 in an actor that reserves no CPU, and torch follows it), so
    the 1-replica build (in the actor) runs as in a job and as the raw loop does. Before
    2026-12-07 this ran with the benchmark process's threads (2 here), which on a loaded 2-core
    machine made it slower than the 1-thread raw loop (build_over_raw 0.70)."""
    from raykd.teacher.actor import TeacherActor

    shutil.rmtree(cfg.teacher.cache_dir, ignore_errors=True)
    actor = TeacherActor(cfg.to_dict(), [str(ckpt)], cfg.tracking.uri)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        out = actor.ensure_cache()
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert out["status"] == "built", out
    return seconds, out


def raw_seconds(cfg, ckpt: Path) -> float:
    """One process, one thread: get_batch → forward over the train split in teacher batches."""
    from raykd.data import build_dataset
    from raykd.teacher.loading import ensemble_logits, load_teacher_models

    ds = build_dataset(cfg.data, "train")
    models = [m.eval() for m in load_teacher_models([str(ckpt)], cfg, ds.info, "")]
    n, bs = len(ds), cfg.teacher.batch_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for s in range(0, n, bs):
            _, x, _ = ds.get_batch(torch.arange(s, min(s + bs, n)))
            ensemble_logits(models, x)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, metavar="PATH")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="first N MNIST images (smoke runs)")
    args = p.parse_args(argv)

    from raykd.train.fit import init_ray, local_ray_options

    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="raykd-cache-pool-"))
    init_ray(num_cpus=2, logging_level="ERROR", **local_ray_options())
    try:
        base = {"data.name": "mnist", "data.root": MNIST, "data.limit": args.limit,
                "teacher.args": {"hidden_sizes": TEACHER_HIDDEN}, "teacher.batch_size": 512,
                "teacher.shard_size": 8192, "teacher.replica_cpus": 1,
                "tracking.uri": f"sqlite:///{work / 'mlflow.db'}"}
        one = load_config(None, {**base, "teacher.cache_dir": str(work / "c1")})
        two = load_config(None, {**base, "teacher.cache_dir": str(work / "c2"),
                                 "teacher.replicas": 2})
        ckpt = save_teacher(one, work / "teacher.safetensors")
        digits = load_config(None, {"teacher.cache_dir": str(work / "digits"),
                                    "tracking.uri": base["tracking.uri"]})
        digits_ckpt = save_teacher(digits, work / "digits.safetensors")
        rounds: list[dict[str, float]] = []
        for _ in range(args.rounds):
            raw = raw_seconds(one, ckpt)
            s1, out1 = timed_build(one, ckpt)
            s2, out2 = timed_build(two, ckpt)
            sd, _ = timed_build(digits, digits_ckpt)
            n = out1["num_samples"]
            # the pool's start-up (Ray Data, replicas importing torch and loading the teacher,
            # the input blocks) and its rate once the first labelled rows are back
            steady = n / max(s2 - out2["first_rows_s"], 1e-9)
            rounds.append({"raw_samples_per_s": n / raw, "build_1_samples_per_s": n / s1,
                           "build_2_samples_per_s": n / s2, "digits_default_build_s": sd,
                           "pool_2_first_rows_s": out2["first_rows_s"],
                           "pool_2_steady_samples_per_s": steady})
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        result = {
            "replicas_2_over_1": round(statistics.median(
                r["build_2_samples_per_s"] / r["build_1_samples_per_s"] for r in rounds), 3),
            "build_over_raw": round(statistics.median(
                r["build_1_samples_per_s"] / r["raw_samples_per_s"] for r in rounds), 3),
            "medians": {k: round(v, 2) for k, v in med.items()},
            "rounds": [{k: round(v, 2) for k, v in r.items()} for r in rounds],
            "pool_2_steady_over_raw": round(statistics.median(
                r["pool_2_steady_samples_per_s"] / r["raw_samples_per_s"] for r in rounds), 3),
            "samples": n, "teacher_hidden": TEACHER_HIDDEN, "replica_cpus": 1,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__,
                        "uptime_before": uptime_before,
                        "uptime": subprocess.run(["uptime"], capture_output=True,
                                                 text=True).stdout.strip()}}
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
