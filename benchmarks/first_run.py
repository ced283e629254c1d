"""README command 1, timed: the default digits job in a fresh process, from nothing (not a test).

Runs ``raykd distill --baseline --summary`` exactly as a new user would after the install (the
``.venv`` set-up that ``scripts/raykd`` does first is left out: ~25-30 s from the package cache,
nothing of raykd's), in a fresh empty folder, so Ray is started, the teacher trained, its cache
built, the student and the baseline trained, and everything logged to a new MLflow database.

    python benchmarks/first_run.py --json benchmarks/results/first_run.json

Written: ``job_seconds`` (the process end to end, Ray start included), ``ray_start_seconds``,
``fits`` (per fit: ``name``, ``wall_seconds`` submitted→weights back, ``worker_start_seconds``
submitted→running on the workers, ``compute_seconds`` the epochs' training + validation,
``epochs``), ``epoch_overhead_seconds`` (median over the fits' epochs of the gap between two
epochs' ends beyond that epoch's compute), ``console_lines`` (stdout + stderr, not a terminal),
the accuracies, and the machine's load before and after.
Goals (issue #15): job_seconds <= 60 on 2 cores; epoch_overhead_seconds <= 0.1;
console_lines <= 40.
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
GOALS = {"job_seconds": 60.0, "epoch_overhead_seconds": 0.1, "console_lines": 40}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, metavar="PATH")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    raykd = REPO / ".venv" / "bin" / "raykd"
    with tempfile.TemporaryDirectory(prefix="raykd-first-run-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = [str(raykd), "distill", "--baseline", "--summary", str(summary_path)]
        for item in args.overrides:
            cmd += ["--set", item]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS",))}
        load_before = os.getloadavg()
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        job_seconds = time.perf_counter() - started
        load_after = os.getloadavg()
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            print(output[-4000:], file=sys.stderr)
            print(f"first_run: the job failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        summary = json.loads(summary_path.read_text())
    fits, overheads = [], []
    for name in ("teacher", "student", "baseline"):
        part = summary[name]
        fits.append({k: part.get(k) for k in ("wall_seconds", "worker_start_seconds",
                                              "compute_seconds", "epochs", "steps",
                                              "best_epoch", "transfer_size",
                                              "accuracy", "epoch_overhead_seconds")}
                    | {"name": name})
        if part.get("epoch_overhead_seconds") is not None:
            overheads.append(part["epoch_overhead_seconds"])
    record = {
        "job_seconds": round(job_seconds, 2),
        "ray_start_seconds": summary.get("ray_start_seconds"),
        "fits": fits,
        "epoch_overhead_seconds": round(statistics.median(overheads), 4) if overheads else None,
        "console_lines": len(output.splitlines()),
        "accuracy": {k: summary[k]["accuracy"] for k in ("teacher", "student", "baseline")},
        "goals": GOALS,
        "command": " ".join(["raykd", *cmd[1:3], *args.overrides]),
        "console": output.splitlines(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in load_after]},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    short = {k: record[k] for k in ("job_seconds", "ray_start_seconds", "epoch_overhead_seconds",
                                    "console_lines", "accuracy")}
    print(json.dumps(short, indent=2))
    for f in fits:
        print(f"  {f['name']:<9} wall {f['wall_seconds']:6.1f} s  start "
              f"{f['worker_start_seconds']:6.1f} s  compute {f['compute_seconds']:5.2f} s  "
              f"{f['epochs']} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
