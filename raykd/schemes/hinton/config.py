"""The Hinton MNIST job's plan: the main config (the distilled student, with the ``hinton:``
section of :class:`raykd.config.RaykdConfig`) and the two role configs it names (teacher,
baseline), each loaded through :func:`raykd.config.load_config` like any verb's config and
checked together before Ray or MLflow is touched (see :mod:`raykd.schemes.hinton.job` for the job
itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from raykd.config import ConfigError, HintonConfig, RaykdConfig, load_config, parse_overrides
from raykd.data import dataset_info
from raykd.preflight import preflight

MAIN_CONFIG = "mnist_hinton_distill.yaml"
JOB_SECTION = "hinton"
SHARED_SECTIONS = ("data", "tracking")  # taken from the main config for every role


class HintonPlan(BaseModel):
    """Everything the job runs, validated before Ray or MLflow is touched."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    job: HintonConfig
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


def load_plan(config: str | Path | None, overrides: list[str] | dict[str, Any] = (),
              data_root: str | None = None) -> HintonPlan:
    """Read the main config and the two it names, apply overrides, validate all three: every
    ``--set`` applies to the three configs, except ``hinton.*`` (the main config's section)."""
    path = Path(config).expanduser() if config else default_config_path()
    pairs = dict(overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    if data_root is not None:
        pairs["data.root"] = data_root
    main = load_config(path, pairs)
    if main.data.root:  # workers run elsewhere: make it absolute
        main = main.with_overrides({"data.root": str(Path(main.data.root).expanduser().resolve())})
    job = main.hinton or HintonConfig()
    role_pairs = {k: v for k, v in pairs.items() if k.split(".")[0] != JOB_SECTION}
    # the main config's data and tracking for every role; no role has a job section
    role_pairs.update({s: main.to_dict()[s] for s in SHARED_SECTIONS}, hinton=None)
    base = path.resolve().parent
    teacher_path = (base / job.teacher_config).resolve()
    baseline_path = (base / job.baseline_config).resolve()
    teacher = _load_role(teacher_path, "teacher_config", role_pairs)
    # the distilled student learns from the teacher config's teacher
    distill = main.with_overrides({"teacher": teacher.to_dict()["teacher"], JOB_SECTION: None})
    plan = HintonPlan(job=job, teacher=teacher,
                      baseline=_load_role(baseline_path, "baseline_config", role_pairs),
                      distill=distill, config_path=str(path.resolve()),
                      teacher_config_path=str(teacher_path),
                      baseline_config_path=str(baseline_path))
    _check_classes(plan)
    return plan


def _load_role(path: Path, field: str, pairs: dict[str, Any]) -> RaykdConfig:
    if not path.is_file():
        raise ConfigError(f"{JOB_SECTION}.{field}: file {str(path)!r} does not exist; give a YAML "
                          f"config path (relative to the main config's folder)")
    try:
        return load_config(path, pairs)
    except ConfigError as err:
        if str(err).startswith(("data.", "tracking.")):
            raise
        raise ConfigError(f"{err} (in {path.name})") from None


def _check_classes(plan: HintonPlan) -> None:
    info = dataset_info(plan.distill.data)
    n = info.num_classes
    job = plan.job
    if "omitted" in job.experiments and job.omit_class >= n:
        raise ConfigError(f"{JOB_SECTION}.omit_class: class {job.omit_class} is outside "
                          f"0..{n - 1}; use a class number of {info.name}")
    if "two_class" in job.experiments and max(job.two_classes) >= n:
        raise ConfigError(f"{JOB_SECTION}.two_classes: {job.two_classes} has a class outside "
                          f"0..{n - 1}; use class numbers of {info.name}")


def preflight_plan(plan: HintonPlan) -> None:
    preflight(plan.teacher, roles=("teacher",))
    preflight(plan.baseline)
    preflight(plan.distill)
    if "omitted" in plan.job.experiments:
        preflight(plan.omitted())
    if "two_class" in plan.job.experiments:
        preflight(plan.two_class())
