"""``raykd online --scheme dml|one|byot``: one fit of the scheme's cohort, a child run per member.

config → the scheme's loss terms → one Ray Train fit of the cohort (its curves on the parent
run) → per member: a child run with its validation curve, test accuracy and, where it stands
alone, its checkpoint → optional baselines (each member's model trained alone, same budget) →
summary.
"""

from __future__ import annotations

import importlib
import re
import threading
import time
from typing import Any

import torch

from raykd import tracking
from raykd.config import ConfigError, RaykdConfig
from raykd.data import dataset_info
from raykd.losses import DistillLoss
from raykd.models import build_model
from raykd.models.cohort import build_cohort
from raykd.models.hooks import probe_shapes
from raykd.preflight import check_destinations, preflight
from raykd.schemes.lineage import finished_by_name, lineage_run
from raykd.schemes.offline import (_json_safe, count_checkpoint_params, log_config,
                                   predict_checkpoints, run_student)
from raykd.schemes.online.codistill import Exchange
from raykd.train.fit import RAY_START, ensure_ray, fit, fit_session

SCHEMES = ("dml", "one", "byot", "codistill")


def scheme_module(cfg: RaykdConfig):
    return importlib.import_module(f"raykd.schemes.online.{cfg.online.scheme}")


def student_stages(cfg: RaykdConfig) -> list[str]:
    """The student's stages in order, as module paths: an MLP's input (``flatten``) and hidden
    layers (``layers.i``), a CNN's ``features.i``, a ResNet's ``layer1``, ``layer2``... — where
    ONE splits and BYOT hooks exits by default (with_stage_defaults)."""
    children = dict(build_model(cfg.student, dataset_info(cfg.data), field="student")
                    .named_children())
    if isinstance(children.get("layers"), torch.nn.ModuleList):  # raykd's MLP
        return ["flatten", *(f"layers.{i}" for i in range(len(children["layers"])))]
    if isinstance(children.get("features"), torch.nn.Sequential):  # raykd's CNN
        return [f"features.{i}" for i in range(len(children["features"]))]
    return [n for n in children if re.fullmatch(r"layer\d+", n)]


def with_stage_defaults(cfg: RaykdConfig) -> RaykdConfig:
    """ONE's ``online.split_at`` and BYOT's ``online.exits`` when unset, from the student's
    stages: ONE branches the last stage (its trunk ends at the one before, as Lan et al. branch
    the last block); BYOT hooks an exit after every block but the deepest (Zhang et al.), or on
    the input where there is no other block (an MLP of one hidden layer: exit on ``flatten``)."""
    o = cfg.online
    if not ((o.scheme == "one" and not o.split_at) or (o.scheme == "byot" and not o.exits)):
        return cfg
    stages = student_stages(cfg)
    field = "split_at" if o.scheme == "one" else "exits"
    if len(stages) < 2:
        raise ConfigError(f"online.{field}: raykd finds no two stages in the student "
                          f"{cfg.student.name!r}; give module paths, e.g. --set online.{field}="
                          + ("layer2" if field == "split_at" else "[layer1,layer2]"))
    inner = [s for s in stages[:-1] if s != "flatten"]  # an exit on the input: the last resort
    default = stages[-2] if field == "split_at" else (inner or stages[:1])
    return cfg.with_overrides({f"online.{field}": default})


def training_config(cfg: RaykdConfig) -> RaykdConfig:
    """``cfg`` with the scheme's loss terms and no teacher (the members teach each other), its
    stage defaults filled in (with_stage_defaults)."""
    cfg = with_stage_defaults(cfg)
    return cfg.with_overrides({"distill.losses": scheme_module(cfg).loss_terms(cfg)})


def preflight_online(cfg: RaykdConfig) -> RaykdConfig:
    """Build the cohort and its loss on a probe batch (module paths, shapes) before Ray."""
    import torch

    check_destinations(cfg)  # storage and tracking server, as preflight() does
    if cfg.online.scheme not in SCHEMES:
        raise ConfigError(f"online.scheme: {cfg.online.scheme!r} is not built yet; "
                          f"allowed: {', '.join(SCHEMES)}")
    info = dataset_info(cfg.data)
    train_cfg = training_config(cfg)
    if cfg.online.scheme == "codistill":
        preflight(train_cfg, roles=("teacher",))  # the groups train plain students
        return train_cfg
    cohort = build_cohort(train_cfg, info)
    paths = train_cfg.distill.layer_paths("student")
    shapes = probe_shapes(cohort, paths, torch.zeros(2, *info.input_shape), "online") \
        if paths else {}
    DistillLoss(train_cfg.distill, shapes, {})
    return train_cfg


def _member_run(uri: str, cfg: RaykdConfig, parent: str, name: str, result) -> dict[str, Any]:
    """A member's child run: its validation curve, test accuracy, checkpoint when it has one."""
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


def baselines(cfg: RaykdConfig, uri: str, parent: str, done=None) -> list[dict[str, Any]]:
    """Each member's model trained alone (hard labels), the same budget and initial weights;
    ``done``: the fits an earlier run of this lineage finished, by run name (kept)."""
    out = []
    for name, spec, seed in scheme_module(cfg).alone(cfg):
        if f"{name}-alone" in (done or {}):
            kept = done[f"{name}-alone"]
            out.append({"name": name, "accuracy": kept.accuracy, "params": kept.params,
                        "run_id": kept.run_id, "resumed": True})
            continue
        alone_cfg = cfg.with_overrides({"online": None, "student.name": spec.name,
                                        "student.args": spec.args, "train.seed": seed})
        part = run_student(alone_cfg, "baseline", uri, parent, name=f"{name}-alone")
        out.append({"name": name, "accuracy": part["accuracy"], "params": part["params"],
                    "run_id": part["run_id"]})
    return out


def run_codistill(cfg: RaykdConfig, uri: str, parent: str) -> tuple[list, dict, list]:
    """G groups, each its own Ray Train run, at the same time (one driver thread each), joined
    by the exchange actor. Returns (members, ensemble, the groups' fit results)."""
    import ray

    o = cfg.online
    exchange = ray.remote(num_cpus=0, max_concurrency=4 * o.peers)(Exchange).remote(o.peers)
    groups = [training_config(cfg).with_overrides({"train.seed": cfg.train.seed + g})
              for g in range(o.peers)]
    runs = [tracking.start_run(uri, cfg.tracking.experiment, f"group{g}", parent,
                               {"raykd.role": "member", "raykd.member": f"group{g}"})
            for g in range(o.peers)]
    results: list = [None] * o.peers
    errors: list = []

    def train(g: int) -> None:
        spec = {"group": g, "exchange": exchange, "every": o.staleness_steps,
                "burn_in": o.burn_in_steps}
        try:
            results[g] = fit(groups[g], "student", tracking_uri=uri, run_id=runs[g],
                             name=f"group{g}", extra={"codistill": spec})
        except BaseException as err:  # noqa: BLE001 - re-raised in the driver below
            errors.append(err)

    threads = [threading.Thread(target=train, args=(g,), name=f"codistill-{g}")
               for g in range(o.peers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, run_id in enumerate(runs):
        tracking.end_run(uri, run_id, "FAILED" if results[g] is None else "FINISHED")
    if errors:
        raise errors[0]
    stats = ray.get(exchange.stats.remote(o.staleness_steps))
    ray.kill(exchange)
    members = []
    for g, result in enumerate(results):
        weights = result.checkpoint / "model.safetensors"
        tracking.log_artifact(uri, runs[g], weights, "checkpoint")
        tracking.log_metrics(uri, runs[g], {"test_accuracy": result.test_accuracy,
                                            "params": result.params})
        members.append({"name": f"group{g}", "accuracy": result.test_accuracy,
                        "params": result.params, "run_id": runs[g], "checkpoint": str(weights),
                        "wall_seconds": round(result.wall_seconds, 2),
                        "ran": [result.history[0]["_ended_at"]
                                - result.history[0]["epoch_seconds"],
                                result.history[-1]["_ended_at"]]})
    logits, labels = predict_checkpoints([m["checkpoint"] for m in members], cfg, uri)
    probs = torch.softmax(logits, -1).mean(0)
    ensemble = {"accuracy": float((probs.argmax(-1) == labels).float().mean())}
    exchange_part = {k: stats[k] for k in ("published", "loaded", "max_staleness_steps")}
    tracking.log_dict(uri, parent, stats["log"], "exchange.json")
    return members, {**ensemble, "exchange": exchange_part}, results


def _fit_cohort(train_cfg: RaykdConfig, uri: str, parent: str) -> dict[str, Any]:
    """The cohort's one fit, a child run per member, then the parent's metrics: the last step,
    so a parent with ``deployable_test_accuracy`` holds a finished cohort (_resumed_cohort)."""
    scheme = train_cfg.online.scheme
    result = fit(train_cfg, "student", tracking_uri=uri, run_id=parent, name=scheme)
    members = [_member_run(uri, train_cfg, parent, name, result)
               for name in result.members if name != "ensemble"]
    part = {"members": members, "ensemble": {"accuracy": result.members.get("ensemble")},
            "deployable": {"accuracy": result.test_accuracy},
            "fit": {"wall_seconds": round(result.wall_seconds, 2),
                    "worker_start_seconds": round(result.worker_start_seconds, 2),
                    "best_epoch": result.best_epoch, "epochs": len(result.history)}}
    tracking.log_metrics(uri, parent, {
        "ensemble_test_accuracy": part["ensemble"]["accuracy"] or 0.0,
        **{f"{m['name']}_test_accuracy": m["accuracy"] for m in members},
        "deployable_test_accuracy": result.test_accuracy})
    return part


def _resumed_cohort(uri: str, cfg: RaykdConfig, parent: str) -> dict[str, Any] | None:
    """The cohort an earlier run of this lineage finished, read back from MLflow; None when its
    fit did not finish (it is trained again)."""
    metrics = tracking.client(uri).get_run(parent).data.metrics
    if "deployable_test_accuracy" not in metrics:
        return None
    runs = tracking.search_runs(uri, cfg.tracking.experiment,
                                f"tags.`mlflow.parentRunId` = '{parent}' and "
                                f"tags.`raykd.role` = 'member' and attributes.status = 'FINISHED'",
                                order_by=["attributes.start_time ASC"])
    members = [{"name": r.data.tags["raykd.member"], "accuracy": r.data.metrics["test_accuracy"],
                "params": int(r.data.metrics["params"]) if "params" in r.data.metrics else None,
                "run_id": r.info.run_id, "resumed": True} for r in runs]
    return {"members": members, "ensemble": {"accuracy": metrics.get("ensemble_test_accuracy")},
            "deployable": {"accuracy": metrics["deployable_test_accuracy"]},
            "fit": {"resumed": True}}


def run_online(cfg: RaykdConfig, *, baseline: bool = False, config_path: str | None = None,
               resume: bool = False) -> dict[str, Any]:
    """``resume``: the newest run of this config continues (raykd.schemes.lineage); a cohort
    and baselines it finished are read back, not trained again."""
    scheme = cfg.online.scheme
    if scheme == "codistill":
        if resume:
            raise ConfigError("--resume: codistillation's groups train together, exchanging "
                              "weights; run it again without --resume")
        return _run_codistill_job(cfg, baseline, config_path)
    train_cfg = training_config(cfg)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    ensure_ray()
    started = time.perf_counter()
    with fit_session(train_cfg, scheme, start=True), lineage_run(
            uri, cfg, f"online-{scheme}", resume, f"online-{scheme}",
            finished_by_name) as lineage:
        parent, done = lineage.parent, lineage.finished
        cohort = _resumed_cohort(uri, cfg, parent) if resume else None
        if cohort is None:
            if not done:  # a resumed parent has its config already
                log_config(uri, parent, train_cfg, config_path)
            cohort = _fit_cohort(train_cfg, uri, parent)
        summary: dict[str, Any] = {"scheme": scheme, **cohort}
        if baseline:
            summary["baseline"] = baselines(cfg, uri, parent, done)
        summary["resumed"] = (["cohort"] if cohort["fit"].get("resumed") else []) + sorted(
            b["name"] + "-alone" for b in summary.get("baseline", []) if b.get("resumed"))
        summary.update(
            mlflow={"tracking_uri": uri, "run_id": parent,
                    "experiment": cfg.tracking.experiment},
            seconds=round(time.perf_counter() - started, 1),
            ray_start_seconds=RAY_START.get("seconds"))
        tracking.log_dict(uri, parent, _json_safe(summary), "summary.json")
    return summary


def _run_codistill_job(cfg: RaykdConfig, baseline: bool, config_path: str | None
                       ) -> dict[str, Any]:
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    ensure_ray()
    started = time.perf_counter()
    with tracking.tracked_run(uri, cfg.tracking.experiment, "online-codistill", None,
                              {"raykd.scheme": "online-codistill"}) as parent:
        log_config(uri, parent, training_config(cfg), config_path)
        members, ensemble, _ = run_codistill(cfg, uri, parent)
        exchange = ensemble.pop("exchange")
        summary: dict[str, Any] = {"scheme": "codistill", "members": members,
                                   "ensemble": ensemble, "exchange": exchange}
        if baseline:
            summary["baseline"] = baselines(cfg, uri, parent)
        tracking.log_metrics(uri, parent, {"ensemble_test_accuracy": ensemble["accuracy"],
                                           **{f"exchange_{k}": v for k, v in exchange.items()}})
        summary.update(mlflow={"tracking_uri": uri, "run_id": parent,
                               "experiment": cfg.tracking.experiment},
                       seconds=round(time.perf_counter() - started, 1),
                       ray_start_seconds=RAY_START.get("seconds"))
        tracking.log_dict(uri, parent, _json_safe(summary), "summary.json")
    return summary


def run_online_command(cfg: RaykdConfig, args) -> dict[str, Any]:
    """``raykd online``: ``cfg`` as the CLI loaded it (raykd.cli.load_args)."""
    preflight_online(cfg)
    summary = run_online(cfg, baseline=args.baseline, config_path=args.config,
                         resume=args.resume)
    rows = [("ensemble", summary["ensemble"]["accuracy"])] + [
        (m["name"], m["accuracy"]) for m in summary["members"]] + [
        (f"{b['name']} alone", b["accuracy"]) for b in summary.get("baseline", [])]
    print(f"\n  {scheme_module(cfg).__name__.rsplit('.', 1)[-1]} member      test acc")
    for name, acc in rows:
        print(f"  {name:<18} {acc * 100:6.2f}%")
    return summary
