"""``raykd online --scheme dml|one|byot``: one fit of the scheme's cohort, a child run per member.

config → the scheme's loss terms → one Ray Train fit of the cohort (its curves on the parent
run) → per member: a child run with its validation curve, test accuracy and, where it stands
alone, its checkpoint → optional baselines (each member's model trained alone, same budget) →
summary.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

from raykd import tracking
from raykd.config import ConfigError, RaykdConfig

SCHEMES = ("dml", "one", "byot")


def scheme_module(cfg: RaykdConfig):
    return importlib.import_module(f"raykd.schemes.online.{cfg.online.scheme}")


def training_config(cfg: RaykdConfig) -> RaykdConfig:
    """``cfg`` with the scheme's loss terms and no teacher (the members teach each other)."""
    return cfg.with_overrides({"distill.losses": scheme_module(cfg).loss_terms(cfg)})


def preflight_online(cfg: RaykdConfig) -> RaykdConfig:
    """Build the cohort and its loss on a probe batch (module paths, shapes) before Ray."""
    import torch

    from raykd.data import dataset_info
    from raykd.losses import DistillLoss
    from raykd.models.cohort import build_cohort
    from raykd.models.hooks import probe_shapes

    if cfg.online.scheme not in SCHEMES:
        raise ConfigError(f"online.scheme: {cfg.online.scheme!r} is not built yet; "
                          f"allowed: {', '.join(SCHEMES)}")
    info = dataset_info(cfg.data)
    if cfg.online.scheme == "byot" and not cfg.online.exits:
        raise ConfigError("online.exits: BYOT needs module paths of the student to attach exits "
                          "to, e.g. [layers.0] or [layer1, layer2]")
    train_cfg = training_config(cfg)
    cohort = build_cohort(train_cfg, info)
    paths = train_cfg.distill.layer_paths("student")
    shapes = probe_shapes(cohort, paths, torch.zeros(2, *info.input_shape), "online") \
        if paths else {}
    DistillLoss(train_cfg.distill, shapes, {})
    return train_cfg


def _member_run(uri: str, cfg: RaykdConfig, parent: str, name: str, result) -> dict[str, Any]:
    """A member's child run: its validation curve, test accuracy, checkpoint when it has one."""
    from raykd.schemes.offline import count_checkpoint_params

    tags = {"raykd.role": "member", "raykd.member": name}
    with tracking.tracked_run(uri, cfg.tracking.experiment, name, parent, tags) as run_id:
        curve = [{"epoch": h["epoch"], "val_accuracy": h[f"{name}_val_accuracy"],
                  "val_loss": h[f"{name}_val_loss"]} for h in result.history
                 if f"{name}_val_accuracy" in h]
        tracking.log_epochs(uri, run_id, curve)
        part: dict[str, Any] = {"name": name, "accuracy": result.members[name], "params": None,
                                "run_id": run_id}
        if name in result.exports:
            weights = result.exports[name]
            tracking.log_artifact(uri, run_id, weights, "checkpoint")
            part["params"] = count_checkpoint_params(str(weights), uri)
            part["checkpoint"] = str(weights)
        tracking.log_metrics(uri, run_id, {"test_accuracy": part["accuracy"],
                                           **({"params": part["params"]}
                                              if part["params"] else {})})
    return part


def run_online(cfg: RaykdConfig, *, baseline: bool = False,
               config_path: str | None = None) -> dict[str, Any]:
    from raykd.schemes.offline import _json_safe, log_config, run_student
    from raykd.train.fit import RAY_START, ensure_ray, fit, fit_session

    scheme = cfg.online.scheme
    train_cfg = training_config(cfg)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    ensure_ray()
    started = time.perf_counter()
    with fit_session(train_cfg, scheme, start=True), tracking.tracked_run(
            uri, cfg.tracking.experiment, f"online-{scheme}", None,
            {"raykd.scheme": f"online-{scheme}"}) as parent:
        log_config(uri, parent, train_cfg, config_path)
        result = fit(train_cfg, "student", tracking_uri=uri, run_id=parent, name=scheme)
        members = [_member_run(uri, train_cfg, parent, name, result)
                   for name in result.members if name != "ensemble"]
        summary: dict[str, Any] = {"scheme": scheme, "members": members,
                                   "ensemble": {"accuracy": result.members.get("ensemble")},
                                   "deployable": {"accuracy": result.test_accuracy}}
        if baseline:
            summary["baseline"] = []
            for name, spec, seed in scheme_module(cfg).alone(cfg):
                alone_cfg = cfg.with_overrides({"online": None, "student.name": spec.name,
                                                "student.args": spec.args, "train.seed": seed})
                part = run_student(alone_cfg, "baseline", uri, parent, name=f"{name}-alone")
                summary["baseline"].append({"name": name, "accuracy": part["accuracy"],
                                            "params": part["params"], "run_id": part["run_id"]})
        tracking.log_metrics(uri, parent, {
            "ensemble_test_accuracy": summary["ensemble"]["accuracy"] or 0.0,
            **{f"{m['name']}_test_accuracy": m["accuracy"] for m in members}})
        summary.update(
            fit={"wall_seconds": round(result.wall_seconds, 2),
                 "worker_start_seconds": round(result.worker_start_seconds, 2),
                 "best_epoch": result.best_epoch, "epochs": len(result.history)},
            mlflow={"tracking_uri": uri, "run_id": parent,
                    "experiment": cfg.tracking.experiment},
            seconds=round(time.perf_counter() - started, 1),
            ray_start_seconds=RAY_START.get("seconds"))
        tracking.log_dict(uri, parent, _json_safe(summary), "summary.json")
    return summary


def run_online_command(args) -> dict[str, Any]:
    from raykd.config import load_config

    overrides = list(args.overrides)
    for flag, key in (("scheme", "scheme"), ("peers", "peers")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"online.{key}={value}")
    cfg = load_config(args.config, overrides)
    if cfg.online is None:
        cfg = cfg.with_overrides({"online": {}})
    preflight_online(cfg)
    summary = run_online(cfg, baseline=args.baseline, config_path=args.config)
    rows = [("ensemble", summary["ensemble"]["accuracy"])] + [
        (m["name"], m["accuracy"]) for m in summary["members"]] + [
        (f"{b['name']} alone", b["accuracy"]) for b in summary.get("baseline", [])]
    print(f"\n  {scheme_module(cfg).__name__.rsplit('.', 1)[-1]} member      test acc")
    for name, acc in rows:
        print(f"  {name:<18} {acc * 100:6.2f}%")
    return summary
