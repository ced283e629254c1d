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

import copy
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raykd import tracking
from raykd.config import (ConfigError, RaykdConfig, _set_dotted, dump_yaml, parse_overrides,
                          read_yaml, validate)

MAIN_CONFIG = "mnist_hinton_distill.yaml"
JOB_SECTION = "hinton"
EXPERIMENTS = ("table", "omitted", "two_class")
SHARED_SECTIONS = ("data", "tracking")  # taken from the main config for every role

# Hinton et al. 2015, §3 (MNIST; the paper chose its bias shifts on the test set).
PAPER = {"teacher_errors": 67, "baseline_errors": 146, "distilled_errors": 74,
         "gap_closed": (146 - 74) / (146 - 67),
         "omitted_errors_before": 206, "omitted_errors_after": 109,
         "omitted_class_errors_before": 133, "omitted_class_errors_after": 14,
         "omitted_class_size": 1010, "omitted_shift": 3.5,
         "two_class_error_before": 0.473, "two_class_error_after": 0.132, "two_class_shift": -7.6}

BENCHMARK_KEYS = ("teacher_errors", "baseline_errors", "distilled_errors", "gap_closed",
                  "omitted_errors_before", "omitted_errors_after", "omitted_class_errors_before",
                  "omitted_class_errors_after", "two_class_error_before", "two_class_error_after")


class HintonJob(BaseModel):
    """The ``hinton:`` section of the main config (settable with ``--set hinton.KEY=VALUE``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    teacher_config: str = "mnist_hinton_teacher.yaml"  # relative to the main config's folder
    baseline_config: str = "mnist_hinton_student.yaml"
    experiments: list[Literal["table", "omitted", "two_class"]] = Field(
        default_factory=lambda: list(EXPERIMENTS))
    omit_class: int = Field(3, ge=0)  # removed from the transfer set in "omitted"
    two_classes: list[int] = Field(default_factory=lambda: [7, 8])  # the whole "two_class" set
    shift_low: float = -15.0  # bias-shift grid, scanned on the validation split
    shift_high: float = 15.0
    shift_step: float = Field(0.1, gt=0.0)
    reuse_teacher: bool = True  # reuse a finished teacher run with the same teacher key

    @field_validator("experiments")
    @classmethod
    def _some_experiment(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"name at least one experiment; allowed: {', '.join(EXPERIMENTS)}")
        return list(dict.fromkeys(value))

    @field_validator("two_classes")
    @classmethod
    def _two_classes(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value) or min(value) < 0:
            raise ValueError("give one or more distinct class numbers, e.g. [7, 8]")
        return value


class HintonPlan(BaseModel):
    """Everything the job runs, validated before Ray or MLflow is touched."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    job: HintonJob
    teacher: RaykdConfig  # trains the teacher (its teacher + train sections)
    baseline: RaykdConfig  # the student on hard labels
    distill: RaykdConfig  # the distilled student (teacher section = the teacher config's)
    config_path: str
    teacher_config_path: str
    baseline_config_path: str

    def omitted(self) -> RaykdConfig:
        return self.distill.with_overrides({"distill.exclude_classes": [self.job.omit_class],
                                            "distill.include_classes": None})

    def two_class(self) -> RaykdConfig:
        return self.distill.with_overrides({"distill.include_classes": list(self.job.two_classes),
                                            "distill.exclude_classes": []})

    @property
    def grid(self) -> tuple[float, float, float]:
        return (self.job.shift_low, self.job.shift_high, self.job.shift_step)


# ---------------------------------------------------------------------------------- configs

def default_config_path() -> Path:
    """``configs/mnist_hinton_distill.yaml`` in the working directory, else in the checkout."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base / "configs" / MAIN_CONFIG
        if candidate.is_file():
            return candidate
    raise ConfigError(f"--config: no configs/{MAIN_CONFIG} here or in the raykd checkout; give "
                      f"--config PATH (the Hinton job's main config)")


def _job_section(raw: dict[str, Any], overrides: dict[str, Any]) -> HintonJob:
    job_raw = raw.pop(JOB_SECTION, None) or {}
    if not isinstance(job_raw, dict):
        raise ConfigError(f"{JOB_SECTION}: must be a mapping of the job's settings")
    job_raw = {JOB_SECTION: copy.deepcopy(job_raw)}
    for key, value in overrides.items():
        _set_dotted(job_raw, key, value)
    try:
        return HintonJob.model_validate(job_raw[JOB_SECTION])
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join([JOB_SECTION, *(str(p) for p in first["loc"])])
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = f"unknown key; allowed: {', '.join(HintonJob.model_fields)}"
        raise ConfigError(f"{loc}: {msg}") from None


def _role_raw(path: Path, field: str, role_overrides: dict[str, Any],
              shared: dict[str, Any]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{JOB_SECTION}.{field}: file {str(path)!r} does not exist; give a YAML "
                          f"config path (relative to the main config's folder)")
    raw = copy.deepcopy(read_yaml(path))
    raw.pop(JOB_SECTION, None)
    for key, value in role_overrides.items():
        _set_dotted(raw, key, value)
    raw.update(copy.deepcopy(shared))
    return raw


def load_plan(config: str | Path | None, overrides: list[str] | dict[str, Any] = (),
              data_root: str | None = None) -> HintonPlan:
    """Read the main config and the two it names, apply overrides, validate all three."""
    path = Path(config).expanduser() if config else default_config_path()
    raw = copy.deepcopy(read_yaml(path))
    pairs = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
    pairs = dict(pairs)
    if data_root is not None:
        pairs["data.root"] = data_root
    job_pairs = {k: v for k, v in pairs.items() if k.split(".")[0] == JOB_SECTION}
    role_pairs = {k: v for k, v in pairs.items() if k.split(".")[0] != JOB_SECTION}
    job = _job_section(raw, job_pairs)
    for key, value in role_pairs.items():
        _set_dotted(raw, key, value)
    data = raw.get("data")
    if isinstance(data, dict) and data.get("root"):  # workers run elsewhere: make it absolute
        data["root"] = str(Path(str(data["root"])).expanduser().resolve())
    shared = {s: raw[s] for s in SHARED_SECTIONS if s in raw}
    base = path.resolve().parent
    teacher_path = (base / job.teacher_config).resolve()
    baseline_path = (base / job.baseline_config).resolve()
    teacher_raw = _role_raw(teacher_path, "teacher_config", role_pairs, shared)
    baseline_raw = _role_raw(baseline_path, "baseline_config", role_pairs, shared)
    raw["teacher"] = copy.deepcopy(teacher_raw.get("teacher", {}))
    teacher_cfg = _validate(teacher_raw, teacher_path)
    plan = HintonPlan(job=job, teacher=teacher_cfg, baseline=_validate(baseline_raw, baseline_path),
                      distill=_validate(raw, path), config_path=str(path.resolve()),
                      teacher_config_path=str(teacher_path),
                      baseline_config_path=str(baseline_path))
    _check_classes(plan)
    return plan


def _validate(raw: dict[str, Any], path: Path) -> RaykdConfig:
    try:
        return validate(raw)
    except ConfigError as err:
        if str(err).startswith(("data.", "tracking.")):
            raise
        raise ConfigError(f"{err} (in {path.name})") from None


def _check_classes(plan: HintonPlan) -> None:
    from raykd.data import dataset_info

    info = dataset_info(plan.distill.data)
    n = info.num_classes
    job = plan.job
    if "omitted" in job.experiments and job.omit_class >= n:
        raise ConfigError(f"{JOB_SECTION}.omit_class: class {job.omit_class} is outside "
                          f"0..{n - 1}; use a class number of {info.name}")
    if "two_class" in job.experiments and max(job.two_classes) >= n:
        raise ConfigError(f"{JOB_SECTION}.two_classes: {job.two_classes} has a class outside "
                          f"0..{n - 1}; use class numbers of {info.name}")
    if job.shift_high < job.shift_low:
        raise ConfigError(f"{JOB_SECTION}.shift_high: {job.shift_high} is below shift_low "
                          f"{job.shift_low}; give low <= high")


def preflight_plan(plan: HintonPlan) -> None:
    from raykd.preflight import preflight

    preflight(plan.teacher, roles=("teacher",))
    preflight(plan.baseline)
    preflight(plan.distill)
    if "omitted" in plan.job.experiments:
        preflight(plan.omitted())
    if "two_class" in plan.job.experiments:
        preflight(plan.two_class())


# ---------------------------------------------------------------------------------- teacher

def teacher_key(cfg: RaykdConfig) -> str:
    """What the trained teacher's weights depend on: its model and training settings, the
    training settings that shape its optimisation, and the dataset's content identity."""
    from raykd.data import dataset_info

    d = cfg.to_dict()
    teacher = {k: d["teacher"][k] for k in ("name", "args", "epochs", "lr", "jitter")}
    train = {k: v for k, v in d["train"].items()
             if k not in ("use_gpu", "cpus_per_worker", "max_failures", "checkpoint_every")}
    payload = {"teacher": teacher, "train": train, "data": dataset_info(cfg.data).identity}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def find_reusable_teacher(uri: str, experiment: str, key: str) -> dict[str, Any] | None:
    """The newest FINISHED teacher run of this experiment tagged with ``key`` whose weights can
    still be read, as ``{"run_id", "source", "checkpoint"}``; None when there is none."""
    from raykd.teacher.loading import local_checkpoint

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


def obtain_hinton_teacher(plan: HintonPlan, uri: str, parent: str) -> dict[str, Any]:
    """The teacher config's checkpoint if given, else a reusable earlier run, else train now."""
    from raykd.schemes.offline import train_teacher

    cfg = plan.teacher
    if cfg.teacher.checkpoint:
        return {"checkpoint": cfg.teacher.checkpoint, "source": "teacher.checkpoint",
                "trained": False}
    key = teacher_key(cfg)
    if plan.job.reuse_teacher:
        found = find_reusable_teacher(uri, plan.distill.tracking.experiment, key)
        if found:
            tracking.set_tags(uri, parent, {"raykd.hinton.teacher_run": found["run_id"]})
            return {"checkpoint": found["checkpoint"], "source": found["source"],
                    "reused_run_id": found["run_id"], "trained": False, "key": key}
    trained = train_teacher(cfg, uri, parent)
    _log_child_config(uri, trained["run_id"], cfg)
    tracking.set_tags(uri, trained["run_id"], {"raykd.hinton.teacher_key": key})
    tracking.set_tags(uri, parent, {"raykd.hinton.teacher_run": trained["run_id"]})
    return {**trained, "source": "trained", "trained": True, "key": key}


# ---------------------------------------------------------------------------------- evaluation

def _load_student(checkpoint: str, cfg: RaykdConfig, uri: str):
    from raykd.data import dataset_info
    from raykd.teacher.loading import local_checkpoint
    from raykd.train.checkpoint import load_model

    return load_model(local_checkpoint(checkpoint, uri), cfg.student, dataset_info(cfg.data),
                      field="student")


def count_test_errors(checkpoint: str, cfg: RaykdConfig, uri: str, field: str = "student",
                classes: tuple[int, ...] = ()) -> dict[str, Any]:
    from raykd.data import build_dataset, dataset_info
    from raykd.schemes.bias_shift import error_counts
    from raykd.teacher.loading import local_checkpoint
    from raykd.train.checkpoint import load_model

    fallback = cfg.teacher if field == "teacher" else cfg.student
    model = load_model(local_checkpoint(checkpoint, uri), fallback, dataset_info(cfg.data),
                       field=field)
    return error_counts(model, build_dataset(cfg.data, "test"), classes)


def shift_experiment(cfg: RaykdConfig, student: dict[str, Any], classes: list[int],
                     grid: tuple[float, float, float], uri: str) -> dict[str, Any]:
    """Choose δ for ``classes`` on the validation split; test errors before and after."""
    from raykd.data import build_dataset, dataset_info
    from raykd.schemes.bias_shift import apply_bias_shift, choose_bias_shift, error_counts
    from raykd.train.checkpoint import save_checkpoint

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


def gap_closed(teacher: int, baseline: int, distilled: int) -> float | None:
    """(baseline − distilled) / (baseline − teacher); None when the teacher is not better."""
    if baseline <= teacher:
        return None
    return (baseline - distilled) / (baseline - teacher)


def benchmark_record(summary: dict[str, Any]) -> dict[str, Any]:
    """The flat record ``benchmarks/hinton_mnist.py`` writes (None for experiments not run)."""
    rec: dict[str, Any] = dict.fromkeys(BENCHMARK_KEYS)
    table = summary.get("table") or {}
    for key in ("teacher_errors", "baseline_errors", "distilled_errors", "gap_closed"):
        rec[key] = table.get(key)
    if table.get("teacher_errors") is None and "teacher" in summary:
        rec["teacher_errors"] = summary["teacher"].get("errors")
    om = summary.get("omitted")
    if om:
        c = str(om["classes"][0])
        rec.update(omitted_errors_before=om["errors_before"], omitted_errors_after=om["errors_after"],
                   omitted_class_errors_before=om["class_errors_before"][c],
                   omitted_class_errors_after=om["class_errors_after"][c])
    tc = summary.get("two_class")
    if tc:
        rec.update(two_class_error_before=tc["error_before"], two_class_error_after=tc["error_after"])
    return rec


# ---------------------------------------------------------------------------------- the table

def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _n(x: Any) -> str:
    return "–" if x is None else str(x)


def markdown_table(summary: dict[str, Any]) -> str:
    """The comparison with the paper's numbers, as a markdown table."""
    p, rec = PAPER, benchmark_record(summary)
    rows = [("Teacher 784-1200-1200-10, dropout + ±2 px jitter: test errors",
             p["teacher_errors"], _n(rec["teacher_errors"])),
            ("Baseline 784-800-800-10, hard labels: test errors", p["baseline_errors"],
             _n(rec["baseline_errors"])),
            (f"Distilled 784-800-800-10, T={_temperature(summary)}: test errors",
             p["distilled_errors"], _n(rec["distilled_errors"])),
            ("Teacher–baseline gap closed by distillation", _pct(p["gap_closed"]),
             _pct(rec["gap_closed"]))]
    om = summary.get("omitted")
    if om:
        c = str(om["classes"][0])
        size, delta = om["class_sizes"][c], om["shift"]["delta"]
        rows += [(f"No {c}s in the transfer set: test errors, before → after bias shift",
                  f"{p['omitted_errors_before']} → {p['omitted_errors_after']}",
                  f"{om['errors_before']} → {om['errors_after']}"),
                 (f"… of them on the {c}s (paper: 1010 test 3s; here {size})",
                  f"{p['omitted_class_errors_before']} → {p['omitted_class_errors_after']}",
                  f"{om['class_errors_before'][c]} → {om['class_errors_after'][c]}"),
                 (f"… bias shift of class {c} (paper: chosen on test; raykd: on validation)",
                  f"+{p['omitted_shift']}", f"{delta:+.1f}")]
    tc = summary.get("two_class")
    if tc:
        names = " and ".join(f"{c}s" for c in tc["classes"])
        rows += [(f"Only {names} in the transfer set: test error, before → after bias shift",
                  f"{_pct(p['two_class_error_before'])} → {_pct(p['two_class_error_after'])}",
                  f"{_pct(tc['error_before'])} → {_pct(tc['error_after'])}"),
                 ("… common bias shift of those classes (paper: on test; raykd: on validation)",
                  f"{p['two_class_shift']}", f"{tc['shift']['delta']:+.1f}")]
    lines = ["| | Hinton et al. 2015 | raykd |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def _temperature(summary: dict[str, Any]) -> Any:
    return summary.get("settings", {}).get("temperature", 20)


# ---------------------------------------------------------------------------------- the job

def run_hinton(plan: HintonPlan) -> dict[str, Any]:
    """Run the planned experiments under one MLflow parent run; return the summary."""
    from raykd.schemes.offline import count_checkpoint_params, log_config, run_student
    from raykd.teacher.service import serve_teacher, stop_teacher, teacher_stats
    from raykd.train.fit import ensure_ray

    cfg, job = plan.distill, plan.job
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    ensure_ray()
    started = time.perf_counter()
    summary: dict[str, Any] = {"experiments": list(job.experiments), "paper": PAPER}
    with tracking.tracked_run(uri, cfg.tracking.experiment, "hinton-mnist", None,
                              {"raykd.scheme": "hinton-mnist"}) as parent:
        log_config(uri, parent, cfg, plan.config_path)
        tracking.log_params(uri, parent, {JOB_SECTION: job.model_dump(mode="json")})
        _log_role_configs(uri, parent, plan)
        # 1. the teacher, trained (or reused) once
        teacher = obtain_hinton_teacher(plan, uri, parent)
        source = teacher["checkpoint"]
        counts = count_test_errors(source, plan.teacher, uri, field="teacher")
        teacher.update(errors=counts["errors"], test_size=counts["total"],
                       accuracy=1 - counts["errors"] / max(counts["total"], 1),
                       params=teacher.get("params") or count_checkpoint_params(source, uri))
        summary["teacher"] = teacher
        # 2. the baseline: the same student on hard labels, no teacher
        if "table" in job.experiments:
            summary["baseline"] = _student_part(
                run_student(plan.baseline, "baseline", uri, parent, name="baseline"),
                plan.baseline, uri)
        # 3. one teacher actor + one soft-label cache for every distillation
        service = serve_teacher(cfg, [source], uri)
        students: dict[str, dict[str, Any]] = {}
        try:
            teacher["cache"] = service.cache
            if "table" in job.experiments:
                students["distilled"] = run_student(cfg, "student", uri, parent,
                                                     service.handoff, name="distilled")
            if "omitted" in job.experiments:
                students["omitted"] = run_student(plan.omitted(), "student", uri, parent,
                                                  service.handoff,
                                                  name=f"omitted-{job.omit_class}")
            if "two_class" in job.experiments:
                students["two_class"] = run_student(
                    plan.two_class(), "student", uri, parent, service.handoff,
                    name="only-" + "-".join(str(c) for c in job.two_classes))
            teacher["forward_samples"] = teacher_stats(service)["forward_samples"]
        finally:  # the cache on disk and the driver-owned shards outlive the actor
            stop_teacher(service)
        # 4. evaluation in the driver: error counts, gap, bias shifts on validation data
        if "distilled" in students:
            summary["distilled"] = _student_part(students["distilled"], cfg, uri)
            t, b, d = (teacher["errors"], summary["baseline"]["errors"],
                       summary["distilled"]["errors"])
            summary["table"] = {"teacher_errors": t, "baseline_errors": b, "distilled_errors": d,
                                "gap_closed": gap_closed(t, b, d), "test_size": counts["total"]}
        if "omitted" in students:
            summary["omitted"] = shift_experiment(plan.omitted(), students["omitted"],
                                                  [job.omit_class], plan.grid, uri)
        if "two_class" in students:
            summary["two_class"] = shift_experiment(plan.two_class(), students["two_class"],
                                                    list(job.two_classes), plan.grid, uri)
        summary["settings"] = _settings(plan)
        summary["benchmark"] = benchmark_record(summary)
        summary["markdown"] = markdown_table(summary)
        metrics = {k: v for k, v in summary["benchmark"].items() if v is not None}
        tracking.log_metrics(uri, parent, metrics)
        summary["mlflow"] = {"tracking_uri": uri, "run_id": parent,
                             "experiment": cfg.tracking.experiment}
        summary["seconds"] = round(time.perf_counter() - started, 1)
        tracking.log_metrics(uri, parent, {"seconds": summary["seconds"]})
        tracking.log_text(uri, parent, summary["markdown"], "hinton_mnist.md")
        tracking.log_dict(uri, parent, json.loads(json.dumps(summary, default=str)),
                          "summary.json")
    return summary


def _student_part(result: dict[str, Any], cfg: RaykdConfig, uri: str) -> dict[str, Any]:
    _log_child_config(uri, result["run_id"], cfg)
    counts = count_test_errors(result["checkpoint"], cfg, uri)
    part = {k: v for k, v in result.items() if k != "history"}
    part.update(errors=counts["errors"], test_size=counts["total"],
                epochs=len(result.get("history") or []))
    return part


def _log_child_config(uri: str, run_id: str, cfg: RaykdConfig) -> None:
    """Each nested run carries the config it ran with (the omitted run's exclude_classes...)."""
    from raykd.schemes.offline import log_config

    log_config(uri, run_id, cfg, None)


def _settings(plan: HintonPlan) -> dict[str, Any]:
    t, s, d = plan.teacher, plan.baseline, plan.distill
    return {"temperature": d.distill.temperature, "alpha": d.distill.alpha,
            "teacher": {"model": t.teacher.model_dump(include={"name", "args"}),
                        "epochs": t.teacher.epochs or t.train.epochs,
                        "lr": t.teacher.lr or t.train.lr, "jitter": t.teacher.jitter,
                        "optimizer": t.train.optimizer, "schedule": t.train.schedule,
                        "batch_size": t.train.batch_size, "num_workers": t.train.num_workers},
            "baseline": {"model": s.student.model_dump(include={"name", "args"}),
                         "epochs": s.train.epochs, "lr": s.train.lr,
                         "optimizer": s.train.optimizer, "schedule": s.train.schedule,
                         "batch_size": s.train.batch_size, "num_workers": s.train.num_workers},
            "distilled": {"model": d.student.model_dump(include={"name", "args"}),
                          "epochs": d.train.epochs, "lr": d.train.lr,
                          "optimizer": d.train.optimizer, "schedule": d.train.schedule,
                          "batch_size": d.train.batch_size, "num_workers": d.train.num_workers},
            "bias_grid": list(plan.grid), "bias_split": "val",
            "data": {"name": d.data.name, "val_fraction": d.data.val_fraction,
                     "split_seed": d.data.split_seed, "limit": d.data.limit}}


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
    summary = run_hinton(plan)
    print("\n" + summary["markdown"])
    markdown = getattr(args, "markdown", None)
    if markdown:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(summary["markdown"])
    return summary
