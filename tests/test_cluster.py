"""Faults and nodes with real Ray: a driver killed mid-job and rerun with ``--resume``, a
distillation whose two workers run on two nodes, and a node removed mid-fit.

The one-node runs use the session's Ray instance; the two-node cluster is built by
tests/two_node_cluster.py in a process of its own with its own Ray temp dir, so it never meets
the session's instance (a process joins one cluster only). The same config everywhere (a given
teacher, 3 epochs, checkpoints every epoch), and Ray Train's fits continue exactly from a
checkpoint, so a fit that lost a node must end where the one-node fit ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raykd.cli import main

HERE = Path(__file__).parent
EMBEDDED = HERE.parent / "raykd" / "configs" / "digits.yaml"
# data.labelled=null: the fully labelled split these floors were measured on (the embedded
# default learns 10% of the labels, README command 1)
SAME = ["--set", "data.labelled=null", "--set", "train.epochs=3", "--set", "train.num_workers=2",
        "--set", "train.checkpoint_every=1", "--set", "tracking.experiment=faults"]


def children(uri: str, parent: str) -> dict[str, list]:
    """The parent's child runs by role, oldest first."""
    from raykd import tracking

    runs = tracking.search_runs(uri, "faults", f"tags.`mlflow.parentRunId` = '{parent}'",
                                order_by=["attributes.start_time ASC"])
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags.get("raykd.role"), []).append(run)
    return out


def roles_in_store(db: Path) -> dict[str, str]:
    """{role: status} of the runs in an MLflow sqlite store, read with sqlite3 (read-only): an
    MLflow client opened while the driver creates the store would race its schema migration."""
    import sqlite3

    if not db.is_file():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute("SELECT t.value, r.status FROM runs r JOIN tags t ON "
                               "t.run_uuid = r.run_uuid AND t.key = 'raykd.role'").fetchall()
    except sqlite3.Error:  # not created yet
        return {}
    return dict(rows)


def wait_for_baseline_running(db: Path, proc, timeout_s: float = 900) -> None:
    """Wait until the student fit has FINISHED and the baseline fit is RUNNING."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        roles = roles_in_store(db)
        if roles.get("student") == "FINISHED" and roles.get("baseline") == "RUNNING":
            return
        time.sleep(0.2)
    raise AssertionError(f"the baseline fit never ran while the driver lived (rc {proc.poll()})")


@pytest.fixture(scope="module")
def one_node(ray_session, digits_teacher, tmp_path_factory):
    """`raykd distill --baseline` in its own process, SIGKILLed while the baseline trains (the
    student has finished), then `raykd distill --baseline --resume` here."""
    root = tmp_path_factory.mktemp("resume")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # The config named for both drivers: the suite's in-process default (conftest) is not the
    # embedded one a subprocess reads, and a resume finds its run by the config's key.
    args = ["--baseline", "--config", str(EMBEDDED), "--set",
            f"teacher.checkpoint={digits_teacher}", *SAME, "--set", f"tracking.uri={uri}"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with (root / "killed.txt").open("w") as console:
        proc = subprocess.Popen([sys.executable, "-m", "raykd.cli", "distill", *args], cwd=root,
                                env=env, stdout=console, stderr=subprocess.STDOUT)
        try:
            wait_for_baseline_running(root / "mlflow.db", proc)
            proc.kill()  # SIGKILL: no handler runs, the runs stay RUNNING in MLflow
        finally:
            proc.kill()
            proc.wait(timeout=60)
    from raykd import tracking

    [parent] = tracking.search_runs(uri, "faults", "tags.`raykd.scheme` = 'offline'")
    before = children(uri, parent.info.run_id)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rc = main(["distill", "--resume", *args, "--summary", str(root / "s.json")])
    finally:
        os.chdir(cwd)
    assert rc == 0
    summary = json.loads((root / "s.json").read_text())
    return {"uri": uri, "parent": parent.info.run_id, "before": before, "summary": summary}


def test_killed_driver_resumes_keeping_its_finished_fits(one_node):
    from raykd import tracking

    uri, summary, before = one_node["uri"], one_node["summary"], one_node["before"]
    # The same parent run continues; the student it finished is read back, not retrained.
    assert summary["mlflow"]["run_id"] == one_node["parent"]
    assert summary["resumed"] == ["student"]
    student = before["student"][0]
    assert student.info.status == "FINISHED"
    assert summary["student"]["run_id"] == student.info.run_id
    assert summary["student"]["accuracy"] == student.data.metrics["test_accuracy"]
    assert summary["student"]["resumed"] is True
    # The baseline the dead driver left RUNNING is KILLED, never FINISHED; a new one finished.
    after = children(uri, one_node["parent"])
    killed, rerun = after["baseline"]
    assert killed.info.run_id == before["baseline"][0].info.run_id
    assert killed.info.status == "KILLED"
    assert rerun.info.status == "FINISHED"
    assert summary["baseline"]["run_id"] == rerun.info.run_id
    assert len(after["student"]) == 1  # no second student run
    parent = tracking.client(uri).get_run(one_node["parent"])
    assert parent.info.status == "FINISHED"
    assert summary["baseline"]["epochs"] == 3 and summary["baseline"]["accuracy"] > 0.75
    assert summary["cluster"]["nodes"] == 1 and summary["cluster"]["worker_nodes"] == 1


@pytest.fixture(scope="module")
def two_nodes(digits_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-nodes")
    # Short: Ray's socket paths live under it (a Unix socket path has ~107 characters).
    ray_tmp = tempfile.mkdtemp(prefix="rk2n-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    out = root / "report.json"
    with (root / "console.txt").open("w") as console:
        proc = subprocess.run(
            [sys.executable, str(HERE / "two_node_cluster.py"), str(root), str(digits_teacher),
             str(out), *SAME, "--set", f"tracking.uri=sqlite:///{root / 'mlflow.db'}"],
            env=env, stdout=console, stderr=subprocess.STDOUT, timeout=1500)
    console_tail = (root / "console.txt").read_text()[-4000:]
    assert proc.returncode == 0 and out.is_file(), console_tail
    report = json.loads(out.read_text())
    assert report.get("distill_rc") == 0, console_tail
    return report


def test_two_workers_on_two_nodes_match_the_one_node_run(two_nodes, one_node):
    summary = two_nodes["summary"]
    cluster = summary["cluster"]
    assert cluster["nodes"] == 2 and cluster["worker_nodes"] == 2
    # The teacher actor wrote the cache on one node; a worker on the other read its files.
    [teacher_node] = two_nodes["teacher_actor_nodes"]
    assert teacher_node in cluster["worker_node_ids"]
    assert [n for n in cluster["worker_node_ids"] if n != teacher_node]
    one, two = one_node["summary"]["student"]["accuracy"], summary["student"]["accuracy"]
    print(f"\nstudent test accuracy: one node {one:.4f}, two nodes {two:.4f}")
    assert abs(one - two) <= 0.02  # noise; the same seeds give the same numbers in practice


def test_a_node_removed_mid_fit_is_survived(two_nodes, one_node):
    lost = two_nodes["node_loss"]
    assert lost.get("paused") == ["ckpt-0"] and "error" not in lost, lost
    assert lost["epochs"] == [0, 1, 2]
    # SPREAD put a worker on the node that was removed (else there was nothing to survive)
    assert lost["removed_node"] in lost["workers_before"], lost
    assert len(lost["recoveries"]) == 1, lost
    [recovery] = lost["recoveries"]
    # from the first checkpoint, or the second when the workers, which do not wait for the
    # paused controller, had finished epoch 1 before they were frozen
    assert recovery["resumed_epoch"] in (1, 2), recovery
    # Restarted on the node that is left (the head) with both workers.
    assert lost["worker_nodes"] == [two_nodes["head_node"]] * 2
    assert two_nodes["alive_nodes_after"] == 1
    print(f"\nnode removed: {recovery['epochs_lost']} finished epoch(s) lost, "
          f"{recovery['recovery_seconds']} s to recover, {lost['removed_to_resumed_epoch_end']} s "
          f"from the removal to the resumed epoch's end")
    # The same config as the one-node baseline, continued from its checkpoint: the same result.
    one = one_node["summary"]["baseline"]["accuracy"]
    print(f"baseline test accuracy: one node {one:.4f}, after losing a node "
          f"{lost['test_accuracy']:.4f}")
    assert abs(lost["test_accuracy"] - one) <= 0.02


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "corrupt.safetensors").write_bytes(b"not a checkpoint")
    (tmp / "corrupt.pt").write_bytes(b"not a checkpoint either")
    (tmp / "empty").mkdir()
    return [
        (["--set", "train.num_workers=64"],
         "train.num_workers: 64 workers of 1 CPU each do not fit the Ray cluster (1 node(s), "),
        (["--set", "train.cpus_per_worker=3", "--set", "train.num_workers=2"],
         "train.num_workers: 2 workers of 3 CPU each do not fit"),
        (["--set", "train.use_gpu=true"],
         "train.use_gpu: 2 workers × 1 GPU need 2 GPUs, the cluster has 0; "),
        (["--set", f"teacher.checkpoint={tmp / 'corrupt.safetensors'}"],
         f"teacher.checkpoint: cannot read {tmp / 'corrupt.safetensors'} (SafetensorError: "),
        (["--set", f"teacher.checkpoint={tmp / 'corrupt.pt'}"],
         f"teacher.checkpoint: cannot read {tmp / 'corrupt.pt'} (UnpicklingError: "),
        (["--set", f"teacher.checkpoint={tmp / 'missing.safetensors'}"],
         f"teacher.checkpoint: file '{tmp / 'missing.safetensors'}' does not exist; "),
        (["--set", "data.name=mnist", "--set", f"data.root={tmp / 'missing'}"],
         f"data.root: folder '{tmp / 'missing'}' does not exist; "),
        (["--set", "data.name=mnist", "--set", f"data.root={tmp / 'empty'}"],
         f"data.root: no mnist dataset under {tmp / 'empty'}; "),
    ]


def test_bad_input_stops_before_training_with_one_line(ray_session, workdir, cli_stderr):
    """More workers, CPUs or GPUs than the (session's one-node, 4-CPU) cluster has, a corrupt or
    missing teacher checkpoint, a dataset that is not there: exit 2, one line, no MLflow run."""
    inputs = workdir / "inputs"
    inputs.mkdir()
    for argv, start in bad_inputs(inputs):
        assert main(["distill", *argv, "--set", "train.epochs=1"]) == 2, argv
        err = cli_stderr()
        print(err)
        assert err.startswith(f"raykd: error: {start}") and len(err.splitlines()) == 1, err
        assert not (workdir / "mlflow.db").exists()  # nothing started, nothing half-written


def test_a_file_missing_on_the_teacher_actors_node_names_the_node(ray_session, workdir):
    """Actors and workers read the paths the driver resolved and do not re-check them when they
    validate the config; a checkpoint missing on the actor's node is one line naming the node
    (here the driver never checked: ``validate`` alone does not look at files)."""
    from raykd.config import ConfigError, validate
    from raykd.teacher.service import ensure_teacher

    gone = str(workdir / "gone.safetensors")
    cfg = validate({"teacher": {"checkpoint": gone}, "tracking": {"experiment": "missing"}})
    with pytest.raises(ConfigError) as err:
        ensure_teacher(cfg, [gone], f"sqlite:///{workdir / 'mlflow.db'}")
    node = ray_session.get_runtime_context().get_node_id()
    message = str(err.value)
    assert message.startswith(f"teacher.checkpoint: file '{gone}' does not exist on node ")
    assert f"(id {node[:8]})" in message and len(message.splitlines()) == 1


def test_sigterm_ends_a_command_like_ctrl_c(monkeypatch, cli_stderr):
    """`ray job stop` sends the driver SIGTERM: it must unwind like Ctrl-C (so tracked runs end
    KILLED, not RUNNING), exit 130, and leave the process's own handler in place afterwards."""
    import signal

    from raykd import cli

    before = signal.getsignal(signal.SIGTERM)
    unwound = []

    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
        except KeyboardInterrupt:
            unwound.append(True)  # where tracked_run marks its run KILLED
            raise
        return {}

    monkeypatch.setitem(cli.COMMANDS, "losses", command)
    assert cli.main(["losses"]) == 130
    assert unwound == [True] and cli_stderr() == "raykd: interrupted"
    assert signal.getsignal(signal.SIGTERM) is before
