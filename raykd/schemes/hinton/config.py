"""The Hinton MNIST job's configuration: the ``hinton:`` job section and the three role configs
(teacher, baseline, distilled student) it names, read, overridden and validated together before
Ray or MLflow is touched (see :mod:`raykd.schemes.hinton` for the job itself)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raykd.config import (ConfigError, RaykdConfig, _set_dotted, parse_overrides, read_yaml,
                          validate)

MAIN_CONFIG = "mnist_hinton_distill.yaml"
JOB_SECTION = "hinton"
EXPERIMENTS = ("table", "omitted", "two_class")
SHARED_SECTIONS = ("data", "tracking")  # taken from the main config for every role

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
    # the table's baseline and distilled students, once per seed (train.seed); None = once, with
    # the configs' own train.seed. The omitted and two-class students use the configs' seed.
    seeds: list[int] | None = None

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

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or len(set(value)) != len(value) or min(value) < 0):
            raise ValueError("give distinct non-negative seeds, e.g. [0, 1, 2] (or null for one "
                             "run with train.seed)")
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
    def table_seeds(self) -> list[int]:
        """The seeds the table's students are trained with."""
        return self.job.seeds if self.job.seeds is not None else [self.distill.train.seed]

    def seed_runs(self) -> list[tuple[int, RaykdConfig, RaykdConfig]]:
        """(seed, baseline config, distilled config) for each run of the table."""
        if self.job.seeds is None:
            return [(self.distill.train.seed, self.baseline, self.distill)]
        return [(s, self.baseline.with_overrides({"train.seed": s}),
                 self.distill.with_overrides({"train.seed": s})) for s in self.job.seeds]

    @property
    def grid(self) -> tuple[float, float, float]:
        return (self.job.shift_low, self.job.shift_high, self.job.shift_step)


# ---------------------------------------------------------------------------------- configs

def default_config_path() -> Path:
    """``configs/mnist_hinton_distill.yaml`` in the working directory, else in the checkout."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
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
        return validate(raw, check_files=True)  # the driver: files are checked here
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
