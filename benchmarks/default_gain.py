"""Does the default job show what distillation buys? Seeds 0..N-1, paired (not a test).

For each seed s the embedded default config (README command 1's job) runs with
``train.seed=s``: the teacher, the distilled student and the same-budget baseline all take that
seed, so student and baseline are paired (same initialisation, same data order). The
train/val/test split is fixed (``data.split_seed``), and so is the labelled part
(``data.labelled``): the teacher and the baseline learn it alone, the student it and the teacher's
soft labels on the rest of train; the baseline gets at least the student's optimizer steps
(``raykd.schemes.offline.step_budget``). Everything runs in one Ray session and one
worker group (``fit_session``), so the N jobs cost N× their fits, not N× the start-up.

    python benchmarks/default_gain.py --seeds 5 --json benchmarks/results/default_gain.json

Written: ``student_accuracy``, ``baseline_accuracy``, ``teacher_accuracy`` (test, per seed),
``paired_gain_mean`` and ``paired_gain_sd`` (student − baseline, in points), ``wins`` (seeds
where the student is ahead), the validation accuracies of the kept epochs and the gain on them,
the optimizer steps and training-set sizes of student and baseline, the settings, the machine's
load and the wall time. Goal (issues #15, #28): wins >= 4 of 5, paired_gain_mean >= 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, metavar="PATH")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    out = Path(args.json).resolve()

    from raykd.config import load_config
    from raykd.schemes.offline import run_distill
    from raykd.train.fit import ensure_ray, fit_session

    started, load_before = time.perf_counter(), os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="raykd-default-gain-") as tmp:
        os.chdir(tmp)
        ensure_ray()
        base = load_config(None, args.overrides)
        with fit_session(base, "default-gain"):
            for seed in range(args.seeds):
                cfg = load_config(None, [*args.overrides, f"train.seed={seed}"])
                s = run_distill(cfg, baseline=True, run_name=f"default-seed{seed}")
                rows.append({"seed": seed, **{f"{k}_{m}": s[k].get(m) for k in
                                              ("teacher", "student", "baseline")
                                              for m in ("accuracy", "val_accuracy", "steps",
                                                        "transfer_size")}})
                print(f"seed {seed}: teacher {s['teacher']['accuracy']:.4f} student "
                      f"{s['student']['accuracy']:.4f} baseline {s['baseline']['accuracy']:.4f}",
                      flush=True)
    gains = [100 * (r["student_accuracy"] - r["baseline_accuracy"]) for r in rows]
    val_gains = [100 * (r["student_val_accuracy"] - r["baseline_val_accuracy"]) for r in rows]
    record = {
        "student_accuracy": [r["student_accuracy"] for r in rows],
        "baseline_accuracy": [r["baseline_accuracy"] for r in rows],
        "teacher_accuracy": [r["teacher_accuracy"] for r in rows],
        "student_val_accuracy": [r["student_val_accuracy"] for r in rows],
        "baseline_val_accuracy": [r["baseline_val_accuracy"] for r in rows],
        "val_gain_mean": round(statistics.fmean(val_gains), 3),
        "val_wins": sum(g > 0 for g in val_gains),
        "student_steps": [r["student_steps"] for r in rows],
        "baseline_steps": [r["baseline_steps"] for r in rows],
        "transfer_size": {k: rows[0][f"{k}_transfer_size"] for k in
                          ("teacher", "student", "baseline")} if rows else {},
        "paired_gain_points": [round(g, 3) for g in gains],
        "paired_gain_mean": round(statistics.fmean(gains), 3),
        "paired_gain_sd": round(statistics.stdev(gains), 3) if len(gains) > 1 else 0.0,
        "wins": sum(g > 0 for g in gains),
        "seeds": list(range(args.seeds)),
        "goal": {"wins": ">= 4 of 5", "paired_gain_mean": ">= 1.0 point"},
        "overrides": args.overrides,
        "config": base.applicable(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps({k: record[k] for k in ("paired_gain_points", "paired_gain_mean",
                                             "paired_gain_sd", "wins", "wall_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
