"""Fits as phases of one Ray Train worker group: determinism, checkpoint cadence, best-epoch
selection, and a worker killed mid-fit continuing exactly from its last checkpoint (real Ray,
2 workers).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from raykd.config import load_config

TIMING_KEYS = {"epoch_seconds", "eval_seconds", "samples_per_s", "_ended_at"}


def small_cfg(workdir, **overrides):
    base = {"train.epochs": 3, "teacher.epochs": 2, "train.num_workers": 2,
            "teacher.args": {"hidden_sizes": [64]},
            "tracking.uri": f"sqlite:///{workdir / 'mlflow.db'}"}
    return load_config(None, {**base, **overrides})


def curves(history):
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


@pytest.fixture(scope="module")
def session_fits(ray_session, tmp_path_factory):
    """Four phases on one worker group: baseline, teacher, baseline again (same seed), and a
    5-epoch baseline that checkpoints every 2 epochs."""
    from raykd.train.fit import fit, fit_session

    root = tmp_path_factory.mktemp("group")
    old = os.getcwd()
    os.chdir(root)
    try:
        cfg = small_cfg(root)
        with fit_session(cfg, "test") as group:
            first = fit(cfg, "baseline", name="first")
            teacher = fit(cfg, "teacher", name="teacher")
            again = fit(cfg, "baseline", name="again")
            cadence = fit(cfg.with_overrides({"train.epochs": 5, "train.checkpoint_every": 2}),
                          "baseline", name="cadence")
            phases = group._next_id
    finally:
        os.chdir(old)
    return {"first": first, "teacher": teacher, "again": again, "cadence": cadence,
            "phases": phases, "cfg": cfg}


def test_same_seed_same_metrics_and_weights(session_fits):
    from safetensors.torch import load_file

    first, again = session_fits["first"], session_fits["again"]
    assert curves(first.history) == curves(again.history)  # exactly, not approximately
    assert first.test_accuracy == again.test_accuracy
    a, b = (load_file(str(f.checkpoint / "model.safetensors")) for f in (first, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... although a different phase (the teacher) ran on the same workers in between.
    assert session_fits["phases"] == 4
    assert curves(session_fits["teacher"].history) != curves(first.history)


def test_checkpoint_cadence_every_two_epochs_and_the_last(session_fits):
    assert session_fits["cadence"].checkpoints == [1, 3, 4]
    # Default cadence: the last epoch only (60 s never pass in a 3-epoch digits fit).
    assert session_fits["first"].checkpoints == [2]


def test_kept_weights_are_the_best_validation_epoch(session_fits):
    from raykd.data import build_dataset
    from raykd.train.checkpoint import load_model
    from raykd.train.evaluate import evaluate

    fit = session_fits["cadence"]
    key = [(h["val_accuracy"], -h["val_loss"]) for h in fit.history]
    assert fit.best_epoch == key.index(max(key))
    cfg = session_fits["cfg"]
    test = build_dataset(cfg.data, "test")
    model = load_model(fit.checkpoint, cfg.student, test.info, field="student")
    # The weights handed back are the ones the fit evaluated on test.
    assert evaluate(model, test, torch.device("cpu")) == pytest.approx(fit.test_accuracy)


def test_killed_worker_continues_exactly_from_its_last_checkpoint(ray_session, workdir,
                                                                 session_fits):
    """A Train worker process is killed (SIGKILL, by PID) after the fit's first checkpoint; with
    the default train.max_failures Ray Train restarts the group, which resumes the phase from
    that checkpoint (student, optimiser, RNG...) and ends with every epoch, the same curve and
    the same accuracy as the same fit that was never killed (session_fits' "first")."""
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    from fault_marks import pause_at_first_checkpoint, release, wait_for_pause

    from raykd import tracking
    from raykd.train.fit import fit

    cfg = small_cfg(workdir, **{"train.checkpoint_every": 1})
    assert cfg.train.max_failures > 0  # the default
    uri = cfg.tracking.uri
    run_id = tracking.start_run(uri, "fault", "baseline")
    marks = workdir / "marks"
    marks.mkdir()
    outcome: dict = {}

    def train():
        try:
            outcome["result"] = fit(cfg, "baseline", tracking_uri=uri, run_id=run_id,
                                    name="fault", callbacks=[pause_at_first_checkpoint(marks)])
        except BaseException as err:  # surfaced by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    paused = wait_for_pause(marks, thread.is_alive)
    assert paused == ["ckpt-0"], outcome.get("error")
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2  # this fit's two, nothing else's
    os.kill(workers[0].pid, signal.SIGKILL)
    killed_at = time.time()
    release(marks)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    result, unkilled = outcome["result"], session_fits["first"]
    [recovery] = result.recoveries  # one restart, resumed after the epoch-0 checkpoint
    # Train V2's workers do not wait for the paused controller: they can finish epochs 1 and 2
    # before the kill lands (seen in CI: 2 lost). What is lost is at most the epochs after the
    # checkpoint; resuming at epoch 1 is what shows the checkpoint was used.
    assert recovery["resumed_epoch"] == 1 and 0 <= recovery["epochs_lost"] <= 2
    resumed_end = next(h["_ended_at"] for h in result.history if h["epoch"] == 1)
    print(f"\nkilled worker: {recovery['epochs_lost']} finished epoch(s) lost, "
          f"{recovery['recovery_seconds']} s from the last epoch to training again, "
          f"{resumed_end - killed_at:.1f} s from the kill to the resumed epoch's end")
    # Every epoch, exactly as the fit that never failed: the checkpoint held the whole state.
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert curves(result.history) == curves(unkilled.history)
    assert result.test_accuracy == unkilled.test_accuracy
    # Every epoch has its point in MLflow's curve (a re-run epoch is logged again).
    tracking.end_run(uri, run_id)
    steps = [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(
        run_id, "val_accuracy")]
    assert set(steps) == {0, 1, 2}


def test_coordinator_never_reruns_a_finished_or_failed_phase():
    """The coordinator outlives worker-group restarts: a restarted group asks for the lowest
    unfinished phase (after -1), which must skip phases whose results the driver has already
    taken; it also records the nodes of the ranks and what a recovery cost."""
    from raykd.train.group import FitCoordinator

    c = FitCoordinator()
    for i in range(3):
        c.submit(i, [f"loop-{i}"])
    c.joined(0, 1, "node-b")
    c.joined(0, 0, "node-a")
    c.finish(0, {"weights": b"w"})
    _, result, _ = c.poll(0, 0)  # the driver takes phase 0's result
    assert result["worker_nodes"] == ["node-a", "node-b"] and result["recoveries"] == []
    assert c.next_phase(-1)["id"] == 1
    c.epoch(1, {"epoch": 0, "_ended_at": 20.0})  # checkpointed
    c.epoch(1, {"epoch": 1, "_ended_at": 21.0})  # finished, not checkpointed; then a failure
    c.resumed(1, 1, 30.5, 20.0)
    epochs, result, recoveries = c.poll(1, 0)
    assert len(epochs) == 2 and result is None
    assert recoveries == [{"resumed_epoch": 1, "epochs_lost": 1, "recovery_seconds": 9.5}]
    c.fail(1, "data.root: folder '/x' does not exist on node 10.0.0.2")
    assert c.poll(1, 2)[1] == {"error": "data.root: folder '/x' does not exist on node 10.0.0.2"}
    assert c.next_phase(-1)["id"] == 2  # the failed phase is not run again either
