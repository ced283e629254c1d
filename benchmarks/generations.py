"""Born-again networks and Noisy Student, measured (issue #16; not a test).

Runs the shipped configs through the CLI, one ``raykd`` process per run (as a user runs them),
each in a fresh folder with its own MLflow store, and collects their summaries:

- ``ban_digits``: ``configs/digits_born_again.yaml``, K generations, seeds 0..N-1;
- ``ns_digits``: ``configs/digits_noisy_student.yaml``, 2 rounds, with the labels-only baseline;
- ``ban_mnist``: ``configs/mnist_born_again.yaml`` on the MNIST copy (800-800 MLPs);
- ``ns_mnist``: ``configs/mnist_noisy_student.yaml``: 1,000 labels, 59,000 unlabelled, 2 rounds,
  with the labels-only baseline.

    python benchmarks/generations.py --mnist ../shared/data/mnist \\
        --json benchmarks/results/generations.json [--only ban_digits,ns_mnist]

Written per run: each member's test accuracy, params, wall time, worker start and compute
seconds (the rest of a fit's wall time is its overhead), the BAN-E / baseline accuracies, the
paper claims checked, the run's wall time and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(verb: str, args: list[str], log: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="raykd-generations-") as tmp:
        summary = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "raykd.cli", verb, *args,
               "--set", f"tracking.uri=sqlite:///{tmp}/mlflow.db", "--summary", str(summary)]
        load, t0 = os.getloadavg(), time.perf_counter()
        with log.open("a") as out:
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            rc = subprocess.run(cmd, cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)}).returncode
        if rc != 0:
            raise SystemExit(f"{verb} failed (rc {rc}); see {log}")
        s = json.loads(summary.read_text())
        s["wall_seconds"] = round(time.perf_counter() - t0, 1)
        s["load_before"], s["load_after"] = load, os.getloadavg()
        return s


def members(s: dict, word: str) -> list[dict]:
    keys = (word[:-1], "accuracy", "params", "wall_seconds", "worker_start_seconds",
            "compute_seconds", "transfer", "epochs")
    return [{k: m.get(k) for k in keys} for m in s[word]]


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def ban_digits(seeds: int, generations: int, log: Path) -> dict:
    runs = []
    for seed in range(seeds):
        s = run_cli("born-again", ["--config", str(REPO / "configs/digits_born_again.yaml"),
                                   "--generations", str(generations),
                                   "--set", f"train.seed={seed}"], log)
        runs.append({"seed": seed, "generations": members(s, "generations"),
                     "ban_e": s["ensemble"]["accuracy"], "claims": s["claims"],
                     "seconds": s["wall_seconds"], "load": [s["load_before"], s["load_after"]]})
        print(f"ban_digits seed {seed}: "
              f"{[round(g['accuracy'], 4) for g in runs[-1]['generations']]} "
              f"BAN-E {runs[-1]['ban_e']:.4f}", flush=True)
    per_gen = [mean_sd([r["generations"][i]["accuracy"] for r in runs])
               for i in range(generations + 1)]
    return {"runs": runs, "per_generation": per_gen,
            "ban_e": mean_sd([r["ban_e"] for r in runs]),
            "gen1_ge_gen0": sum(r["claims"]["generation_1_ge_0"] for r in runs),
            "ban_e_ge_best": sum(r["claims"]["ban_e_ge_best"] for r in runs)}


def ban_mnist(root: str, log: Path) -> dict:
    s = run_cli("born-again", ["--config", str(REPO / "configs/mnist_born_again.yaml"),
                               "--set", f"data.root={root}"], log)
    return {"generations": members(s, "generations"), "ban_e": s["ensemble"]["accuracy"],
            "claims": s["claims"], "seconds": s["wall_seconds"],
            "load": [s["load_before"], s["load_after"]]}


def noisy_student(config: str, extra: list[str], log: Path) -> dict:
    s = run_cli("noisy-student", ["--config", str(REPO / config), "--baseline", *extra], log)
    return {"rounds": members(s, "rounds"), "baseline": s["baseline"],
            "labelled": s["labelled"], "claims": s["claims"], "seconds": s["wall_seconds"],
            "load": [s["load_before"], s["load_after"]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, metavar="PATH")
    p.add_argument("--mnist", metavar="DIR", help="the MNIST folder (torchvision layout)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--only", default="ban_digits,ns_digits,ban_mnist,ns_mnist")
    args = p.parse_args()
    out = Path(args.json).resolve()
    log = out.with_suffix(".log")
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        if name == "ban_digits":
            result[name] = ban_digits(args.seeds, args.generations, log)
        elif name == "ns_digits":
            result[name] = noisy_student("configs/digits_noisy_student.yaml", [], log)
        elif name in ("ban_mnist", "ns_mnist"):
            if not args.mnist:
                raise SystemExit(f"{name} needs --mnist DIR")
            root = str(Path(args.mnist).resolve())
            result[name] = (ban_mnist(root, log) if name == "ban_mnist" else noisy_student(
                "configs/mnist_noisy_student.yaml", ["--set", f"data.root={root}"], log))
        else:
            raise SystemExit(f"--only: unknown run {name!r}")
        result[name]["benchmark_seconds"] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))  # after each run: nothing lost on failure
        print(f"{name}: done in {result[name]['benchmark_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
