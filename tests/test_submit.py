"""The submission path as a user runs it: a Ray head node of its own (`ray start --head`, token
auth), an `mlflow server` on loopback (sqlite backend, artifact root in a temp folder), then
`ray job submit --working-dir . -- python jobs/distill.py`, the tracking URI in the job's
runtime env; the runs are read back from the server. Every job goes in through the one shared
entry, jobs/_entry.py (tests/test_jobs_entry.py runs them all from an uninstalled checkout), so
this one submission covers that entry under `ray job submit`.

Isolated from the suite's Ray instance (tests/conftest.py), which keeps working in the same
session: the head node has its own temp dir (`ray.init()` with no address reads the *default*
temp dir's ray_current_cluster, so it never finds this one), its own ports and its own token
file, and the test stops only the processes it started, by process group and by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECRET = "s3cr3t-" + uuid.uuid4().hex[:8]  # the tracking server password the job is given


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process group started for ``proc`` (it was started in a session of its
    own), then SIGKILL what is left after 15 s."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _kill_leftovers(marker: str) -> None:
    """Ray puts each worker in a process group of its own and renames it (ray::...): end, by
    PID, any process still writing its console to this test's Ray folder or running in it."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            seen = [os.readlink(proc / "cwd"), os.readlink(proc / "fd" / "1"),
                    os.readlink(proc / "fd" / "2"), (proc / "cmdline").read_bytes().decode(
                        errors="replace")]
        except OSError:
            continue
        if int(proc.name) != os.getpid() and any(marker in s for s in seen):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


class Cluster:
    """A head node and an MLflow server, started by this test and stopped by it."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"  # the job's ~: its default ~/.raykd lands here
        self.home.mkdir()
        self.token = root / "token"
        self.token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        self.head: subprocess.Popen | None = None
        self.mlflow: subprocess.Popen | None = None
        self.gcs = self.dashboard = self.mlflow_port = 0

    @property
    def env(self) -> dict[str, str]:
        """The environment of every Ray command here. Not os.environ's Ray address: this
        process may be connected to the suite's cluster. RAY_API_SERVER_ADDRESS: Ray Train's
        placement-group cleaner otherwise scans the machine for clusters and gives up when it
        finds more than one (this one and the suite's)."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")}
        env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HOME=str(self.home),
                   RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token),
                   RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{self.dashboard}",
                   RAY_USAGE_STATS_ENABLED="0")
        return env

    def start_mlflow(self) -> None:
        (self.mlflow_port,) = _free_ports(1)
        log = (self.root / "mlflow.log").open("w")
        self.mlflow = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # MLflow 3's server also starts a huey job runner (about ten processes) for its
            # job-execution feature, which raykd does not use: on 2 cores it only costs time
            env={**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

    def start_head(self, attempts: int = 3) -> None:
        """`ray start --head --block` in a session of its own. Its raylet must register within
        Ray's fixed 30 s: on an overloaded machine that can fail, so it is retried."""
        for attempt in range(attempts):
            ports = _free_ports(8)
            self.gcs, self.dashboard = ports[0], ports[1]
            log_path = self.root / f"head{attempt}.log"
            self.head = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
                 "--temp-dir", str(self.root / "ray"), "--node-ip-address", "127.0.0.1",
                 "--port", str(ports[0]), "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(ports[1]), "--ray-client-server-port", str(ports[2]),
                 "--node-manager-port", str(ports[3]), "--object-manager-port", str(ports[4]),
                 "--dashboard-agent-listen-port", str(ports[5]),
                 "--runtime-env-agent-port", str(ports[6]),
                 "--metrics-export-port", str(ports[7]), "--num-cpus", "4"],
                stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                env=self.env)
            deadline = time.monotonic() + 300  # Ray gives up itself after its 30 s window
            while time.monotonic() < deadline and self.head.poll() is None:
                if "Ray runtime started" in log_path.read_text():
                    return
                time.sleep(0.5)
            print(f"head node start {attempt + 1} failed: {log_path.read_text()[-300:]}")
            _stop(self.head)
            _kill_leftovers(str(self.root / "ray"))
        raise RuntimeError(f"the head node did not start: {log_path.read_text()[-2000:]}")

    def wait_mlflow(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                # A store request, not /health: the server creates its store on the first.
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.mlflow_port}/api/2.0/mlflow/experiments/"
                        f"get-by-name?experiment_name=Default", timeout=60):
                    return
            except OSError:
                assert self.mlflow.poll() is None, (self.root / "mlflow.log").read_text()[-2000:]
                time.sleep(0.5)
        raise RuntimeError("the MLflow server did not answer")

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> None:
        _stop(self.head)
        _stop(self.mlflow)
        _kill_leftovers(str(self.root / "ray"))


@pytest.fixture(scope="module")
def submitted():
    """One job submitted to a fresh head node; the checks below read what it left."""
    # A short path: Ray's socket paths (<temp>/session_*/sockets/...) must stay under 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rkd-", dir="/tmp"))
    cluster = Cluster(root)
    try:
        t0 = time.monotonic()
        cluster.start_mlflow()
        cluster.start_head()
        t1 = time.monotonic()
        cluster.wait_mlflow()
        t2 = time.monotonic()
        job_id = f"raykd-test-{uuid.uuid4().hex[:8]}"
        tracking = f"http://raykd:{SECRET}@127.0.0.1:{cluster.mlflow_port}"
        storage = root / "storage"
        started = time.monotonic()
        submit = cluster.ray(
            "job", "submit", "--address", f"http://127.0.0.1:{cluster.dashboard}",
            "--submission-id", job_id, "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": tracking}}),
            # the fully labelled digits job, which the floors below were measured on
            "--", "python", "jobs/distill.py", "--config", "configs/digits_same_data.yaml",
            "--set", "train.epochs=1",
            "--set", "teacher.epochs=1", "--set", "train.num_workers=1",
            "--set", f"train.storage_path=file://{storage}",
            "--set", "tracking.experiment=submitted", timeout=600)
        seconds = time.monotonic() - started
        print("seconds:", {"head": round(t1 - t0, 1), "mlflow": round(t2 - t0, 1),
                           "job": round(seconds, 1)})
        status = cluster.ray("job", "status", "--address",
                             f"http://127.0.0.1:{cluster.dashboard}", job_id)
        logs = cluster.ray("job", "logs", "--address",
                           f"http://127.0.0.1:{cluster.dashboard}", job_id).stdout
        yield {"submit": submit, "job_id": job_id, "status": status.stdout + status.stderr,
               "logs": logs, "cluster": cluster, "storage": storage}
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_job_succeeds(submitted):
    submit = submitted["submit"]
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
    assert f"Job '{submitted['job_id']}' succeeded" in submitted["status"], submitted["status"]


def test_runs_read_back_from_the_server(submitted):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"http://127.0.0.1:{submitted['cluster'].mlflow_port}")
    exp = client.get_experiment_by_name("submitted")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_name for r in parents] == ["distill"]
    parent = parents[0]
    children = {r.info.run_name: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"teacher", "student"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    # One epoch each. Floors under what the same job measured run through the CLI directly
    # (jobs/distill.py with this config and these --set values, 2026-12-07, 2 cores: teacher
    # 0.9331, student 0.5682 — T=4, alpha 0.9 learns slowly in one epoch); chance is 0.1.
    assert children["teacher"].data.metrics["test_accuracy"] > 0.85
    assert children["student"].data.metrics["test_accuracy"] > 0.48
    assert parent.data.params["train.epochs"] == "1"
    # The artifacts went to the server's artifact root, not to a path on the job's node.
    files = {a.path for a in client.list_artifacts(children["student"].info.run_id)}
    assert "checkpoint" in files
    root = submitted["cluster"].root / "artifacts"
    assert list(root.rglob("model.safetensors"))


def test_storage_is_where_the_driver_resolved_it(submitted):
    cluster, storage = submitted["cluster"], submitted["storage"]
    # Ray Train's checkpoints and the fits' weights under train.storage_path (a file:// URI) ...
    assert list(storage.glob("*/checkpoint_*")), sorted(p.name for p in storage.iterdir())
    assert {p.parent.name.split("-")[0] for p in storage.glob("*/model.safetensors")} == {
        "teacher", "student"}
    # ... the teacher cache under the default root, which inside a job package is ~/.raykd ...
    assert list((cluster.home / ".raykd" / "cache").glob("*/manifest.json"))
    # ... and nothing in Ray's unpacked copy of the package, which Ray owns and deletes.
    packages = list((cluster.root / "ray").glob(
        "session_*/runtime_resources/working_dir_files/_ray_pkg_*"))
    assert packages
    for package in packages:
        assert not (package / ".raykd").exists() and not (package / "mlflow.db").exists()


def test_nothing_secret_is_logged_or_printed(submitted):
    from mlflow.tracking import MlflowClient

    cluster = submitted["cluster"]
    token = cluster.token.read_text().strip()
    printed = submitted["logs"] + submitted["submit"].stdout + submitted["submit"].stderr
    assert SECRET not in printed and token not in printed
    client = MlflowClient(f"http://127.0.0.1:{cluster.mlflow_port}")
    exp = client.get_experiment_by_name("submitted")
    runs = client.search_runs([exp.experiment_id])
    assert runs
    for run in runs:
        logged = json.dumps({"params": run.data.params, "tags": run.data.tags})
        assert SECRET not in logged and token not in logged
    parent = next(r for r in runs if r.info.run_name == "distill")
    assert parent.data.params["tracking.uri"] == (
        f"http://raykd:***@127.0.0.1:{cluster.mlflow_port}")
    for path in ("config/config.resolved.yaml", "summary.json"):
        text = Path(client.download_artifacts(parent.info.run_id, path)).read_text()
        assert SECRET not in text and token not in text


def test_a_job_runs_from_a_plain_checkout_through_ray_job_submit(submitted, tmp_path):
    """The shared entry (jobs/_entry.py) under `ray job submit --working-dir`, from a folder
    holding only `raykd/` and `jobs/` — no pyproject, nothing installed from it."""
    cluster = submitted["cluster"]
    checkout = tmp_path / "checkout"
    for folder in ("raykd", "jobs"):
        shutil.copytree(REPO / folder, checkout / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    job_id = f"raykd-entry-{uuid.uuid4().hex[:8]}"
    address = f"http://127.0.0.1:{cluster.dashboard}"
    submit = cluster.ray("job", "submit", "--address", address, "--submission-id", job_id,
                         "--working-dir", str(checkout), "--", "python", "jobs/online.py",
                         "--help", timeout=300)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    logs = cluster.ray("job", "logs", "--address", address, job_id).stdout
    assert "usage: raykd online" in logs and "--scheme {dml,one,byot,codistill}" in logs, logs
