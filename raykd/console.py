"""What raykd prints: quiet by default, everything with ``--verbose``.

By default Ray logs at WARNING (no per-report ``TrainingReport(...)`` lines) and MLflow at
WARNING (no database-migration or environment-export INFO lines); warnings and errors still
show. ``--verbose`` (or ``RAYKD_VERBOSE=1``) restores both libraries' INFO output and prints a
progress line for every epoch.
"""

from __future__ import annotations

import logging
import os

_QUIET_ENV = {"MLFLOW_LOGGING_LEVEL": "WARNING",  # read by MLflow when it is imported
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def verbose() -> bool:
    return os.environ.get("RAYKD_VERBOSE", "") not in ("", "0", "false")


def set_verbose(on: bool) -> None:
    """Called once by the CLI before any library is imported."""
    if on:
        os.environ["RAYKD_VERBOSE"] = "1"
        os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO"
    configure()


def configure() -> None:
    if verbose():
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # Pinned model requirements (tracking.log_torch_model) make MLflow look for pip's version to
    # write conda.yaml; a uv-built environment has no pip, and the warning says only that.
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)


def train_log_level() -> str:
    """Ray Train's console level (its own log files under the Ray session keep everything).
    Quiet mode shows errors only: the one warning a healthy local run prints is the
    controller's "Failed to send resource request" traceback when the autoscaling
    coordinator's actor takes over 5 s to start on a busy machine, harmless by its own text.
    """
    return "INFO" if verbose() else "ERROR"


def quiet_train_worker(verbose_driver: bool) -> None:
    """In a Train worker: no per-report ``Reporting training result N: TrainingReport(...)``
    INFO line. Ray Train sets the worker's root logger to INFO, and that line's logger is named
    after its source *file*, so it hangs off the root, not off ``ray.train``. The driver's
    verbosity travels in the loop config: on a cluster the workers do not share its env."""
    if not verbose_driver:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("ray.train").setLevel(logging.WARNING)


def ray_logging_level() -> str:
    return "INFO" if verbose() else "WARNING"
