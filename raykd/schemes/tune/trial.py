"""The Tune trial side of `raykd tune`: one Ray Train run of the student per trial.

Reports reach Tune through Ray's own Train-in-Tune integration: the trial launches the Train
run with :class:`ray.tune.integration.ray_train.TuneReportCallback`, which hands each epoch's
rank-0 ``ray.train.report`` metrics to the trial, so schedulers (ASHA) see every epoch; the
metrics carry ``checkpoint_path``, where Train keeps the report's checkpoint, and the search
reads its best trial's weights from there. A trial a scheduler stops ends with its actor, and
the Train run it owns with it (Train's placement-group cleaner frees the workers' resources).

PBT is the exception: it exploits and restores *Tune* checkpoints, and the integration hands
Tune only a checkpoint's path, never a checkpoint (Ray 2.60; a PBT trial would log "no
checkpoint for trial ... Skip exploit" forever). Under PBT each report and its checkpoint come
to the trial through :class:`CheckpointRelay` instead, and the trial reports both with
``tune.report``; Tune copies the checkpoint into its own storage.

A trial whose MLflow run had already finished (before an interrupted search was resumed) replays
its recorded curve to Tune instead of training again.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

from raykd import tracking
from raykd.config import RaykdConfig, validate
from raykd.train.fit import fit

TRIAL_ROLE = "trial"
CHECKPOINT_TAG = "raykd.checkpoint_path"  # the Train checkpoint of a finished trial's last epoch


try:
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - Train V1 API
    _UserCallback = object


class CheckpointRelay(_UserCallback):
    """PBT only. Train V2 callback (on the Train controller): pass each report's rank-0 metrics
    and its checkpoint (in Train's storage) to the trial, then wait until the trial has reported
    them to Tune, which copies the checkpoint: Train registers the next report's checkpoint, and
    deletes this one, only after this call returns. (The workers do not wait: they can train an
    epoch or two past a report before PBT pauses the trial.)"""

    def __init__(self, reports, acks):
        self.reports, self.acks = reports, acks

    def after_report(self, run_context, metrics, checkpoint):
        try:
            self.reports.put((dict(metrics[0]), checkpoint))
            self.acks.get(timeout=3600)
        except Exception:  # noqa: BLE001 - the trial is gone; its end takes this run with it
            pass


def _find_child(uri: str, experiment: str, parent: str, trial_id: str):
    runs = tracking.search_runs(uri, experiment, f"tags.mlflow.parentRunId = '{parent}' and "
                                                 f"tags.`raykd.trial_id` = '{trial_id}'",
                                max_results=5)
    return runs[0] if runs else None


def _child_run(setup: dict[str, Any], trial_id: str, cfg: RaykdConfig,
               params: dict[str, Any]) -> tuple[str, str | None]:
    """This trial's MLflow child run: found again after a resume or a PBT restart, else made."""
    uri, experiment, parent = setup["tracking_uri"], setup["experiment"], setup["parent"]
    found = _find_child(uri, experiment, parent, trial_id)
    if found is not None:
        if found.info.status != "FINISHED":
            tracking.client(uri).update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, found.info.status
    short = ",".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in params.items())
    run_id = tracking.start_run(uri, experiment, f"trial {trial_id.split('_')[-1]} {short}"[:240],
                                parent, {"raykd.role": TRIAL_ROLE, "raykd.trial_id": trial_id,
                                         "raykd.search": setup["search_name"]})
    tracking.log_params(uri, run_id, cfg.applicable(uri))
    return run_id, None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _replay(uri: str, run_id: str, checkpoint) -> None:
    """Report a finished trial's recorded curve to Tune: it finished before the search was
    interrupted, or PBT paused it at its last report. Epochs before ``checkpoint`` (the one Tune
    restored the trial from) were reported already; a trial with nothing left just ends."""
    from ray import tune

    c = tracking.client(uri)
    run = c.get_run(run_id)
    curves = {n: {m.step: m.value for m in c.get_metric_history(run_id, n)}
              for n in run.data.metrics}
    start = _checkpoint_epoch(checkpoint)
    steps = [s for s in sorted(curves.get("val_accuracy", {})) if s >= start]
    for i, step in enumerate(steps):
        row = {n: v[step] for n, v in curves.items() if step in v}
        row.update(epoch=step, replayed=1)
        last = i + 1 == len(steps)
        if last and checkpoint is None and CHECKPOINT_TAG in run.data.tags:
            row["checkpoint_path"] = run.data.tags[CHECKPOINT_TAG]  # as TuneReportCallback
        tune.report(row, checkpoint=checkpoint if last else None)


def tune_trial(config: dict[str, Any], setup: dict[str, Any], handoff: Any) -> None:
    """The Tune function trainable: one Ray Train run of the student with this trial's values."""
    from ray import tune

    keys = setup["keys"]
    params = {k: config[k] for k in keys if k in config}
    cfg = validate(setup["config"]).with_overrides(params)
    pbt = setup["scheduler"] == "pbt"
    if pbt and not cfg.train.checkpoint_every:
        # PBT exploits a better trial's checkpoint every perturbation interval: keep one there.
        cfg = cfg.with_overrides({"train.checkpoint_every": cfg.tune.grace_period
                                  if cfg.tune else 1})
    trial_id = tune.get_context().get_trial_id()
    uri = setup["tracking_uri"]
    run_id, status = _child_run(setup, trial_id, cfg, params)
    resume_from = tune.get_checkpoint()  # a resumed trial, or PBT's exploited checkpoint
    if status == "FINISHED":
        _replay(uri, run_id, resume_from)
        return
    start = _checkpoint_epoch(resume_from)
    if start >= cfg.train.epochs:  # restored at the end (PBT): nothing left to train
        tracking.end_run(uri, run_id)
        return
    if pbt:  # PBT changes values mid-run: keep their schedule
        tracking.log_metrics(uri, run_id, {f"pbt.{k}": v for k, v in params.items()
                                           if isinstance(v, int | float)}, step=start)
    run = {"tracking_uri": uri, "run_id": run_id, "teacher": handoff,
           "name": f"trial-{trial_id}-{uuid.uuid4().hex[:6]}",
           "storage_path": setup["train_storage"], "resume_from": resume_from}
    if pbt:
        _fit_relaying_checkpoints(cfg, run)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    try:
        result = fit(cfg, "student", callbacks=[TuneReportCallback()], **run)
    except Exception:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    # Tune had this run's last report before the run ended; a scheduler that stops the trial
    # there (ASHA at max_t) ends it before these lines, and the search closes its MLflow run.
    # The tag lets a resumed search replay this trial with its checkpoint.
    if result.train_checkpoint is not None:
        tracking.set_tags(uri, run_id, {CHECKPOINT_TAG: result.train_checkpoint.path})
    tracking.end_run(uri, run_id)


def _fit_relaying_checkpoints(cfg: RaykdConfig, run: dict[str, Any]) -> None:
    """PBT: the Train run in a thread; its reports (via :class:`CheckpointRelay`) go to Tune
    with their checkpoints from here, so PBT can exploit and restore them."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    uri, run_id = run["tracking_uri"], run["run_id"]
    reports = Queue(actor_options={"num_cpus": 0})
    acks = Queue(actor_options={"num_cpus": 0})
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fit(cfg, "student", callbacks=[CheckpointRelay(reports, acks)], **run)
        except BaseException as err:  # noqa: BLE001 - re-raised in the trial below
            box["error"] = err

    thread = threading.Thread(target=work, name="raykd-trial-fit", daemon=True)
    thread.start()
    while True:
        try:
            metrics, checkpoint = reports.get(timeout=0.5)
        except Empty:
            if thread.is_alive() or not reports.empty():
                continue
            break
        metrics = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        last = int(metrics.get("epoch", 0)) + 1 >= cfg.train.epochs
        if last:
            # Let the Train run shut down cleanly first — Tune may stop the trial at this
            # report — then close the MLflow run, then report.
            acks.put(True)
            thread.join()
            if "error" in box:
                break
            tracking.end_run(uri, run_id)
        if checkpoint is not None:
            checkpoint = tune.Checkpoint(checkpoint.path, checkpoint.filesystem)
        # Raises (SystemExit) when PBT pauses or stops this trial: the trial's actor ends, and
        # the Train run it owns with it.
        tune.report(metrics, checkpoint=checkpoint)
        if not last:
            acks.put(True)
    thread.join()
    if "error" in box:
        tracking.end_run(uri, run_id, "FAILED")
        raise box["error"]


def _checkpoint_epoch(checkpoint) -> int:
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        state = Path(d) / "state.json"
        return json.loads(state.read_text())["epoch"] + 1 if state.is_file() else 0
