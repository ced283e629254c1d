"""One ``raykd distill`` of benchmarks/data_scale.py: its config, the CLI in a subprocess under
the memory probe, and the numbers read back from its summary JSON.

raykd is driven only through its CLI (``python -m raykd.cli distill --config FILE --summary
PATH``), so the same code measures the in-memory data plane and the streamed one, and an older
revision of the source (``src`` put first on PYTHONPATH) as well as the current one.
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from _data_scale_probe import MemoryProbe

REPO = Path(__file__).resolve().parents[1]
CROP = {"name": "RandomResizedCrop",
        "args": {"size": [64, 64], "scale": [0.35, 1.0], "antialias": True}}


def image_config(root: Path, work: Path) -> dict[str, Any]:
    """Small CNNs at 64 px on the synthetic folder: 1 teacher epoch, 1 student epoch, 2 workers,
    one teacher replica; the student's inputs go through RandomResizedCrop. The CNNs are as small
    as learns something (~13 and ~4 MFLOP a forward) so that decoding, not the models, is the
    work, and 100× (400k images, 3 passes) fits the time budget on 2 cores."""
    return {
        "data": {"name": "imagefolder", "root": str(root), "image_size": 64,
                 "val_fraction": 0.05},
        "teacher": {"name": "cnn", "args": {"channels": [16, 32, 32], "hidden": 64},
                    "epochs": 1, "lr": 0.01, "replicas": 1, "batch_size": 256,
                    "cache_dir": str(work / "cache")},
        "student": {"name": "cnn", "args": {"channels": [8, 16], "hidden": 32}},
        "distill": {"temperature": 4.0, "alpha": 0.9},
        "train": {"epochs": 1, "lr": 0.01, "batch_size": 128, "num_workers": 2, "seed": 0,
                  "augment": [CROP], "checkpoint_seconds": None},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "data_scale"},
    }


def text_config(corpus: Path, work: Path) -> dict[str, Any]:
    """Tiny GPT-2-shaped teacher (trained here, 1 epoch) and student on the synthetic corpus, a
    byte-level BPE trained on it, the per-token top-k cache, 2 workers."""
    def gpt2(layers: int) -> dict[str, Any]:
        return {"model_type": "gpt2",
                "config": {"n_layer": layers, "n_embd": 64, "n_head": 2, "n_positions": 64}}

    return {
        "data": {"name": "text", "path": str(corpus), "block_size": 64, "vocab_size": 512,
                 "val_fraction": 0.05},
        "teacher": {"name": "hf_causal_lm", "args": gpt2(2), "epochs": 1, "lr": 0.002,
                    "mode": "cached", "topk": 8, "cache_dtype": "float16", "batch_size": 64,
                    "cache_dir": str(work / "cache")},
        "student": {"name": "hf_causal_lm", "args": gpt2(1)},
        "distill": {"temperature": 1.0, "losses": [{"name": "ce", "weight": 0.5},
                                                   {"name": "token_kd", "weight": 0.5}]},
        "train": {"epochs": 1, "lr": 0.002, "batch_size": 32, "num_workers": 2, "seed": 0,
                  "optimizer": "adamw", "checkpoint_seconds": None},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "data_scale_text"},
    }


def mnist_config(root: str, work: Path, epochs: int) -> dict[str, Any]:
    """MLPs on the shared MNIST copy (the side-by-side run): 1 teacher epoch, ``epochs`` student
    epochs, 2 workers, seed 0."""
    return {
        "data": {"name": "mnist", "root": root},
        "teacher": {"name": "mlp", "args": {"hidden_sizes": [512, 512]}, "epochs": 1,
                    "lr": 0.001, "batch_size": 1024, "cache_dir": str(work / "cache")},
        "student": {"name": "mlp", "args": {"hidden_sizes": [128]}},
        "distill": {"temperature": 4.0, "alpha": 0.9},
        "train": {"epochs": epochs, "lr": 0.001, "batch_size": 128, "num_workers": 2,
                  "seed": 0, "checkpoint_seconds": None},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "data_scale_mnist"},
    }


@contextmanager
def heavy_lock(path: str | None):
    """Hold ``path`` with flock for one heavy step (the project's shared /tmp/raykd-heavy.lock),
    so other jobs on the machine interleave between steps instead of waiting for all of them."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_cli(config: dict[str, Any], work: Path, src: Path | None = None,
            timeout: float = 3600) -> dict[str, Any]:
    """``raykd distill`` on ``config`` in its own process (cwd ``work``), sampled by the memory
    probe. ``src``: an older source tree put first on PYTHONPATH. Returns the measurements."""
    work.mkdir(parents=True, exist_ok=True)
    cfg_path, summary_path = work / "config.yaml", work / "summary.json"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own
    env.update(TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
    cmd = [sys.executable, "-m", "raykd.cli", "distill", "--config", str(cfg_path),
           "--summary", str(summary_path)]
    started = time.perf_counter()
    with (work / "console.txt").open("w") as console:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=console,
                                stderr=subprocess.STDOUT)
        with MemoryProbe(proc.pid) as probe:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    wall = time.perf_counter() - started
    out: dict[str, Any] = {"returncode": rc, "wall_seconds": round(wall, 1), **probe.result()}
    if rc != 0 or not summary_path.exists():
        out["error"] = (work / "console.txt").read_text()[-3000:]
        return out
    out.update(summary_numbers(json.loads(summary_path.read_text())))
    return out


def _epoch_rates(history: list[dict[str, Any]], key: str) -> list[float]:
    return [round(h[key], 1) for h in history if h.get(key) is not None]


def summary_numbers(summary: dict[str, Any]) -> dict[str, Any]:
    """Throughputs and timings from a distill summary: the student's samples/s per epoch (its
    history), the teacher fit's samples/s (transfer size × epochs ÷ compute seconds: the summary
    keeps no teacher history), and the cache build (``teacher.cache``: seconds, samples/s)."""
    student, teacher = summary.get("student") or {}, summary.get("teacher") or {}
    cache = teacher.get("cache") or {}
    hist = student.get("history") or []
    rates = _epoch_rates(hist, "samples_per_s")
    later = rates[1:] or rates  # epoch 1 pays the first-batch and warm-up costs
    t_epochs, t_compute = teacher.get("epochs"), teacher.get("compute_seconds")
    teacher_rate = (round(teacher["transfer_size"] * t_epochs / t_compute, 1)
                    if teacher.get("transfer_size") and t_epochs and t_compute else None)
    return {
        "student_samples_per_s": rates,
        "student_samples_per_s_median": round(statistics.median(later), 1) if later else None,
        "student_tokens_per_s": _epoch_rates(hist, "tokens_per_s") or None,
        "student_transfer_size": student.get("transfer_size"),
        "student_wall_seconds": student.get("wall_seconds"),
        "student_worker_start_seconds": student.get("worker_start_seconds"),
        "student_accuracy": student.get("accuracy"),
        "teacher_accuracy": teacher.get("accuracy"),
        "teacher_fit_samples_per_s": teacher_rate,
        "teacher_fit_wall_seconds": teacher.get("wall_seconds"),
        "cache_status": cache.get("status"),
        "cache_build_seconds": cache.get("seconds"),
        "cache_build_samples_per_s": cache.get("samples_per_s"),
        "cache_rows": cache.get("num_samples") or cache.get("rows"),
        "summary_seconds": summary.get("seconds"),
        "ray_start_seconds": summary.get("ray_start_seconds"),
        "language_model": summary.get("language_model"),
        "data": summary.get("data"),  # the row-store plane: identity, sizes, skipped files
    }


def raykd_origin(src: Path | None) -> str:
    """Where ``import raykd`` resolves with ``src`` first on PYTHONPATH (checks the override)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return subprocess.run([sys.executable, "-c", "import raykd; print(raykd.__file__)"],
                          env=env, capture_output=True, text=True, check=True,
                          cwd="/").stdout.strip()
