"""Hinton, Vinyals & Dean (2015, arXiv 1503.02531) §3 on MNIST, through raykd's own pipeline.

One job, one MLflow parent run, three experiments:

- **table** — the 1200-1200 teacher (dropout, ±2-pixel jitter), the 800-800 baseline on hard labels
  and the 800-800 student distilled at T=20: test errors and the share of the teacher–baseline gap
  the distilled student closes.
- **omitted** — the same distillation with one class (default 3) removed from the transfer set;
  then one bias shift δ for that class, chosen on the validation split.
- **two_class** — a transfer set of only two classes (default 7 and 8); one common δ for their
  biases, chosen on the validation split.

Configs: the job's main config (``configs/mnist_hinton_distill.yaml``) describes the distilled
student and carries a ``hinton:`` section naming the teacher's and the baseline's configs (paths
relative to it) and the experiments' parameters. Every ``--set KEY=VALUE`` applies to all three
configs, except ``hinton.*`` keys, which set the job section. The data and tracking sections of
the main config are used for all three (one dataset, one MLflow parent), and the distillation runs
use the teacher section of the teacher config.

One teacher serves every distillation: it is trained (or reused, see :func:`find_reusable_teacher`)
once, one teacher actor builds one soft-label cache, and the transfer-set filtering happens in the
student loop (``distill.exclude_classes`` / ``include_classes``). Each fit's ``transfer_size`` is
reported so the filtering is visible. Bias shifts are applied in the driver to the distilled
student's checkpoint; the shifted weights are logged next to the original.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from raykd import tracking
from raykd.config import RaykdConfig, dump_yaml
from raykd.data import build_dataset, dataset_info
from raykd.schemes.hinton.bias_shift import apply_bias_shift, choose_bias_shift, error_counts
from raykd.schemes.hinton.config import JOB_SECTION, HintonPlan, load_plan, preflight_plan
from raykd.schemes.hinton.report import PAPER, benchmark_record, markdown_table, table_of
from raykd.schemes.hinton.resume import SCHEME, finished_fit, finished_fits, plan_key
from raykd.schemes.lineage import Lineage, lineage_run
from raykd.schemes.offline import count_checkpoint_params, log_config, run_student, train_teacher
from raykd.teacher.actor import teacher_views
from raykd.teacher.loading import local_checkpoint
from raykd.teacher.service import serve_teacher, stop_teacher, teacher_stats
from raykd.train.checkpoint import load_model, save_checkpoint
from raykd.train.fit import ensure_ray, fit_session
from raykd.train.step import RolePlan

# ---------------------------------------------------------------------------------- teacher

def teacher_key(cfg: RaykdConfig) -> str:
    """What the trained teacher's weights depend on: its model and training settings, the
    training settings that shape its optimisation, and the dataset's content identity."""
    d = cfg.to_dict()
    # the epochs and lr the teacher's fit really uses (train.* only where teacher.* are unset),
    # so a student-budget variant (--set train.epochs=100) reuses the teacher
    fit = RolePlan.of(cfg, "teacher")
    teacher = {k: d["teacher"][k] for k in ("name", "args", "jitter")}
    if d["teacher"].get("augment"):  # absent when empty: earlier teachers keep their key
        teacher["augment"] = d["teacher"]["augment"]
    teacher.update(epochs=fit.epochs, lr=fit.lr)
    # train.jitter/train.flip augment the students only (the teacher's is teacher.jitter)
    train = {k: v for k, v in d["train"].items()
             if k not in ("use_gpu", "cpus_per_worker", "gpus_per_worker", "max_failures",
                          "checkpoint_every", "checkpoint_seconds", "jitter", "flip", "augment",
                          "epochs", "lr", "storage_path")}
    if train.get("keep_checkpoint") == "last":  # what every teacher before the option kept
        train.pop("keep_checkpoint")
    if train.get("precision") == "fp32":  # ditto: teachers before train.precision were fp32
        train.pop("precision")
    payload = {"teacher": teacher, "train": train, "data": dataset_info(cfg.data).identity}
    if cfg.data.labelled is not None:  # a teacher of the labelled part only
        payload["labelled"] = cfg.data.labelled
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def find_reusable_teacher(uri: str, experiment: str, key: str) -> dict[str, Any] | None:
    """The newest FINISHED teacher run of this experiment tagged with ``key`` whose weights can
    still be read, as ``{"run_id", "source", "checkpoint"}``; None when there is none."""
    runs = tracking.search_runs(uri, experiment, f"tags.`raykd.hinton.teacher_key` = '{key}' "
                                                 f"and attributes.status = 'FINISHED'",
                                order_by=["attributes.start_time DESC"], max_results=5)
    for run in runs:
        source = f"runs:/{run.info.run_id}/teacher/model.safetensors"
        try:
            local = local_checkpoint(source, uri)
        except Exception:  # artifact gone (store moved, run purged): try the next or retrain
            continue
        if Path(local).is_file():
            return {"run_id": run.info.run_id, "source": source, "checkpoint": str(local)}
    return None


def obtain_hinton_teacher(plan: HintonPlan, lineage: Lineage) -> dict[str, Any]:
    """The teacher config's checkpoint if given, else the one an interrupted run of this job
    trained (--resume), else a reusable earlier run, else train now."""
    cfg, uri, parent = plan.teacher, lineage.uri, lineage.parent
    if cfg.teacher.checkpoint:
        return {"checkpoint": cfg.teacher.checkpoint, "source": "teacher.checkpoint",
                "trained": False}
    key = teacher_key(cfg)
    if "teacher" in lineage.finished:
        return {**lineage.finished["teacher"], "source": "trained", "trained": True, "key": key}
    if plan.job.reuse_teacher:
        found = find_reusable_teacher(uri, plan.distill.tracking.experiment, key)
        if found:
            tracking.set_tags(uri, parent, {"raykd.hinton.teacher_run": found["run_id"]})
            return {"checkpoint": found["checkpoint"], "source": found["source"],
                    "reused_run_id": found["run_id"], "trained": False, "key": key}

    def train(name: str) -> dict[str, Any]:
        trained = train_teacher(cfg, uri, parent, name=name)
        _log_child_config(uri, trained["run_id"], cfg)
        tracking.set_tags(uri, trained["run_id"], {"raykd.hinton.teacher_key": key})
        tracking.set_tags(uri, parent, {"raykd.hinton.teacher_run": trained["run_id"]})
        return trained

    return {**finished_fit(lineage, "teacher", train), "source": "trained", "trained": True,
            "key": key}


# ---------------------------------------------------------------------------------- evaluation

def _load_student(checkpoint: str, cfg: RaykdConfig, uri: str):
    return load_model(local_checkpoint(checkpoint, uri), cfg.student, dataset_info(cfg.data),
                      field="student")


def count_test_errors(checkpoint: str, cfg: RaykdConfig, uri: str, field: str = "student",
                classes: tuple[int, ...] = ()) -> dict[str, Any]:
    fallback = cfg.teacher if field == "teacher" else cfg.student
    model = load_model(local_checkpoint(checkpoint, uri), fallback, dataset_info(cfg.data),
                       field=field)
    return error_counts(model, build_dataset(cfg.data, "test"), classes)


def shift_experiment(cfg: RaykdConfig, student: dict[str, Any], classes: list[int],
                     grid: tuple[float, float, float], uri: str) -> dict[str, Any]:
    """Choose δ for ``classes`` on the validation split; test errors before and after."""
    _log_child_config(uri, student["run_id"], cfg)
    model = _load_student(student["checkpoint"], cfg, uri)
    test = build_dataset(cfg.data, "test")
    choice = choose_bias_shift(model, classes, build_dataset(cfg.data, "val"), "val", grid)
    before = error_counts(model, test, classes)
    apply_bias_shift(model, classes, choice.delta)
    after = error_counts(model, test, classes)
    out = {"classes": list(classes), "transfer_size": student["transfer_size"],
           "run_id": student["run_id"], "checkpoint": student["checkpoint"],
           "test_size": before["total"], "errors_before": before["errors"],
           "errors_after": after["errors"], "error_before": before["errors"] / before["total"],
           "error_after": after["errors"] / after["total"],
           # str keys: the summary goes through JSON, whose object keys are strings
           "class_errors_before": {str(c): v for c, v in before["class_errors"].items()},
           "class_errors_after": {str(c): v for c, v in after["class_errors"].items()},
           "class_sizes": {str(c): v for c, v in before["class_sizes"].items()},
           "shift": choice.to_dict()}
    metrics = {"shift_delta": choice.delta, "shift_val_accuracy_before": choice.accuracy_before,
               "shift_val_accuracy_after": choice.accuracy_after,
               "test_errors_before_shift": before["errors"],
               "test_errors_after_shift": after["errors"]}
    tracking.log_metrics(uri, student["run_id"], metrics)
    tracking.set_tags(uri, student["run_id"], {"raykd.hinton.shift_split": choice.split,
                                               "raykd.hinton.shift_classes": list(classes)})
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"name": cfg.student.name, "args": cfg.student.args}
        weights = save_checkpoint(model, spec, dataset_info(cfg.data), tmp)
        tracking.log_artifact(uri, student["run_id"], weights, "bias_shifted")
        tracking.log_dict(uri, student["run_id"], out, "bias_shift.json")
    return out


# ---------------------------------------------------------------------------------- the job

def run_hinton(plan: HintonPlan, resume: bool = False) -> dict[str, Any]:
    """Run the planned experiments under one MLflow parent run; return the summary. ``resume``:
    continue the newest run of the same plan, keeping the fits it finished."""
    cfg, job = plan.distill, plan.job
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    ensure_ray()
    started = time.perf_counter()
    summary: dict[str, Any] = {"experiments": list(job.experiments), "paper": PAPER}
    # The job's fits share one worker group per scaling (fit_session): one start, not ten.
    with fit_session(cfg, "hinton"), lineage_run(uri, cfg, SCHEME, resume, SCHEME, finished_fits,
                                                 key=plan_key(plan)) as lineage:
        parent = lineage.parent
        if not lineage.finished:  # a resumed parent has its configs already
            _log_job(uri, parent, plan)
        # 1. the teacher, trained (or reused) once
        teacher = summary["teacher"] = _teacher_part(plan, lineage)
        # 2. the baselines (one per seed), then every distillation from one teacher cache
        runs = plan.seed_runs() if "table" in job.experiments else []
        baselines = {seed: _student_part(finished_fit(lineage, _run_name("baseline", seed, runs),
                                                      _fitter(base, "baseline", uri, parent)),
                                         base, uri)
                     for seed, base, _ in runs}
        students = _distillations(plan, lineage, teacher, runs)
        # 3. evaluation in the driver: error counts, gap, bias shifts on validation data
        if runs:
            _table(summary, teacher, baselines, students, runs, uri, parent)
        if "omitted" in students:
            summary["omitted"] = shift_experiment(plan.omitted(), students["omitted"],
                                                  [job.omit_class], plan.grid, uri)
        if "two_class" in students:
            summary["two_class"] = shift_experiment(plan.two_class(), students["two_class"],
                                                    list(job.two_classes), plan.grid, uri)
        summary["resumed"] = sorted(lineage.finished)
        _finish(summary, plan, uri, parent, started)
    return summary


def _log_job(uri: str, parent: str, plan: HintonPlan) -> None:
    log_config(uri, parent, plan.distill, plan.config_path)
    tracking.log_params(uri, parent, {JOB_SECTION: plan.job.model_dump(mode="json")})
    _log_role_configs(uri, parent, plan)


def _teacher_part(plan: HintonPlan, lineage: Lineage) -> dict[str, Any]:
    teacher = obtain_hinton_teacher(plan, lineage)
    source = teacher["checkpoint"]
    counts = count_test_errors(source, plan.teacher, lineage.uri, field="teacher")
    teacher.update(errors=counts["errors"], test_size=counts["total"],
                   accuracy=1 - counts["errors"] / max(counts["total"], 1),
                   params=teacher.get("params") or count_checkpoint_params(source, lineage.uri))
    return teacher


def _run_name(name: str, seed: int, runs: list) -> str:
    return name if len(runs) == 1 else f"{name}-seed{seed}"


def _fitter(cfg: RaykdConfig, role: str, uri: str, parent: str, handoff=None):
    """A function of the run name that fits the student ``cfg`` describes (for finished_fit)."""
    return lambda name: run_student(cfg, role, uri, parent, handoff, name=name)


def _distillations(plan: HintonPlan, lineage: Lineage, teacher: dict[str, Any],
                   runs: list) -> dict[Any, dict[str, Any]]:
    """The distilled students (by seed for the table, "omitted", "two_class"), all taught by one
    teacher actor and one soft-label cache; none started when every one is kept (--resume)."""
    job = plan.job
    fits: dict[Any, tuple[str, RaykdConfig]] = {
        seed: (_run_name("distilled", seed, runs), dist) for seed, _, dist in runs}
    if "omitted" in job.experiments:
        fits["omitted"] = (f"omitted-{job.omit_class}", plan.omitted())
    if "two_class" in job.experiments:
        fits["two_class"] = ("only-" + "-".join(str(c) for c in job.two_classes),
                             plan.two_class())
    if all(name in lineage.finished for name, _ in fits.values()):
        return {key: lineage.finished[name] for key, (name, _) in fits.items()}
    service = serve_teacher(plan.distill, [teacher["checkpoint"]], lineage.uri)
    try:
        teacher["cache"] = service.cache
        students = {key: finished_fit(lineage, name, _fitter(cfg, "student", lineage.uri,
                                                             lineage.parent, service.handoff))
                    for key, (name, cfg) in fits.items()}
        teacher["forward_samples"] = teacher_stats(service)["forward_samples"]
    finally:  # the cache on disk and the driver-owned shards outlive the actor
        stop_teacher(service)
    return students


def _table(summary: dict[str, Any], teacher: dict[str, Any], baselines: dict[int, Any],
           students: dict[Any, Any], runs: list, uri: str, parent: str) -> None:
    seed_runs = [{"seed": seed, "baseline": baselines[seed],
                  "distilled": _student_part(students[seed], dist, uri)}
                 for seed, _, dist in runs]
    summary["seed_runs"] = seed_runs
    summary["baseline"], summary["distilled"] = (seed_runs[0]["baseline"],
                                                 seed_runs[0]["distilled"])
    table = summary["table"] = table_of(teacher["errors"], seed_runs, teacher["test_size"])
    keys = ("baseline_errors_per_seed", "distilled_errors_per_seed", "gap_closed_per_seed")
    for i, values in enumerate(zip(*(table[k] for k in keys), strict=True)):
        # per-seed counts as steps of one metric each
        tracking.log_metrics(uri, parent, dict(zip(keys, values, strict=True)), step=i)


def _finish(summary: dict[str, Any], plan: HintonPlan, uri: str, parent: str,
            started: float) -> None:
    summary["settings"] = _settings(plan)
    summary["benchmark"] = benchmark_record(summary)
    summary["markdown"] = markdown_table(summary)
    metrics = {k: v for k, v in summary["benchmark"].items() if v is not None}
    tracking.log_metrics(uri, parent, metrics)
    summary["mlflow"] = {"tracking_uri": uri, "run_id": parent,
                         "experiment": plan.distill.tracking.experiment}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    tracking.log_metrics(uri, parent, {"seconds": summary["seconds"]})
    tracking.log_text(uri, parent, summary["markdown"], "hinton_mnist.md")
    tracking.log_dict(uri, parent, json.loads(json.dumps(summary, default=str)), "summary.json")


def _student_part(result: dict[str, Any], cfg: RaykdConfig, uri: str) -> dict[str, Any]:
    _log_child_config(uri, result["run_id"], cfg)
    counts = count_test_errors(result["checkpoint"], cfg, uri)
    part = {k: v for k, v in result.items() if k != "history"}
    part.update(errors=counts["errors"], test_size=counts["total"])
    return part


def _log_child_config(uri: str, run_id: str, cfg: RaykdConfig) -> None:
    """Each nested run carries the config it ran with (the omitted run's exclude_classes...)."""
    log_config(uri, run_id, cfg, None)


def _settings(plan: HintonPlan) -> dict[str, Any]:
    t, s, d = plan.teacher, plan.baseline, plan.distill
    return {"temperature": d.distill.temperature, "alpha": d.distill.alpha,
            "teacher": {"model": t.teacher.model_dump(include={"name", "args"}),
                        "epochs": t.teacher.epochs or t.train.epochs,
                        "lr": t.teacher.lr or t.train.lr, "jitter": t.teacher.jitter,
                        "optimizer": t.train.optimizer, "schedule": t.train.schedule,
                        "batch_size": t.train.batch_size, "num_workers": t.train.num_workers},
            "baseline": _student_settings(s),
            "distilled": {**_student_settings(d), "teacher_mode": d.teacher.mode,
                          "views": teacher_views(d)},
            "table_seeds": plan.table_seeds,
            "bias_grid": list(plan.grid), "bias_split": "val",
            "data": {"name": d.data.name, "val_fraction": d.data.val_fraction,
                     "split_seed": d.data.split_seed, "limit": d.data.limit}}


def _student_settings(cfg: RaykdConfig) -> dict[str, Any]:
    return {"model": cfg.student.model_dump(include={"name", "args"}),
            "epochs": cfg.train.epochs, "lr": cfg.train.lr, "optimizer": cfg.train.optimizer,
            "schedule": cfg.train.schedule, "batch_size": cfg.train.batch_size,
            "num_workers": cfg.train.num_workers, "jitter": cfg.train.jitter,
            "flip": cfg.train.flip}


def _log_role_configs(uri: str, run_id: str, plan: HintonPlan) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg, src in (("teacher", plan.teacher, plan.teacher_config_path),
                               ("baseline", plan.baseline, plan.baseline_config_path)):
            resolved = Path(tmp) / f"{name}.resolved.yaml"
            dump_yaml(cfg, resolved)
            tracking.log_artifact(uri, run_id, resolved, "config")
            tracking.log_artifact(uri, run_id, src, "config")


def run_hinton_command(args) -> dict[str, Any]:
    """``raykd hinton-mnist``: check everything, run, write the markdown table (and print it)."""
    plan = load_plan(args.config, args.overrides, getattr(args, "data_root", None))
    preflight_plan(plan)
    summary = run_hinton(plan, resume=getattr(args, "resume", False))
    print("\n" + summary["markdown"])
    markdown = getattr(args, "markdown", None)
    if markdown:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(summary["markdown"])
    return summary
