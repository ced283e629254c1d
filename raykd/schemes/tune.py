"""`raykd tune`: a Ray Tune search over distillation values, one teacher and one cache for all.

config (+ ``tune`` section) → checks (space, preflight) → Ray → MLflow parent run → the teacher,
obtained ONCE (trained or loaded) → its actor + soft-label cache, served ONCE → a Tuner over a
function trainable that gets the teacher handoff through ``tune.with_parameters`` → each trial is
a Ray Train (V2) run of the student with the trial's values applied by ``cfg.with_overrides``,
logged to its own MLflow child run → best trial: params/metrics on the parent, plots, a config
``raykd distill --config`` accepts as is.

The trial itself (``tune_trial``, its report relay and MLflow child run) is in tune_trial.py.

Resume: the Tune experiment lives under ``tune.storage_path`` (default ``.raykd/tune``) as
``<tune.name or tune-<config digest>>-<timestamp>``; ``raykd_search.json`` beside it keeps the
MLflow parent run and the teacher, so ``--resume`` (``Tuner.restore``) nests the remaining trials
under the same parent and reuses the teacher and its cache. Trials whose MLflow run had already
finished replay their recorded curve to Tune instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from math import floor
from pathlib import Path
from typing import Any

from raykd import tracking
from raykd.config import ConfigError, RaykdConfig, dump_yaml, load_config, validate
from raykd.schemes.tune_space import Dim, corner, param_space, parse_space
from raykd.schemes.tune_trial import _find_child, tune_trial

STATE_FILE = "raykd_search.json"
DEFAULT_STORAGE = Path(".raykd") / "tune"
KNOWN_METRICS = ("val_accuracy", "train_loss")


# -- checks and sizing ------------------------------------------------------------------------

def check_tune_config(cfg: RaykdConfig) -> list[Dim]:
    """Everything about the ``tune`` section that can be checked without Ray."""
    if cfg.tune is None:
        raise ConfigError("tune: the config has no tune section; add one with a search space, "
                          "e.g. tune: {space: {distill.temperature: {grid: [2, 4, 8]}}} "
                          "(see configs/digits_tune.yaml)")
    metric = cfg.tune.metric
    if metric not in KNOWN_METRICS and not metric.startswith("loss_"):
        raise ConfigError(f"tune.metric: {metric!r} is not reported per epoch; allowed: "
                          f"{', '.join(KNOWN_METRICS)} or loss_<term>")
    return parse_space(cfg)


def config_digest(cfg: RaykdConfig) -> str:
    raw = cfg.to_dict()
    raw["tune"] = {k: v for k, v in raw["tune"].items() if k not in ("storage_path", "name")}
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:10]


def size_trials(cfg: RaykdConfig, cluster: dict[str, float]) -> RaykdConfig:
    """Lower ``train.cpus_per_worker`` so ``max_concurrent_trials`` trials — each a trial driver
    of ``tune.trial_cpus`` plus ``train.num_workers`` workers — fit the cluster's CPUs."""
    t, tc = cfg.train, cfg.tune
    cpus = float(cluster.get("CPU", 0))
    room = cpus / tc.max_concurrent_trials - tc.trial_cpus
    per_worker = min(t.cpus_per_worker, floor(room * 10_000 / t.num_workers) / 10_000)
    if per_worker < 0.01:
        raise ConfigError(
            f"tune.max_concurrent_trials: {tc.max_concurrent_trials} concurrent trials of "
            f"{t.num_workers} workers (+{tc.trial_cpus:g} CPU each for the trial driver) do not "
            f"fit in {cpus:g} CPUs; lower tune.max_concurrent_trials or train.num_workers")
    if t.use_gpu and float(cluster.get("GPU", 0)) < tc.max_concurrent_trials * t.num_workers:
        raise ConfigError(
            f"tune.max_concurrent_trials: {tc.max_concurrent_trials} trials × {t.num_workers} GPU "
            f"workers need {tc.max_concurrent_trials * t.num_workers} GPUs, the cluster has "
            f"{cluster.get('GPU', 0):g}; lower tune.max_concurrent_trials or train.num_workers")
    return cfg.with_overrides({"train.cpus_per_worker": per_worker})


def _storage(cfg: RaykdConfig) -> Path:
    from raykd.train.storage import is_uri, resolve

    path = resolve(cfg.tune.storage_path, "tune")  # resolved in the driver (load_config)
    if is_uri(path):  # the search's own state (STATE_FILE) lives in a folder
        raise ConfigError(f"tune.storage_path: {path} is a URI; give a local or shared folder")
    return Path(path)


def _base_name(cfg: RaykdConfig) -> str:
    return cfg.tune.name or f"tune-{config_digest(cfg)}"


def find_search(cfg: RaykdConfig) -> Path | None:
    """The newest search folder for this config (what ``--resume`` continues)."""
    storage, base = _storage(cfg), _base_name(cfg)
    if not storage.is_dir():
        return None
    found = sorted(p for p in storage.iterdir()
                   if p.name.startswith(f"{base}-") and (p / STATE_FILE).is_file())
    return found[-1] if found else None


def _read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    tmp = folder / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(folder / STATE_FILE)


# -- the driver -------------------------------------------------------------------------------

def reap_orphan_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor has died; returns how many.

    When a scheduler stops a trial mid-run (ASHA), Tune ends the trial actor and with it the
    Train controller it owns — but not the controller's worker placement group: Ray frees a
    non-detached group only once its creator actor *and* job are gone, and Train's own cleaner
    asks the State API, which needs the dashboard (raykd starts Ray without one). Left alone,
    the group holds the workers' CPUs and every later trial waits forever. Best effort: reads
    the GCS placement-group table (Ray internals) and does nothing if that fails."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2

        table = state._connect_and_get_accessor().get_placement_group_table()
        job = ray.get_runtime_context().get_job_id()
        removed = 0
        for raw in table:
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            creator = pg.creator_actor_id
            if (pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached
                    or not creator or set(creator) == {0xFF} or not pg.creator_actor_dead
                    or pg.creator_job_id.hex() != job):
                continue
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
        return removed
    except Exception:  # noqa: BLE001 - a cleanup aid, never a reason to fail a search
        return 0


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover
    _TuneCallback = object


class PlacementGroupReaper(_TuneCallback):
    """Tune callback (driver): reap stopped trials' Train placement groups every few seconds."""

    def __init__(self, every_s: float = 3.0):
        self.every_s, self.last, self.reaped = every_s, 0.0, 0

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.reaped += reap_orphan_placement_groups()


def _searcher(cfg: RaykdConfig):
    tc = cfg.tune
    if tc.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.train.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune applies max_concurrent_trials only to its own default generator: pass it here.
    return BasicVariantGenerator(random_state=cfg.train.seed,
                                 max_concurrent=tc.max_concurrent_trials)


def _scheduler(cfg: RaykdConfig, dims: list[Dim]):
    tc, epochs = cfg.tune, cfg.train.epochs
    if tc.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="epochs", max_t=epochs,
                             grace_period=min(tc.grace_period, epochs),
                             reduction_factor=tc.reduction_factor)
    if tc.scheduler == "pbt":
        from ray.tune.schedulers import PopulationBasedTraining

        return PopulationBasedTraining(time_attr="epochs", perturbation_interval=tc.grace_period,
                                       hyperparam_mutations={d.key: d.mutation() for d in dims})
    return None


def _tuner(cfg: RaykdConfig, dims: list[Dim], folder: Path, trainable, restore: bool,
           reaper: PlacementGroupReaper):
    from ray import tune

    tc = cfg.tune
    if restore:  # the run config (the reaper callback included) is restored with the Tuner
        return tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    num_samples = 1 if tc.search == "grid" else tc.num_samples
    return tune.Tuner(
        trainable,
        param_space=param_space(dims, tc.search),
        tune_config=tune.TuneConfig(
            metric=tc.metric, mode=tc.mode, search_alg=_searcher(cfg),
            scheduler=_scheduler(cfg, dims), num_samples=num_samples,
            max_concurrent_trials=tc.max_concurrent_trials if tc.search == "optuna" else None),
        run_config=tune.RunConfig(
            name=folder.name, storage_path=str(folder.parent), verbose=1, callbacks=[reaper],
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=4 if tc.scheduler == "pbt" else 1),
            failure_config=tune.FailureConfig(max_failures=0)))


def run_tune_command(args) -> dict[str, Any]:
    from raykd.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    dims = check_tune_config(cfg)
    preflight(cfg)
    preflight(cfg.with_overrides(corner(dims)))
    return run_tune(cfg, dims, resume=bool(args.resume), best_config=args.best_config,
                    config_path=args.config)


def run_tune(cfg: RaykdConfig, dims: list[Dim] | None = None, *, resume: bool = False,
             best_config: str | None = None, config_path: str | None = None) -> dict[str, Any]:
    import ray
    from ray import tune

    from raykd.schemes.offline import log_config, obtain_teacher
    from raykd.teacher.service import serve_teacher, stop_teacher, teacher_stats
    from raykd.train.fit import ensure_ray

    dims = dims if dims is not None else check_tune_config(cfg)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    started = time.perf_counter()
    if resume:
        folder = find_search(cfg)
        if folder is None:
            raise ConfigError(f"--resume: no search for this config under {_storage(cfg)} "
                              f"(named {_base_name(cfg)}-*); run without --resume to start one")
        state = _read_state(folder)
    else:
        folder = _storage(cfg) / f"{_base_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
        while folder.exists():
            folder = folder.with_name(folder.name + "x")
        state = {"config_digest": config_digest(cfg), "tracking_uri": uri}
    folder.mkdir(parents=True, exist_ok=True)

    ensure_ray()
    run_cfg = size_trials(cfg, ray.cluster_resources())
    if run_cfg.teacher.cache_dir is None:  # the same folder `raykd distill` would use, made
        run_cfg = run_cfg.with_overrides(  # absolute: trial workers run in other directories
            {"teacher.cache_dir": str((Path.cwd() / ".raykd" / "cache").resolve())})
    experiment = cfg.tracking.experiment

    parent = state.get("parent_run_id")
    if parent is None:
        parent = tracking.start_run(uri, experiment, f"tune {folder.name}", None, {
            "raykd.scheme": "tune", "raykd.tune.dir": str(folder),
            "raykd.tune.search": cfg.tune.search, "raykd.tune.scheduler": cfg.tune.scheduler})
        log_config(uri, parent, cfg, config_path)
        state["parent_run_id"] = parent
        _write_state(folder, state)
    else:
        tracking.client(uri).update_run(parent, status="RUNNING")
        tracking.set_tags(uri, parent, {"raykd.tune.resumed": "true"})
    try:
        if "teacher" not in state:  # once per search: trained (or loaded) here, never per trial
            sources, teacher = obtain_teacher(run_cfg, uri, parent)
            state["teacher"] = {k: v for k, v in teacher.items() if k != "history"}
            state["teacher_sources"] = sources
            _write_state(folder, state)
        sources, teacher = state["teacher_sources"], dict(state["teacher"])
        service = serve_teacher(run_cfg, sources, uri)
        try:
            teacher["cache"] = service.cache
            before = teacher_stats(service)["forward_samples"]
            setup = {"config": run_cfg.to_dict(), "keys": [d.key for d in dims],
                     "tracking_uri": uri, "experiment": experiment, "parent": parent,
                     "search_name": folder.name, "scheduler": cfg.tune.scheduler,
                     "train_storage": str(folder / "train")}
            trainable = tune.with_resources(
                tune.with_parameters(tune_trial, setup=setup, handoff=service.handoff),
                {"CPU": cfg.tune.trial_cpus})
            restore = resume and tune.Tuner.can_restore(str(folder))
            state["tuner_started"] = True
            _write_state(folder, state)
            reaper = PlacementGroupReaper()
            results = _tuner(run_cfg, dims, folder, trainable, restore, reaper).fit()
            reaper.reaped += reap_orphan_placement_groups()
            after = teacher_stats(service)
            if results.num_terminated + results.num_errors < len(results):
                # Tune stopped on Ctrl-C and saved its state: unfinished trials remain.
                print(f"raykd: search interrupted; continue it with `raykd tune --resume` "
                      f"(state in {folder})", file=sys.stderr)
                raise KeyboardInterrupt
        finally:  # one actor per job; the cache on disk outlives it
            stop_teacher(service)
        teacher["forward_samples"] = after["forward_samples"]
        teacher["forward_samples_during_search"] = after["forward_samples"] - before
        summary = _finish(cfg, run_cfg, dims, results, teacher, sources, uri, parent, folder,
                          best_config, resumed=resume)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracking.end_run(uri, parent, status)
        raise
    summary["seconds"] = round(time.perf_counter() - started, 1)
    tracking.log_dict(uri, parent, json.loads(json.dumps(summary, default=str)), "summary.json")
    tracking.end_run(uri, parent)
    state["finished"] = True
    _write_state(folder, state)
    return summary


def _trial_rows(results, dims: list[Dim], uri: str, experiment: str, parent: str,
                metric: str) -> list[dict[str, Any]]:
    """One row per trial: values, final metric, epochs trained (from its MLflow curve), status."""
    c = tracking.client(uri)
    rows = []
    # A trial that failed before its first report has no metrics or config in its Result; its
    # Trial (same order) still knows both.
    trials = list(getattr(getattr(results, "_experiment_analysis", None), "trials", None) or [])
    if len(trials) != len(results):
        trials = [None] * len(results)
    for res, trial in zip(results, trials, strict=True):
        last = res.metrics or {}
        trial_id = last.get("trial_id") or getattr(trial, "trial_id", None)
        config = res.config or getattr(trial, "config", None) or {}
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
                     "scheduled_epochs": int(last.get("epochs") or 0), "curve": curve,
                     "error": str(res.error).splitlines()[0] if res.error else None,
                     "child_status": child.info.status if child else None})
    return rows


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


def _finish(cfg: RaykdConfig, run_cfg: RaykdConfig, dims: list[Dim], results, teacher: dict,
            sources: list[str], uri: str, parent: str, folder: Path, best_config: str | None,
            resumed: bool) -> dict[str, Any]:
    from raykd.schemes.offline import count_checkpoint_params, evaluate_checkpoints
    from raykd.schemes.tune_plots import plot_search
    from raykd.train.fit import TrainingError

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
    if best.checkpoint is not None:
        local = Path(best.checkpoint.to_directory(tempfile.mkdtemp(prefix="raykd-best-")))
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
