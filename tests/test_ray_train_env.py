"""raykd tunes Ray Train V2 through environment variables Ray does not document
(``raykd.train.fit.TRAIN_ENV``). pyproject pins Ray to the minor release this was checked on;
these tests fail loudly when a Ray upgrade renames a variable, stops passing it to the Train
controller, or stops acting on it."""

from __future__ import annotations

import os
import statistics

import pytest

from raykd.train.fit import TRAIN_ENV

HEALTH = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
PREEMPTION = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
REPORTS = 6


def test_ray_still_reads_the_variables_raykd_sets():
    # Ray's own names for them; private module, so a rename fails here first, not in a fit.
    from ray.train.v2._internal import constants

    assert set(TRAIN_ENV) == {HEALTH, PREEMPTION}
    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == HEALTH
    assert constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR == PREEMPTION
    # Set in the driver; Ray Train copies these to its controller actor, which reads them.
    assert {HEALTH, PREEMPTION} <= set(constants.ENV_VARS_TO_PROPAGATE)
    # The default that made every report wait ~2 s (what the variable exists to avoid).
    assert constants.DEFAULT_HEALTH_CHECK_INTERVAL_S >= 1.0


def _preemption_watchers() -> int:
    from ray.util.state import list_actors

    return len(list_actors(filters=[("class_name", "=", "PreemptionWatcher")], limit=10_000,
                           raise_on_missing_output=False))


@pytest.mark.timeout(300)
def test_a_fit_reports_fast_and_starts_no_preemption_watcher(ray_session, tmp_path, monkeypatch):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raykd.train.fit import ensure_ray

    for key in TRAIN_ENV:  # what ensure_ray sets, not what a developer's shell happens to hold
        monkeypatch.delenv(key, raising=False)
    ensure_ray()
    assert {k: os.environ[k] for k in TRAIN_ENV} == TRAIN_ENV
    watchers = _preemption_watchers()

    def report_loop(config):  # defined here: Ray ships it by value (tests/ is not importable)
        import time

        import ray.train

        took = []
        for step in range(REPORTS):
            started = time.perf_counter()
            ray.train.report({"step": step})
            took.append(time.perf_counter() - started)
        return took

    trainer = TorchTrainer(report_loop, scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="train-env", storage_path=str(tmp_path)))
    result = trainer.fit()
    took = result.return_value  # rank 0's
    assert len(took) == REPORTS
    # Each report waits for the controller's next poll: ~2 s at Ray's default interval, ~0.1 s
    # at raykd's (0.11 s measured on an idle machine). 1 s leaves room for a loaded one.
    assert statistics.median(took) < 1.0, took
    assert _preemption_watchers() == watchers
