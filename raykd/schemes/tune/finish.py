"""After a `raykd tune` search: one row per trial, the trials' MLflow runs closed, the best
trial evaluated on the test split and logged, the best config written, the summary.

The best trial's weights come from its last report: a Tune checkpoint under PBT, else the Train
checkpoint whose path Ray's ``TuneReportCallback`` put in the report (``checkpoint_path``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raykd import tracking
from raykd.config import RaykdConfig, dump_yaml, validate
from raykd.schemes.offline import count_checkpoint_params, evaluate_checkpoints
from raykd.schemes.tune.plots import plot_search
from raykd.schemes.tune.space import Dim
from raykd.schemes.tune.trial import _find_child
from raykd.schemes.tune.tuner import TIME_ATTR
from raykd.train.fit import TrainingError

CHECKPOINT_PATH = "checkpoint_path"  # ray.tune.integration.ray_train.CHECKPOINT_PATH_KEY


def _trial_rows(results, dims: list[Dim], uri: str, experiment: str, parent: str,
                metric: str) -> list[dict[str, Any]]:
    """One row per trial: values, final metric, epochs trained (from its MLflow curve), status."""
    c = tracking.client(uri)
    rows = []
    for res in results:
        last = res.metrics or {}  # Tune puts the trial id in every trial's, reported or not
        trial_id = last.get("trial_id")
        config = res.config or _trial_params(res)
        child = _find_child(uri, experiment, parent, trial_id) if trial_id else None
        epochs = 0
        curve: list[float] = []
        if child is not None:
            hist = sorted(c.get_metric_history(child.info.run_id, metric), key=lambda m: m.step)
            epochs = len(hist)
            curve = [m.value for m in hist]
        rows.append({"trial_id": trial_id, "run_id": child.info.run_id if child else None,
                     "config": {d.key: config.get(d.key) for d in dims},
                     "metric": last.get(metric), "epochs": epochs,
                     "scheduled_epochs": int(last.get(TIME_ATTR) or 0), "curve": curve,
                     "error": str(res.error).splitlines()[0] if res.error else None,
                     "child_status": child.info.status if child else None})
    return rows


def _trial_params(result) -> dict[str, Any]:
    """The values of a trial that failed before its actor ran (its Result has no config):
    Tune wrote them to the trial's folder when the trial started."""
    try:
        with result.filesystem.open_input_stream(f"{result.path}/params.json") as f:
            return json.loads(f.read())
    except Exception:  # noqa: BLE001 - not even that: the row shows no values
        return {}


def _close_children(rows: list[dict[str, Any]], uri: str, epochs: int) -> None:
    """Trials a scheduler stopped never reached their last epoch: close their runs here."""
    for row in rows:
        if row["run_id"] and row["child_status"] not in ("FINISHED", "FAILED", "KILLED"):
            if row["error"]:
                tracking.end_run(uri, row["run_id"], "FAILED")
                continue
            tracking.set_tags(uri, row["run_id"], {"raykd.stopped_early":
                                                   str(row["epochs"] < epochs).lower()})
            tracking.end_run(uri, row["run_id"])


def best_checkpoint(result):
    """The checkpoint of a trial's last report: Tune's own (PBT), else Train's, by its path."""
    if result.checkpoint is not None:
        return result.checkpoint
    path = (result.metrics or {}).get(CHECKPOINT_PATH)
    if not path:
        return None
    from ray.train import Checkpoint

    return Checkpoint(path)


def best_config_of(cfg: RaykdConfig, params: dict[str, Any], teacher_checkpoint: str | None,
                   cache_dir: str | None = None) -> RaykdConfig:
    """The user's config with the winning values and no ``tune`` section; when the search
    trained its teacher, that teacher's checkpoint, and the search's (absolute) cache folder, so
    `raykd distill --config` reuses both instead of training and caching another teacher."""
    raw = cfg.with_overrides(params).to_dict()
    raw["tune"] = None
    if teacher_checkpoint and not (cfg.teacher.checkpoint or cfg.teacher.ensemble):
        raw["teacher"]["checkpoint"] = teacher_checkpoint
    if cache_dir and cfg.teacher.cache_dir is None:
        raw["teacher"]["cache_dir"] = cache_dir
    return validate(raw)


def finish_search(cfg: RaykdConfig, run_cfg: RaykdConfig, dims: list[Dim], results,
                  teacher: dict, sources: list[str], uri: str, parent: str, folder: Path,
                  best_config: str | None, resumed: bool) -> dict[str, Any]:
    tc, experiment = cfg.tune, cfg.tracking.experiment
    rows = _trial_rows(results, dims, uri, experiment, parent, tc.metric)
    _close_children(rows, uri, run_cfg.train.epochs)
    ok = [r for r in results if r.error is None and tc.metric in (r.metrics or {})]
    if not ok:
        first = next((r.error for r in results if r.error is not None), "no trial reported")
        raise TrainingError(f"tune: every trial failed: {first}")
    best = results.get_best_result(metric=tc.metric, mode=tc.mode, scope="last",
                                   filter_nan_and_inf=True)
    params = {d.key: best.config[d.key] for d in dims}
    best_row = next(r for r in rows if r["trial_id"] == best.metrics.get("trial_id"))
    best_cfg_full = run_cfg.with_overrides(params)
    if teacher.get("accuracy") is None:
        teacher["accuracy"] = evaluate_checkpoints(sources, run_cfg, uri)
        teacher["params"] = count_checkpoint_params(sources[0], uri)
    part: dict[str, Any] = {"config": params, "metric": best.metrics[tc.metric],
                            "metric_name": tc.metric, "trial_id": best_row["trial_id"],
                            "run_id": best_row["run_id"], "epochs": best_row["epochs"],
                            "accuracy": None, "params": None}
    checkpoint = best_checkpoint(best)
    if checkpoint is not None:
        local = Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="raykd-best-")))
        weights = local / "model.safetensors"
        part["accuracy"] = evaluate_checkpoints([str(weights)], best_cfg_full, uri,
                                                fallback=run_cfg.student)
        part["params"] = count_checkpoint_params(str(weights), uri)
        if best_row["run_id"]:
            tracking.log_artifact(uri, best_row["run_id"], weights, "checkpoint")
            tracking.log_metrics(uri, best_row["run_id"], {"test_accuracy": part["accuracy"],
                                                           "params": part["params"]})
            tracking.set_tags(uri, best_row["run_id"], {"raykd.best_trial": "true"})
    out_cfg = best_config_of(cfg, params, teacher.get("checkpoint") if teacher.get("trained")
                             else None, run_cfg.teacher.cache_dir)
    # Trained epochs (the MLflow curves) can exceed the epochs the scheduler granted (what Tune
    # saw) by an epoch or two per stopped trial: workers run ahead of the scheduler's decision.
    total_epochs = sum(r["epochs"] for r in rows)
    scheduled = sum(r["scheduled_epochs"] for r in rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "best_config.yaml"
        dump_yaml(out_cfg, path)
        tracking.log_artifact(uri, parent, path, "tune")
        if best_config:
            Path(best_config).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, best_config)
        for png in plot_search(rows, dims, cfg, Path(tmp)):
            tracking.log_artifact(uri, parent, png, "plots")
    tracking.log_dict(uri, parent, rows, "tune/trials.json")
    tracking.log_params(uri, parent, {f"best.{k}": v for k, v in params.items()})
    tracking.log_metrics(uri, parent, {
        f"best_{tc.metric}": part["metric"], "trials": len(rows), "trial_epochs": total_epochs,
        "scheduled_epochs": scheduled,
        "teacher_forward_samples_during_search": teacher["forward_samples_during_search"],
        **({"best_test_accuracy": part["accuracy"]} if part["accuracy"] is not None else {}),
        **({"teacher_test_accuracy": teacher["accuracy"]} if teacher.get("accuracy") else {})})
    tracking.set_tags(uri, parent, {"raykd.best_trial_id": part["trial_id"],
                                    "raykd.best_run_id": part["run_id"]})
    return {"teacher": teacher, "best": part, "trials": len(rows), "trial_epochs": total_epochs,
            "scheduled_epochs": scheduled,
            "failed_trials": sum(1 for r in rows if r["error"]),
            "trial_results": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
            "search": {"dir": str(folder), "search": tc.search, "scheduler": tc.scheduler,
                       "metric": tc.metric, "mode": tc.mode, "resumed": resumed,
                       "cpus_per_worker": run_cfg.train.cpus_per_worker},
            "best_config": str(Path(best_config).resolve()) if best_config else None,
            "mlflow": {"tracking_uri": uri, "run_id": parent, "experiment": experiment}}
