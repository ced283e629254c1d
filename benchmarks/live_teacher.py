"""Live-mode throughput: 2 Ray Train workers against 1, with the teacher's features fetched live,
and what batching the workers' calls in the actor buys.

    .venv/bin/python benchmarks/live_teacher.py --json benchmarks/results/live_teacher.json

A benchmark, not a test. Every measurement is a real ``fit()`` of the student through the real
pipeline: ``serve_teacher`` starts the live teacher actor, each Ray Train worker calls it once per
step (``LiveTeacher``) for the logits and the hooked feature of a FitNets term, DDP all-reduces
the gradients. Four settings, side by side in one run and interleaved round by round:

- 1 worker and 2 workers, each with the actor batching concurrent calls
  (``teacher.live_batch_window_ms``, default 5) and with one call at a time (``null``, the
  behaviour before batching).

Also the teacher service alone: 1 or 2 driver threads (the workers' stand-ins) send
back-to-back forwards to the real actor, batched and one at a time; samples served per second.
Less noisy than whole fits, it shows what the actor itself gains from batching.

Reported per setting: samples/s of the student's training epochs (all workers together: samples
of the epoch / its wall time, from the fit's own ``samples_per_s`` metric), the first epoch
left out (warm-up), median over epochs and rounds; the actor's calls and passes (how many calls
shared a pass). On a shared 2-core machine a second worker competes with the first and with the
teacher for the same cores: the numbers are what this machine gives, with its load averages.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_cache import save_teacher  # noqa: E402 - the benchmarks' own helper

from raykd.config import RaykdConfig, load_config  # noqa: E402

SETTINGS = [(1, "batched"), (1, "one_at_a_time"), (2, "batched"), (2, "one_at_a_time")]
WINDOW_MS = {"batched": 5.0, "one_at_a_time": None}


def config(work: Path, teacher: Path | None, workers: int, mode: str,
           args: argparse.Namespace) -> RaykdConfig:
    losses = [{"name": "ce", "weight": 0.5}, {"name": "kd", "weight": 0.5},
              {"name": "fitnets", "weight": 1.0, "student_layers": ["layers.0"],
               "teacher_layers": [f"layers.{len(args.teacher_hidden) - 1}"],
               "params": {"connector": "learned"}}]
    sets: dict[str, Any] = {
        "teacher.mode": "live", "teacher.args": {"hidden_sizes": args.teacher_hidden},
        "teacher.live_batch_window_ms": WINDOW_MS[mode],
        "student.args": {"hidden_sizes": args.student_hidden},
        "train.num_workers": workers, "train.epochs": args.epochs,
        "train.batch_size": args.batch_size, "train.checkpoint_seconds": None,
        "train.keep_checkpoint": "last", "distill.losses": losses,
        "tracking.uri": f"sqlite:///{work / 'mlflow.db'}"}
    if teacher is not None:
        sets["teacher.checkpoint"] = str(teacher)
    return load_config(None, sets)


def measure(cfg: RaykdConfig, teacher: Path, name: str) -> dict[str, Any]:
    from raykd.teacher.service import serve_teacher, stop_teacher, teacher_stats
    from raykd.train.fit import fit

    service = serve_teacher(cfg, [str(teacher)], cfg.tracking.uri)
    try:
        started = time.perf_counter()
        result = fit(cfg, "student", teacher=service.handoff, name=name)
        wall = time.perf_counter() - started
        stats = teacher_stats(service)
    finally:
        stop_teacher(service)
    rates = [h["samples_per_s"] for h in result.history]
    return {"samples_per_s_by_epoch": [round(r, 1) for r in rates],
            "samples_per_s": round(statistics.median(rates[1:] or rates), 1),
            "test_accuracy": result.test_accuracy, "fit_wall_seconds": round(wall, 1),
            "live_calls": stats.get("live_calls"), "live_passes": stats.get("live_passes"),
            "live_max_calls_per_pass": stats.get("live_max_calls_per_pass"),
            "teacher_forward_samples": stats["forward_samples"]}


def serve_rate(cfg: RaykdConfig, teacher: Path, callers: int, calls: int,
               batch_size: int) -> dict[str, Any]:
    """The live teacher service alone: ``callers`` threads (the workers' stand-ins) each send
    ``calls`` back-to-back forwards of one batch (logits + the FitNets feature) to the real
    actor; samples served per second of wall time, and how the calls shared passes."""
    import threading

    import ray

    from raykd.data import build_dataset
    from raykd.teacher.service import serve_teacher, stop_teacher, teacher_stats

    service = serve_teacher(cfg, [str(teacher)], cfg.tracking.uri)
    paths = cfg.distill.layer_paths("teacher")
    _, x, _ = build_dataset(cfg.data, "train").get_batch(torch.arange(batch_size))
    try:
        ray.get(service.actor.forward.remote(x, paths))  # warm-up: imports, first pass

        def caller() -> None:
            for _ in range(calls):
                ray.get(service.actor.forward.remote(x, paths))

        threads = [threading.Thread(target=caller) for _ in range(callers)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        stats = teacher_stats(service)
    finally:
        stop_teacher(service)
    return {"samples_per_s": round(callers * calls * batch_size / seconds, 1),
            "live_calls": stats.get("live_calls"), "live_passes": stats.get("live_passes")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, metavar="PATH")
    p.add_argument("--epochs", type=int, default=4, help="epochs per fit (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all settings")
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--teacher-hidden", type=int, nargs="+", default=[1024, 1024])
    p.add_argument("--student-hidden", type=int, nargs="+", default=[64])
    p.add_argument("--service-calls", type=int, default=100,
                   help="calls per caller in the teacher-service measurement (0: skip it)")
    args = p.parse_args(argv)
    out_path = Path(args.json).resolve()

    from raykd.train.fit import ensure_ray, fit_session

    work = Path(tempfile.mkdtemp(prefix="raykd-live-bench-"))
    os.chdir(work)
    load_start = os.getloadavg()
    started = time.perf_counter()
    for attempt in range(3):  # on a loaded machine the dashboard's free port can be taken
        try:  # before Ray binds it (seen here several times); a new port is picked each try
            ensure_ray()
            break
        except ValueError:
            import ray

            ray.shutdown()
            if attempt == 2:
                raise
    runs: list[dict[str, Any]] = []
    service: list[dict[str, Any]] = []
    try:
        teacher = save_teacher(config(work, None, 1, "batched", args), work / "teacher.safetensors")
        for r in range(args.rounds):
            order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
            for workers, mode in order if args.service_calls else []:
                rate = serve_rate(config(work, teacher, workers, mode, args), teacher, workers,
                                  args.service_calls, args.batch_size)
                service.append({"round": r, "callers": workers, "mode": mode,
                                "load_average": os.getloadavg(), **rate})
                print(f"service, {workers} caller(s), {mode}: {rate}", flush=True)
            for workers in sorted({w for w, _ in order}, reverse=r % 2 == 1):
                # One worker group per worker count and round; both modes run on it.
                with fit_session(config(work, teacher, workers, "batched", args), "bench"):
                    for w, mode in order:
                        if w != workers:
                            continue
                        cfg = config(work, teacher, workers, mode, args)
                        print(f"round {r}: {workers} worker(s), {mode} ...", flush=True)
                        run = {"round": r, "workers": workers, "mode": mode,
                               "load_average": os.getloadavg(),
                               **measure(cfg, teacher, f"{mode}-{workers}w-{r}")}
                        print(f"  {run['samples_per_s']} samples/s, calls/passes "
                              f"{run['live_calls']}/{run['live_passes']}", flush=True)
                        runs.append(run)
    finally:
        import ray

        ray.shutdown()
        os.chdir(out_path.parent if out_path.parent.exists() else Path.home())
        shutil.rmtree(work, ignore_errors=True)

    def median_of(workers: int, mode: str) -> float:
        return round(statistics.median(
            s for run in runs if (run["workers"], run["mode"]) == (workers, mode)
            for s in run["samples_per_s_by_epoch"][1:]), 1)

    table = {f"{w}w_{m}_samples_per_s": median_of(w, m) for w, m in SETTINGS}
    service_table = {f"{w}_callers_{m}_samples_per_s": round(statistics.median(
        s["samples_per_s"] for s in service if (s["callers"], s["mode"]) == (w, m)), 1)
        for w, m in SETTINGS} if service else {}
    result = {
        "what": "live-mode student throughput (all workers' samples per second of a training "
                "epoch), FitNets feature term + KD + CE, teacher features fetched live",
        "estimator": "samples/s of each epoch after the first (warm-up), median over epochs "
                     "and rounds; settings interleaved per round (order reversed every round)",
        **table,
        "two_over_one_batched": round(table["2w_batched_samples_per_s"]
                                      / table["1w_batched_samples_per_s"], 3),
        "two_over_one_one_at_a_time": round(table["2w_one_at_a_time_samples_per_s"]
                                            / table["1w_one_at_a_time_samples_per_s"], 3),
        "batched_over_one_at_a_time_2w": round(table["2w_batched_samples_per_s"]
                                               / table["2w_one_at_a_time_samples_per_s"], 3),
        "teacher_service": {
            "what": "the live actor alone: N driver threads each send back-to-back forwards "
                    "(one batch, logits + the FitNets feature); samples served per second",
            **service_table,
            "batched_over_one_at_a_time_2_callers": round(
                service_table["2_callers_batched_samples_per_s"]
                / service_table["2_callers_one_at_a_time_samples_per_s"], 3)
            if service else None,
            "runs": service},
        "setup": {"dataset": "digits (sklearn, 8x8, 1294 train samples)",
                  "teacher": f"mlp {args.teacher_hidden} (random init)",
                  "student": f"mlp {args.student_hidden}", "epochs": args.epochs,
                  "rounds": args.rounds, "batch_size_per_worker": args.batch_size,
                  "batch_window_ms": WINDOW_MS["batched"]},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "platform": platform.platform(),
                    "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()},
        "seconds": round(time.perf_counter() - started, 1),
        "runs": runs,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    shown = {k: v for k, v in result.items() if k not in ("runs", "setup", "machine")}
    shown["teacher_service"] = {k: v for k, v in service_table.items()}
    print(json.dumps(shown, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
