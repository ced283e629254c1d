"""Tuned KD student against the hard-label baseline on digits, over several seeds (not a test).

The question issue #5 opens with: on digits, a 32-unit student distilled at T=4, alpha=0.9 did
worse than the same student on hard labels alone. This runs what a user would run:

1. ``raykd tune`` over the search config (default ``configs/digits_tune.yaml``: temperature,
   alpha and learning rate, ASHA) — one teacher, one soft-label cache for every trial;
2. ``raykd distill --baseline --config best.yaml`` for each seed: the winning config against the
   same student trained on hard labels alone with the same optimiser, learning rate and budget;
3. (``--untuned``, on by default) the search config's own distillation settings (its starting
   temperature, alpha and learning rate) with the same teacher, for the same seeds.

Seeds change the student's initialisation and data order (``train.seed``); the teacher, its cache
and the train/val/test split are shared. Reported: accuracies per seed, mean and spread (max−min).

    python benchmarks/tuned_vs_baseline.py --json benchmarks/results/tuned_vs_baseline.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def stats(values: list[float]) -> dict:
    return {"per_seed": values, "mean": round(statistics.fmean(values), 5),
            "spread": round(max(values) - min(values), 5),
            "stdev": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, metavar="PATH")
    p.add_argument("--config", default=str(REPO / "configs" / "digits_tune.yaml"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="applied to the search config (e.g. tune.num_samples=3)")
    p.add_argument("--no-untuned", dest="untuned", action="store_false",
                   help="skip the search config's own (untuned) KD settings")
    p.add_argument("--workdir", default=".raykd/bench/tuned_vs_baseline")
    args = p.parse_args()

    from raykd.config import load_config
    from raykd.schemes.offline import run_distill
    from raykd.schemes.tune import check_tune_config, run_tune

    out = Path(args.json).resolve()
    config = Path(args.config).resolve()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # caches, Ray Train/Tune storage and mlflow.db stay in the bench folder
    stamp = time.strftime("%Y%m%d-%H%M%S")
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = load_config(config, [*args.overrides, f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
                               "tracking.experiment=tuned-vs-baseline", f"tune.name=tvb-{stamp}"])
    started = time.perf_counter()
    search = run_tune(cfg, check_tune_config(cfg), best_config=str(work / "best.yaml"),
                      config_path=str(config))
    search_seconds = round(time.perf_counter() - started, 1)
    print(f"search: best {search['best']['config']} val {search['best']['metric']:.4f} "
          f"({search['trials']} trials, {search_seconds:.0f}s)", flush=True)

    best = load_config(work / "best.yaml")
    untuned_overrides = {"distill.temperature": cfg.distill.temperature,
                         "distill.alpha": cfg.distill.alpha, "train.lr": cfg.train.lr}
    rows: dict[str, list[float]] = {"tuned": [], "baseline": [], "untuned": []}
    runs = []
    for seed in seeds:
        summary = run_distill(best.with_overrides({"train.seed": seed}), baseline=True,
                              run_name=f"tuned-seed{seed}")
        rows["tuned"].append(summary["student"]["accuracy"])
        rows["baseline"].append(summary["baseline"]["accuracy"])
        runs.append(summary["mlflow"]["run_id"])
        if args.untuned:
            plain = run_distill(best.with_overrides({**untuned_overrides, "train.seed": seed}),
                                run_name=f"untuned-seed{seed}")
            rows["untuned"].append(plain["student"]["accuracy"])
            runs.append(plain["mlflow"]["run_id"])
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in rows.items() if v),
              flush=True)

    result = {
        "benchmark": "tuned_vs_baseline", "dataset": cfg.data.name, "config": str(config),
        "overrides": args.overrides, "seeds": seeds,
        "search": {"best_config": search["best"]["config"], "best_val_accuracy":
                   search["best"]["metric"], "trials": search["trials"],
                   "trial_epochs": search.get("trial_epochs"), "seconds": search_seconds,
                   "space": dict(cfg.tune.space),
                   "search": cfg.tune.search, "scheduler": cfg.tune.scheduler,
                   "teacher_forward_samples_during_search":
                       search["teacher"].get("forward_samples_during_search"),
                   "mlflow_parent_run": search["mlflow"]["run_id"]},
        "epochs": best.train.epochs, "student": best.student.model_dump(mode="json"),
        "tuned": {"temperature": best.distill.temperature, "alpha": best.distill.alpha,
                  "lr": best.train.lr, "test_accuracy": stats(rows["tuned"])},
        "baseline": {"lr": best.train.lr, "test_accuracy": stats(rows["baseline"])},
        "teacher": {k: search["teacher"].get(k) for k in ("accuracy", "params", "checkpoint")},
        "mlflow_runs": runs, "seconds": round(time.perf_counter() - started, 1),
        "machine": {"node": platform.node(), "cpus": os.cpu_count()},
    }
    if rows["untuned"]:
        result["untuned"] = {**untuned_overrides, "test_accuracy": stats(rows["untuned"])}
    result["tuned_minus_baseline_points"] = round(
        (result["tuned"]["test_accuracy"]["mean"] - result["baseline"]["test_accuracy"]["mean"])
        * 100, 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("tuned", "baseline", "tuned_minus_baseline_points")}
                     | ({"untuned": result["untuned"]} if "untuned" in result else {}), indent=2))
    print(f"benchmark: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
