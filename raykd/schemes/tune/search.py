"""`raykd tune`: a Ray Tune search over distillation values, one teacher and one cache for all.

config (+ ``tune`` section) → checks (space, preflight) → Ray → MLflow parent run → the teacher,
obtained ONCE (trained or loaded) → its actor + soft-label cache, served ONCE → a Tuner over a
function trainable that gets the teacher handoff through ``tune.with_parameters`` → each trial is
a Ray Train (V2) run of the student with the trial's values applied by ``cfg.with_overrides``,
logged to its own MLflow child run → best trial: params/metrics on the parent, plots, a config
``raykd distill --config`` accepts as is.

Here: checks, sizing, the search's folder and state, the driver. The Tuner (searcher, scheduler)
is built in tuner.py; a trial (its Train run, its reports to Tune through Ray's
``TuneReportCallback``, its MLflow child run) is trial.py; what happens after the search
(trial rows, best trial, best config, summary) is finish.py.

Resume: the Tune experiment lives under ``tune.storage_path`` (default ``.raykd/tune``) as
``<tune.name or tune-<config digest>>-<timestamp>``; ``raykd_search.json`` beside it keeps the
MLflow parent run and the teacher, so ``--resume`` (``Tuner.restore``) nests the remaining trials
under the same parent and reuses the teacher and its cache. Trials whose MLflow run had already
finished replay their recorded curve to Tune instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from math import floor
from pathlib import Path
from typing import Any

from raykd import tracking
from raykd.config import ConfigError, RaykdConfig, load_config
from raykd.preflight import preflight
from raykd.schemes.offline import log_config, obtain_teacher
from raykd.schemes.tune.finish import finish_search
from raykd.schemes.tune.space import Dim, corner, parse_space
from raykd.schemes.tune.trial import tune_trial
from raykd.schemes.tune.tuner import build_tuner
from raykd.teacher.service import serve_teacher, stop_teacher, teacher_stats
from raykd.train.fit import ensure_ray
from raykd.train.storage import is_uri, resolve

STATE_FILE = "raykd_search.json"
DEFAULT_STORAGE = Path(".raykd") / "tune"
# val_perplexity and teacher_agreement: language models (raykd.train.lm_eval)
KNOWN_METRICS = ("val_accuracy", "train_loss", "val_loss", "val_perplexity", "teacher_agreement")


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


def size_trials(cfg: RaykdConfig, cluster: dict[str, float]
                ) -> tuple[RaykdConfig, dict[str, dict[str, Any]]]:
    """Lower ``train.cpus_per_worker`` so ``max_concurrent_trials`` trials — each a trial driver
    of ``tune.trial_cpus`` plus ``train.num_workers`` workers — fit the cluster's CPUs. Returns
    the trials' config and what was changed (for the summary's ``adjusted``), said in one line
    on stderr when it is not nothing."""
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
    if per_worker == t.cpus_per_worker:
        return cfg, {}
    why = (f"{tc.max_concurrent_trials} concurrent trials × ({t.num_workers} workers + "
           f"{tc.trial_cpus:g} CPU for the trial driver) fit the cluster's {cpus:g} CPUs")
    print(f"raykd: train.cpus_per_worker lowered from {t.cpus_per_worker:g} to {per_worker:g} "
          f"so {why}", file=sys.stderr)
    adjusted = {"train.cpus_per_worker": {"from": t.cpus_per_worker, "to": per_worker,
                                          "why": why}}
    return cfg.with_overrides({"train.cpus_per_worker": per_worker}), adjusted


def _storage(cfg: RaykdConfig) -> Path:
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

def run_tune_command(args) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    dims = check_tune_config(cfg)
    preflight(cfg)
    preflight(cfg.with_overrides(corner(dims)))
    return run_tune(cfg, dims, resume=bool(args.resume), best_config=args.best_config,
                    config_path=args.config)


def _search_folder(cfg: RaykdConfig, uri: str, resume: bool) -> tuple[Path, dict[str, Any]]:
    """The search's folder and saved state: the newest one of this config with ``resume``,
    else a new, timestamped one."""
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
    return folder, state


def run_tune(cfg: RaykdConfig, dims: list[Dim] | None = None, *, resume: bool = False,
             best_config: str | None = None, config_path: str | None = None) -> dict[str, Any]:
    import ray
    from ray import tune

    dims = dims if dims is not None else check_tune_config(cfg)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    started = time.perf_counter()
    folder, state = _search_folder(cfg, uri, resume)

    ensure_ray()
    run_cfg, adjusted = size_trials(cfg, ray.cluster_resources())
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
            results = build_tuner(run_cfg, dims, folder, trainable, restore).fit()
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
        summary = finish_search(cfg, run_cfg, dims, results, teacher, sources, uri, parent,
                                folder, best_config, resumed=resume)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracking.end_run(uri, parent, status)
        raise
    summary["adjusted"] = adjusted  # settings raykd changed to run the search here
    summary["seconds"] = round(time.perf_counter() - started, 1)
    tracking.log_dict(uri, parent, json.loads(json.dumps(summary, default=str)), "summary.json")
    tracking.end_run(uri, parent)
    state["finished"] = True
    _write_state(folder, state)
    return summary
