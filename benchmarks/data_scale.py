"""Does the data plane scale? Peak memory per process kind and throughput of a 1-epoch
``raykd distill`` on a synthetic JPEG folder and a text corpus at 1×/10×/100×, plus streamed ÷
in-memory samples/s on MNIST and the teacher pool's cache-build ratios (issue #26).

    flock /tmp/raykd-heavy.lock .venv/bin/python benchmarks/data_scale.py \\
        --json benchmarks/results/data_scale.json --sizes 1x

A benchmark, not a test. Everything runs through the CLI in subprocesses (``python -m raykd.cli
distill --config FILE --summary PATH``), so it measures any revision of raykd the same way.

- Images: 4,000 / 40,000 / 400,000 JPEGs, 3×256×256, 10 classes (seeded, learnable stripes;
  ``_data_scale_data.py``), written by a Pool of 2 processes into a temp folder; small CNNs at
  ``data.image_size: 64`` with ``train.augment: RandomResizedCrop`` to 64 px; teacher trained 1
  epoch, cached by 1 replica, student 1 epoch on 2 workers.
- Text: 1 / 10 / 100 MiB of synthetic sentences; tiny GPT-2-shaped teacher (2 blocks, trained 1
  epoch) and student (1 block), BPE of 512 ids, per-token top-8 cache, 2 workers, 1 epoch.
- Per run, every 0.2 s from /proc (the CLI process and its descendants only,
  ``_data_scale_probe.py``): peak RSS of the largest process and of the sum, per kind (driver,
  Train worker, teacher actor/replica, Ray Data workers, other Ray processes); the plasma
  store's allocated bytes (its high-water mark); ``/dev/shm`` growth. From the summary JSON: the
  student's samples/s, the teacher fit's samples/s, the cache build's seconds and samples/s.
- MNIST side by side (``--mnist``): the same config and seed (2 workers, 1 teacher epoch,
  ``--mnist-epochs`` student epochs) on the current tree and on ``--baseline-rev`` (exported with
  ``git archive`` into the temp folder and put first on PYTHONPATH, checked by printing
  ``raykd.__file__``); ``streamed_over_in_memory`` = current ÷ baseline student samples/s
  (median over the epochs after the first).
- ``replicas_2_over_1`` and ``build_over_raw``: ``benchmarks/cache_pool.py`` run as is (one
  round) in a subprocess; null with the reason when it fails (it imports raykd's internals).

Time: about 90 minutes for every size on 2 cores (``--sizes`` picks a subset). What it wrote is
removed at the end unless ``--keep``.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the _data_scale_* helpers

from _data_scale_data import (IMAGES_1X, SIZES, TEXT_1X_BYTES, write_corpus,  # noqa: E402
                              write_image_folder)
from _data_scale_runs import (REPO, heavy_lock, image_config, mnist_config,  # noqa: E402
                              raykd_origin, run_cli, text_config)

MNIST = "/work/shared/data/mnist"
BASELINE_REV = "e025435"  # the last revision of the in-memory data plane
LOCK: str | None = None  # --lock: a flock file held around each heavy step


def machine() -> dict[str, Any]:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO).stdout.strip()
        except OSError:
            return ""

    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return {"cores": os.cpu_count(), "cpu": cpu, "mem_gib": round(int(mem) / (1 << 20), 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "rev": run("git", "rev-parse", "--short", "HEAD"),
            "dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no"))}


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def image_row(size: str, work: Path, keep: bool) -> dict[str, Any]:
    folder = work / f"images_{size}"
    started = time.perf_counter()
    written = write_image_folder(folder, IMAGES_1X * SIZES[size], processes=2)
    row: dict[str, Any] = {"size": size, **written,
                           "write_seconds": round(time.perf_counter() - started, 1)}
    with heavy_lock(LOCK):
        row["load_before"] = _loadavg()
        row.update(run_cli(image_config(folder, work / f"run_images_{size}"),
                           work / f"run_images_{size}"))
    row["load_after"] = _loadavg()
    if not keep:  # 100× is ~7 GB of JPEGs: gone before the next size is written
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(work / f"run_images_{size}" / "cache", ignore_errors=True)
    _print_row("images", row)
    return row


def text_row(size: str, work: Path, keep: bool) -> dict[str, Any]:
    corpus = work / f"text_{size}" / "corpus.txt"
    written = write_corpus(corpus, TEXT_1X_BYTES * SIZES[size])
    row: dict[str, Any] = {"size": size, **written}
    with heavy_lock(LOCK):
        row["load_before"] = _loadavg()
        row.update(run_cli(text_config(corpus, work / f"run_text_{size}"),
                           work / f"run_text_{size}"))
    row["load_after"] = _loadavg()
    if not keep:
        shutil.rmtree(corpus.parent, ignore_errors=True)
        shutil.rmtree(work / f"run_text_{size}" / "cache", ignore_errors=True)
    _print_row("text", row)
    return row


def _print_row(kind: str, row: dict[str, Any]) -> None:
    if row.get("error"):
        print(f"[{kind} {row['size']}] FAILED rc={row['returncode']}:\n{row['error'][-1500:]}",
              flush=True)
        return
    print(f"[{kind} {row['size']}] wall {row['wall_seconds']} s, student "
          f"{row.get('student_samples_per_s')} samples/s, cache build "
          f"{row.get('cache_build_samples_per_s')} samples/s, largest Train worker "
          f"{row['peak_rss_largest_mib']['train_worker']} MiB, all "
          f"{row['peak_rss_all_mib']} MiB, object store {row['object_store_peak_mib']} MiB",
          flush=True)


def export_rev(rev: str, dest: Path) -> str:
    """The source tree of ``rev`` under ``dest`` (``git archive``: no worktree is registered in
    the shared repository). Returns the full commit id."""
    dest.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", rev], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def side_by_side(args, work: Path) -> dict[str, Any]:
    """Current tree vs ``--baseline-rev`` on MNIST, same config and seed, one after the other."""
    old = work / "baseline_src"
    commit = export_rev(args.baseline_rev, old)
    origin_old, origin_new = raykd_origin(old), raykd_origin(None)
    if not origin_old.startswith(str(old)):
        return {"error": f"PYTHONPATH did not take precedence: raykd from {origin_old}"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    out: dict[str, Any] = {"baseline_rev": commit, "current_rev": head,
                           "raykd_current": origin_new, "raykd_baseline": origin_old,
                           "epochs": args.mnist_epochs, "runs": []}
    for name, src in [("current", None), ("baseline", old)] * args.mnist_rounds:
        cfg = mnist_config(args.mnist, work / f"mnist_{name}", args.mnist_epochs)
        with heavy_lock(LOCK):
            row = {"tree": name, "load_before": _loadavg(),
                   **run_cli(cfg, work / f"mnist_{name}", src=src)}
        row["load_after"] = _loadavg()
        shutil.rmtree(work / f"mnist_{name}", ignore_errors=True)  # fresh cache each round
        out["runs"].append(row)
        print(f"[mnist {name}] {row.get('student_samples_per_s')} samples/s, wall "
              f"{row['wall_seconds']} s" + (f" FAILED: {row['error'][-800:]}"
                                            if row.get("error") else ""), flush=True)
    rates = {n: [r["student_samples_per_s_median"] for r in out["runs"]
                 if r["tree"] == n and r.get("student_samples_per_s_median")]
             for n in ("current", "baseline")}
    if rates["current"] and rates["baseline"]:
        out["ratio"] = round(sum(rates["current"]) / sum(rates["baseline"]), 3)
    same = subprocess.run(["git", "diff", "--quiet", commit, "HEAD", "--", "raykd"],
                          cwd=REPO).returncode == 0
    if same:
        out["note"] = ("raykd/ at HEAD is the baseline revision's: the ratio measures run-to-run "
                       "noise, not the streamed plane")
    return out


def cache_pool(work: Path, rounds: int) -> dict[str, Any]:
    """benchmarks/cache_pool.py as is, with one torch thread per process (OMP_NUM_THREADS=1).
    Since 86eaf09 a 1-replica build runs in the teacher actor itself, here the benchmark's own
    process: left at torch's default (2 threads on 2 cores) it raced 1-CPU replicas and a
    1-thread raw loop (measured 23:10 UTC: build ÷ raw 1.68, 2 replicas ÷ 1 0.53)."""
    path = work / "cache_pool.json"
    with heavy_lock(LOCK):
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cache_pool.py"), "--json",
                               str(path), "--rounds", str(rounds)], cwd=REPO,
                              capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0 or not path.exists():
        return {"error": (proc.stdout + proc.stderr)[-2000:]}
    return json.loads(path.read_text())


def _rss_ratio(rows: list[dict[str, Any]]) -> tuple[float | None, str]:
    ok = [r for r in rows if not r.get("error")]
    first = next((r for r in ok if r["size"] == "1x"), None)
    last = ok[-1] if ok else None
    if first is None or last is None or last is first:
        return None, "needs 1x and a larger size run; sizes run: " + ",".join(
            r["size"] for r in ok)
    a = first["peak_rss_largest_mib"]["train_worker"]
    b = last["peak_rss_largest_mib"]["train_worker"]
    return (round(b / a, 3) if a else None), f"{last['size']} / 1x"


def crop_note() -> str:
    """Whether this revision can RandomResizedCrop at native resolution: not while imagefolder
    resizes every image to data.image_size when it loads (or prepares) the split."""
    src = REPO / "raykd" / "data" / "imagefolder.py"
    if src.exists() and "Resize((" in src.read_text():
        return ("this revision resizes every image to data.image_size (64) when it loads or "
                "prepares the split, so train.augment's RandomResizedCrop crops the 64-px copy, "
                "not the 256-px JPEG: it cannot crop at native resolution")
    return ("raykd/data/imagefolder.py no longer resizes with transforms.Resize at load: check "
            "which resolution RandomResizedCrop receives")


def _compute_seconds(row: dict[str, Any]) -> float:
    """The part of a run that scales with N: the teacher's and student's epochs (transfer size ÷
    samples/s; the fits' walls also hold the worker group's start) and the cache build."""
    n, out = row.get("student_transfer_size") or 0, row.get("cache_build_seconds") or 0.0
    if n and row.get("teacher_fit_samples_per_s"):
        out += n / row["teacher_fit_samples_per_s"]
    if n and row.get("student_samples_per_s_median"):
        out += n / row["student_samples_per_s_median"]
    return out


def projection(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Seconds each size would take (writing its files included), a linear guess for planning
    --sizes, not a measurement. From two sizes: the line through the smallest and the largest
    run. From one: its epochs and cache build scale with N, the rest (Ray's start, worker
    groups, MLflow, the in-memory plane's decoding in every process) is taken as fixed, which
    guessed 211 s for a 10x that took 339 s (2026-12-07)."""
    ok = [r for r in rows if not r.get("error")]
    if not ok:
        return None

    def total(r: dict[str, Any]) -> float:
        return r["wall_seconds"] + (r.get("write_seconds") or 0.0)

    lo, hi = ok[0], ok[-1]
    if hi is not lo:
        slope = (total(hi) - total(lo)) / (SIZES[hi["size"]] - SIZES[lo["size"]])
        fixed, how = max(0.0, total(lo) - slope * SIZES[lo["size"]]), f"{lo['size']}+{hi['size']}"
    else:
        variable = _compute_seconds(lo) + (lo.get("write_seconds") or 0.0)
        fixed, how = max(0.0, total(lo) - variable), lo["size"]
        slope = variable / SIZES[lo["size"]]
    return {"from_sizes": how, "fixed_seconds": round(fixed, 1),
            **{s: round(fixed + slope * k) for s, k in SIZES.items()}}


def headline(result: dict[str, Any]) -> None:
    img = result["images"]
    ratio, sizes = _rss_ratio(img)
    text_ratio, text_sizes = _rss_ratio(result["text"])
    mnist, pool = result.get("mnist") or {}, result.get("cache_pool") or {}
    result.update({
        "worker_rss_ratio_100x": ratio, "worker_rss_ratio_sizes": sizes,
        "worker_rss_ratio_text": text_ratio, "worker_rss_ratio_text_sizes": text_sizes,
        "streamed_over_in_memory": mnist.get("ratio"),
        "replicas_2_over_1": pool.get("replicas_2_over_1"),
        "build_over_raw": pool.get("build_over_raw"),
        "projected_seconds": {"images": projection(img), "text": projection(result["text"])},
    })


def notes(args) -> dict[str, str]:
    return {
        "crop": crop_note(),
        "rss": "resident set (/proc/PID/statm) of the CLI process and its descendants, every "
               "0.2 s; shared pages (libraries, plasma objects a process maps) count in each "
               "process, so sums over-count them",
        "kinds": "from the process title: ray_data includes Ray Train's DatasetManager actor; "
                 "ray_other is raylet, gcs_server, dashboard (+ its heads), agents, Train "
                 "controller, coordinators and idle pooled workers",
        "object_store": "allocated bytes (st_blocks) of the plasma file the raylet holds open "
                        "(/dev/shm/plasma*, deleted), read through /proc/<raylet>/fd; plasma "
                        "keeps touched pages, so the peak is the run's high-water mark",
        "samples_per_s": "student: the summary's per-epoch history (median of the epochs after "
                         "the first when there are several); teacher fit: transfer size × "
                         "epochs ÷ compute seconds (the summary keeps no teacher history); "
                         "cache build: summary teacher.cache.samples_per_s",
        "streamed_over_in_memory": f"MNIST, current tree ÷ {args.baseline_rev}, student "
                                   "samples/s, same config and seed, 2 workers",
        "cache_pool": "benchmarks/cache_pool.py run as is in a subprocess with "
                      "OMP_NUM_THREADS=1 (see data_scale.cache_pool)",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, metavar="PATH")
    p.add_argument("--sizes", default="1x,10x,100x", help="comma list of 1x, 10x, 100x")
    p.add_argument("--kinds", default="images,text", help="comma list of images, text")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (printed)")
    p.add_argument("--baseline-rev", default=BASELINE_REV)
    p.add_argument("--mnist", default=MNIST, help="MNIST folder; 'none' skips the side by side")
    p.add_argument("--mnist-epochs", type=int, default=3)
    p.add_argument("--mnist-rounds", type=int, default=1)
    p.add_argument("--pool-rounds", type=int, default=1, help="0 skips cache_pool.py")
    p.add_argument("--lock", metavar="FILE", help="flock FILE around each distillation (e.g. "
                   "/tmp/raykd-heavy.lock on a shared machine; instead of flock around it all)")
    p.add_argument("--workdir", default=None, help="parent of the temp folder (default $TMPDIR)")
    args = p.parse_args(argv)
    global LOCK
    LOCK = args.lock
    sizes = [s for s in args.sizes.split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [s for s in sizes if s not in SIZES] + [k for k in kinds if k not in ("images", "text")]
    if bad:
        p.error(f"unknown size/kind {bad}; sizes: {list(SIZES)}, kinds: images, text")

    started, work = time.perf_counter(), Path(tempfile.mkdtemp(prefix="raykd-data-scale-",
                                                               dir=args.workdir))
    result: dict[str, Any] = {"machine": machine(), "load_before": _loadavg(),
                              "sizes_run": sizes, "kinds_run": kinds,
                              "images_per_size": {s: IMAGES_1X * SIZES[s] for s in SIZES},
                              "text_bytes_per_size": {s: TEXT_1X_BYTES * SIZES[s] for s in SIZES},
                              "notes": notes(args), "images": [], "text": []}
    result["cores"] = result["machine"]["cores"]
    try:
        for size in sizes:
            if "images" in kinds:
                result["images"].append(image_row(size, work, args.keep))
            if "text" in kinds:
                result["text"].append(text_row(size, work, args.keep))
        if args.mnist != "none":
            result["mnist"] = side_by_side(args, work)
        if args.pool_rounds > 0:
            result["cache_pool"] = cache_pool(work, args.pool_rounds)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    headline(result)
    result.update(load_after=_loadavg(), wall_seconds=round(time.perf_counter() - started, 1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in (
        "worker_rss_ratio_100x", "worker_rss_ratio_sizes", "streamed_over_in_memory",
        "replicas_2_over_1", "build_over_raw", "cores", "load_before", "load_after",
        "wall_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
