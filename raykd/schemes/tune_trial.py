"""The Tune trial side of `raykd tune`: one Ray Train run of the student per trial.

Per-epoch results reach Tune through :class:`ReportRelay`, a Train ``UserCallback`` on the Train
controller that hands each report (and a copy of its checkpoint) to the trial, which calls
``tune.report`` — so ASHA sees every epoch, and Tune holds checkpoints for PBT and for resuming.
A trial whose MLflow run had already finished (before an interrupted search was resumed) replays
its recorded curve to Tune instead of training again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

from raykd import tracking
from raykd.config import RaykdConfig, validate

TRIAL_ROLE = "trial"


try:
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - Train V1 API
    _UserCallback = object


class ReportRelay(_UserCallback):
    """Train V2 callback (on the Train controller): pass each epoch's rank-0 metrics — and a
    copy of its checkpoint, taken before the next report can delete it — to the trial, then
    wait until the trial has handed it to Tune. The wait keeps the run in step with the
    scheduler (workers run at most an epoch or two ahead of its decision); the first item also
    carries the controller's handle, so a trial the scheduler stops can abort its run."""

    def __init__(self, queue, acks, folder: str):
        self.queue, self.acks, self.folder = queue, acks, folder
        self.sent_handle = False

    def after_report(self, run_context, metrics, checkpoint):
        import ray

        item: dict[str, Any] = {"metrics": dict(metrics[0]), "checkpoint": None}
        if checkpoint is not None:
            dest = Path(self.folder) / f"report-{uuid.uuid4().hex[:8]}"
            checkpoint.to_directory(str(dest))
            item["checkpoint"] = str(dest)
        if not self.sent_handle:
            item["controller"] = ray.get_runtime_context().current_actor
            self.sent_handle = True
        try:
            self.queue.put(item)
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


def _replay(uri: str, run_id: str) -> None:
    """Report a finished trial's recorded curve to Tune (it finished before an interruption)."""
    from ray import tune

    c = tracking.client(uri)
    names = list(c.get_run(run_id).data.metrics)
    curves = {n: {m.step: m.value for m in c.get_metric_history(run_id, n)} for n in names}
    steps = sorted(curves.get("val_accuracy", {}))
    checkpoint = tune.get_checkpoint()
    for i, step in enumerate(steps):
        row = {n: v[step] for n, v in curves.items() if step in v}
        row.update(epoch=step, epochs=step + 1, replayed=1)
        tune.report(row, checkpoint=checkpoint if i + 1 == len(steps) else None)


def tune_trial(config: dict[str, Any], setup: dict[str, Any], handoff: Any) -> None:
    """The Tune function trainable: one Ray Train run of the student with this trial's values."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    from raykd.train.fit import fit

    keys = setup["keys"]
    params = {k: config[k] for k in keys if k in config}
    cfg = validate(setup["config"]).with_overrides(params)
    if setup["scheduler"] == "pbt" and not cfg.train.checkpoint_every:
        # PBT exploits a better trial's checkpoint every perturbation interval: keep one there.
        cfg = cfg.with_overrides({"train.checkpoint_every": cfg.tune.grace_period
                                  if cfg.tune else 1})
    trial_id = tune.get_context().get_trial_id()
    uri = setup["tracking_uri"]
    run_id, status = _child_run(setup, trial_id, cfg, params)
    if status == "FINISHED":
        _replay(uri, run_id)
        return
    resume_from = tune.get_checkpoint()  # a resumed trial, or PBT's exploited checkpoint
    if setup["scheduler"] == "pbt":  # PBT changes values mid-run: keep their schedule
        start = _checkpoint_epoch(resume_from)
        tracking.log_metrics(uri, run_id, {f"pbt.{k}": v for k, v in params.items()
                                           if isinstance(v, int | float)}, step=start)
    queue = Queue(actor_options={"num_cpus": 0})
    acks = Queue(actor_options={"num_cpus": 0})
    folder = tempfile.mkdtemp(prefix="raykd-relay-")
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = fit(cfg, "student", tracking_uri=uri, run_id=run_id, teacher=handoff,
                                name=f"trial-{trial_id}-{uuid.uuid4().hex[:6]}",
                                callbacks=[ReportRelay(queue, acks, folder)],
                                storage_path=setup["train_storage"], resume_from=resume_from)
        except BaseException as err:  # noqa: BLE001 - re-raised in the trial below
            box["error"] = err

    thread = threading.Thread(target=work, name="raykd-trial-fit", daemon=True)
    thread.start()
    controller = None
    try:
        while True:
            try:
                item = queue.get(timeout=0.5)
            except Empty:
                if thread.is_alive() or not queue.empty():
                    continue
                break
            controller = item.get("controller", controller)
            metrics = {k: v for k, v in item["metrics"].items() if isinstance(v, int | float)}
            metrics["epochs"] = int(metrics.get("epoch", 0)) + 1
            last = metrics["epochs"] >= cfg.train.epochs
            if last:
                # Let the Train run shut down cleanly first — Tune may stop the trial at this
                # report — then close the MLflow run, then report.
                acks.put(True)
                thread.join()
                if "error" in box:
                    break
                tracking.end_run(uri, run_id)
            checkpoint = None
            if item["checkpoint"]:
                from ray.tune import Checkpoint

                checkpoint = Checkpoint.from_directory(item["checkpoint"])
            try:
                tune.report(metrics, checkpoint=checkpoint)
            except BaseException:  # SystemExit: the scheduler stopped (or paused) this trial
                if controller is not None and thread.is_alive():
                    controller.abort.remote()  # stop the workers now, free their resources
                raise
            if item["checkpoint"]:
                shutil.rmtree(item["checkpoint"], ignore_errors=True)
            if not last:
                acks.put(True)
        thread.join()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if "error" in box:
        tracking.end_run(uri, run_id, "FAILED")
        raise box["error"]


def _checkpoint_epoch(checkpoint) -> int:
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        state = Path(d) / "state.json"
        return json.loads(state.read_text())["epoch"] + 1 if state.is_file() else 0
