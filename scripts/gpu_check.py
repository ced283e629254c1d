"""GPU check: a GPU distillation with 2 Ray Train workers (train.use_gpu, bf16 autocast) and the
teacher-cache benchmark, in under 5 minutes on a machine with GPUs; everything into one JSON.

    scripts/gpu-check --json benchmarks/results/gpu_check.json

What it runs, in a fresh temporary folder with its own local Ray instance and sqlite MLflow store:

1. ``raykd distill`` on digits: the teacher is trained, its cache built by the teacher actor,
   the student distilled — every fit on ``--workers`` GPU workers under
   ``train.precision=--precision``. With a GPU per worker they run NCCL, one GPU each; on a
   machine with fewer GPUs than workers (one GPU, say) they share them
   (``train.gpus_per_worker`` < 1, gloo: NCCL takes one rank per GPU), leaving the teacher
   actor its GPU share (``teacher.use_gpu=true``). The run's summary (accuracies, per-fit
   seconds and samples/s, the teacher cache's build) goes into the JSON.
2. ``benchmarks/teacher_cache.py`` at a size that fits the time budget (see ``CACHE_BENCH``),
   its JSON nested in this one.

It refuses, with one line and exit 2, before starting anything, where there is no CUDA device
(or torch is a CPU-only build). Exit 1 when a step fails or the whole check overran
``--budget-s``; 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "gpu_check.json"
# The cache benchmark's own defaults take far longer than this check's budget: fewer rounds,
# seeds and epochs (its JSON records the sizes it ran with).
CACHE_BENCH = ["--samples", "4096", "--rounds", "3", "--seeds", "2", "--digits-epochs", "5",
               "--teacher-epochs", "10", "--digits-k", "1", "3"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--json", default=str(DEFAULT_JSON), metavar="PATH",
                   help=f"where the results go (default {DEFAULT_JSON.relative_to(ROOT)})")
    p.add_argument("--workers", type=int, default=2, help="GPU training workers (default 2)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--epochs", type=int, default=3, help="teacher and student epochs")
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="the whole check's time budget in seconds (default 300)")
    p.add_argument("--skip-cache-benchmark", action="store_true")
    args = p.parse_args(argv)
    if args.workers < 1 or args.epochs < 1 or args.budget_s <= 0:
        p.error("--workers and --epochs must be >= 1 and --budget-s > 0")
    return args


def gpu_problem() -> str | None:
    """Why this machine cannot run the check (one line), or None."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"no CUDA GPU on this machine (torch {torch.__version__}, {build}: "
                f"torch.cuda.is_available() is False); run it on a machine with a GPU")
    return None


def gpu_settings(workers: int, gpus: int) -> dict[str, str]:
    """A GPU per worker (NCCL) where there are enough; else the workers share the GPUs and
    leave the teacher actor its fraction."""
    from raykd.teacher.actor import GPU_FRACTION

    if gpus >= workers:
        return {"train.gpus_per_worker": "1"}
    # A fractional share must fit on one GPU: k workers per GPU and the teacher on one of them.
    per_gpu = -(-workers // gpus)
    share = int((1 - GPU_FRACTION) / per_gpu * 1000) / 1000
    return {"train.gpus_per_worker": f"{share:g}", "teacher.use_gpu": "true"}


def machine() -> dict[str, Any]:
    import torch

    return {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cuda": torch.version.cuda, "torch": torch.__version__,
            "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "platform": platform.platform(), "load_average_at_start": os.getloadavg()}


def run_step(cmd: list[str], cwd: Path, timeout_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                              timeout=max(timeout_s, 1.0))
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as err:
        rc = None
        out = (err.stdout or b"") + (err.stderr or b"")
        tail = (out.decode(errors="replace") if isinstance(out, bytes) else out)[-4000:]
    return {"command": cmd, "returncode": rc, "timed_out": rc is None,
            "seconds": round(time.perf_counter() - started, 1), "output_tail": tail}


def distill(args: argparse.Namespace, work: Path, timeout_s: float) -> dict[str, Any]:
    summary = work / "summary.json"
    import torch

    sets = {"train.use_gpu": "true", "train.num_workers": str(args.workers),
            **gpu_settings(args.workers, torch.cuda.device_count()),
            "train.precision": args.precision, "train.epochs": str(args.epochs),
            "teacher.epochs": str(args.epochs),
            "tracking.uri": f"sqlite:///{work / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "raykd.cli", "distill", "--summary", str(summary)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    step = run_step(cmd, work, timeout_s)
    step["settings"] = sets
    if summary.is_file():
        step["summary"] = json.loads(summary.read_text())
    return step


def cache_benchmark(work: Path, timeout_s: float) -> dict[str, Any]:
    out = work / "teacher_cache.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "teacher_cache.py"), "--json", str(out),
           *CACHE_BENCH]
    step = run_step(cmd, work, timeout_s)
    if out.is_file():
        step["result"] = json.loads(out.read_text())
    return step


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = gpu_problem()
    if problem:
        print(f"gpu-check: {problem}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="raykd-gpu-check-"))
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env_path}" if env_path else str(ROOT)
    result: dict[str, Any] = {"machine": machine(), "budget_s": args.budget_s,
                              "workers": args.workers, "precision": args.precision}
    try:
        print(f"gpu-check: distillation on {args.workers} GPU workers ({args.precision}) ...",
              flush=True)
        result["distill"] = distill(args, work, args.budget_s)
        if not args.skip_cache_benchmark:
            left = args.budget_s - (time.perf_counter() - started)
            print(f"gpu-check: teacher-cache benchmark ({left:.0f} s left) ...", flush=True)
            result["cache_benchmark"] = cache_benchmark(work, left)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    steps = [result[k] for k in ("distill", "cache_benchmark") if k in result]
    result.update(seconds=round(seconds, 1), within_budget=seconds <= args.budget_s,
                  passed=all(s["returncode"] == 0 for s in steps) and seconds <= args.budget_s)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu-check: {'passed' if result['passed'] else 'FAILED'} in {seconds:.0f} s; "
          f"results in {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
