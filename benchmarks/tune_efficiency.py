"""Grid vs. ASHA over the same temperature × alpha space on digits (not a test).

Both searches use `raykd tune` (Ray Tune over Train V2 trials) on the same 32-unit student,
the same teacher (trained once, by the grid search, and handed to the ASHA search as a
checkpoint) and the same points: the grid runs every point to the full epoch budget, ASHA
(sequential trials, rungs at grace·rf^k epochs) stops the weak ones early. Reported: each
search's best validation accuracy (the metric both optimise), the test accuracy of the config
each picked, the trial-epochs each spent, and whether ASHA lands within 0.5 points of the grid's
best for at most 35% of its epochs.

    python benchmarks/tune_efficiency.py --json benchmarks/results/tune_efficiency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

GOAL_POINTS, GOAL_EPOCHS = 0.5, 0.35


def search(base: dict, name: str, overrides: dict, work: Path) -> dict:
    from raykd.config import validate
    from raykd.schemes.tune import check_tune_config, run_tune

    raw = json.loads(json.dumps(base))
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        raw.setdefault(section, {})[field] = value
    raw["tune"]["name"] = name
    cfg = validate(raw)
    start = time.perf_counter()
    summary = run_tune(cfg, check_tune_config(cfg), best_config=str(work / f"{name}.yaml"))
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, metavar="PATH")
    p.add_argument("--epochs", type=int, default=27)
    p.add_argument("--temperatures", default="1,4,8")
    p.add_argument("--alphas", default="0.1,0.5,0.9")
    p.add_argument("--grace", type=int, default=1)
    p.add_argument("--reduction-factor", type=float, default=3.0)
    p.add_argument("--workdir", default=".raykd/bench/tune_efficiency")
    args = p.parse_args()

    out = Path(args.json).resolve()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # caches, Ray Train/Tune storage and mlflow.db stay in the bench folder
    temps = [float(t) for t in args.temperatures.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    base = {
        "data": {"name": "digits"},
        "teacher": {"name": "mlp", "args": {"hidden_sizes": [512, 512], "dropout": 0.2},
                    "epochs": 30},
        "student": {"name": "mlp", "args": {"hidden_sizes": [32]}},
        "train": {"epochs": args.epochs, "lr": 0.001, "batch_size": 64, "num_workers": 2,
                  "seed": 0},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "tune-efficiency"},
        "tune": {"space": {"distill.temperature": {"grid": temps},
                           "distill.alpha": {"grid": alphas}},
                 "search": "grid", "max_concurrent_trials": 1, "metric": "val_accuracy",
                 "mode": "max"},
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    grid = search(base, f"grid-{stamp}", {"tune.scheduler": "fifo"}, work)
    asha = search(base, f"asha-{stamp}", {
        "tune.scheduler": "asha", "tune.grace_period": args.grace,
        "tune.reduction_factor": args.reduction_factor,
        "teacher.checkpoint": grid["teacher"]["checkpoint"]}, work)

    def part(s: dict) -> dict:
        return {"best_val_accuracy": s["best"]["metric"], "best_config": s["best"]["config"],
                "best_test_accuracy": s["best"]["accuracy"], "trials": s["trials"],
                "trial_epochs": s["trial_epochs"], "wall_seconds": s["wall_seconds"],
                "teacher_forward_samples_during_search":
                    s["teacher"]["forward_samples_during_search"],
                "per_trial": [{"config": r["config"], "val_accuracy": r["metric"],
                               "epochs": r["epochs"]} for r in s["trial_results"]],
                "mlflow_parent_run": s["mlflow"]["run_id"]}

    g, a = part(grid), part(asha)
    # How the config ASHA picked did when the grid trained it to the full budget.
    picked = next(r for r in g["per_trial"] if r["config"] == a["best_config"])
    gap = (g["best_val_accuracy"] - a["best_val_accuracy"]) * 100
    ratio = a["trial_epochs"] / g["trial_epochs"]
    result = {
        "benchmark": "tune_efficiency", "dataset": "digits",
        "space": {"distill.temperature": temps, "distill.alpha": alphas},
        "epochs_per_trial": args.epochs, "asha": {"grace_period": args.grace,
                                                  "reduction_factor": args.reduction_factor},
        "grid": g, "asha_search": a,
        "asha_pick_in_grid_val_accuracy": picked["val_accuracy"],
        "gap_points_val": round(gap, 3),
        "gap_points_test": round((g["best_test_accuracy"] - a["best_test_accuracy"]) * 100, 3),
        "epoch_ratio": round(ratio, 4),
        "goal": {"within_points": GOAL_POINTS, "max_epoch_ratio": GOAL_EPOCHS,
                 "met": gap <= GOAL_POINTS and ratio <= GOAL_EPOCHS},
        "machine": {"node": platform.node(), "cpus": os.cpu_count()},
        "teacher": {k: grid["teacher"].get(k) for k in ("accuracy", "params", "checkpoint")},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: result[k] for k in ("gap_points_val", "gap_points_test", "epoch_ratio",
                                             "goal")}, indent=2))


if __name__ == "__main__":
    main()
