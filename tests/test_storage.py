"""Storage paths resolved once in the driver, destinations checked before Ray starts, and no
password from a URI in anything raykd prints or logs. No Ray cluster here: every bad input must
stop before one starts."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from raykd import tracking
from raykd.cli import main
from raykd.config import ConfigError, load_config
from raykd.preflight import check_destinations

SECRET = "hunter2-topsecret"


@pytest.fixture()
def no_ray(monkeypatch):
    """Fail the test if anything tries to start or join Ray."""
    import ray

    import raykd.train.fit

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr(raykd.train.fit, "ensure_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_storage_paths_are_absolute_after_loading(workdir):
    cfg = load_config(None, ["train.storage_path=out", "tune.space={}"])
    assert cfg.train.storage_path == str(workdir / "out")
    assert cfg.teacher.cache_dir == str(workdir / ".raykd" / "cache")
    assert cfg.tune.storage_path == str(workdir / ".raykd" / "tune")
    assert load_config().train.storage_path == str(workdir / ".raykd" / "runs")
    uri = "s3://bucket/raykd?region=eu-west-1"
    assert load_config(None, [f"train.storage_path={uri}"]).train.storage_path == uri


def test_defaults_leave_a_ray_job_package_for_home(tmp_path, monkeypatch):
    # Where `ray job submit --working-dir` runs the entrypoint: Ray's copy of the package.
    package = tmp_path / "ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0a1b"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config()
    home = tmp_path / "home" / ".raykd"
    assert cfg.train.storage_path == str(home / "runs")
    assert cfg.teacher.cache_dir == str(home / "cache")
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{home / 'mlflow.db'}"
    # An explicit relative path still means the job's working directory.
    assert load_config(None, ["train.storage_path=x"]).train.storage_path == str(package / "x")


def test_tracking_uri_from_mlflow_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking.resolve_tracking_uri(None) == "http://mlflow.example:5000"
    assert tracking.resolve_tracking_uri("http://other:5000") == "http://other:5000"


@pytest.mark.parametrize("field", ["train.storage_path", "teacher.cache_dir"])
def test_a_file_in_the_way_stops_before_ray(field, workdir, no_ray, cli_stderr):
    (workdir / "blocker").write_text("not a folder")
    rc = main(["distill", "--set", f"{field}={workdir / 'blocker' / 'sub'}"])
    err = cli_stderr()
    assert rc == 2
    assert err.startswith(f"raykd: error: {field}: {workdir / 'blocker'} is a file, not a "
                          f"folder, so {workdir / 'blocker' / 'sub'} cannot be created; give a ")
    assert "\n" not in err


def test_a_read_only_folder_stops_before_ray(workdir, no_ray, cli_stderr):
    # sysfs refuses new files to every user, root included (chmod does not stop root).
    rc = main(["train-teacher", "--set", "train.storage_path=/sys/raykd-runs"])
    err = cli_stderr()
    assert rc == 2
    assert err.startswith("raykd: error: train.storage_path: cannot write to /sys/raykd-runs (")
    assert "\n" not in err
    assert not (workdir / "mlflow.db").exists()  # nothing half-written


def test_unreachable_tracking_server_stops_before_ray(workdir, no_ray, cli_stderr):
    port = _closed_port()
    started = time.monotonic()
    rc = main(["distill", "--set", f"tracking.uri=http://raykd:{SECRET}@127.0.0.1:{port}"])
    seconds = time.monotonic() - started
    err = cli_stderr()
    assert rc == 2
    assert err.startswith(f"raykd: error: tracking.uri: cannot reach the MLflow server at "
                          f"http://raykd:***@127.0.0.1:{port} (")
    assert SECRET not in err and "\n" not in err
    assert seconds < 30  # MLflow's own client retries for minutes


def test_storage_uris_are_probed_through_pyarrow(workdir):
    check_destinations(load_config(None, ["train.storage_path=mock://bucket/raykd"]))
    with pytest.raises(ConfigError, match=r"^train.storage_path: cannot write to nosuch://b/x"):
        check_destinations(load_config(None, ["train.storage_path=nosuch://b/x"]))
    with pytest.raises(ConfigError, match=r"^teacher.cache_dir: 's3://b/c' is a URI"):
        load_config(None, ["teacher.cache_dir=s3://b/c"])


def test_redact_masks_passwords_only():
    assert tracking.redact(f"http://u:{SECRET}@h:5000/x") == "http://u:***@h:5000/x"
    assert tracking.redact("s3://KEY:se/cr+et@bucket/p") == "s3://KEY:***@bucket/p"
    for text in ("http://127.0.0.1:5000/a", "sqlite:////tmp/m.db", "http://user@host/"):
        assert tracking.redact(text) == text


def test_logged_params_and_configs_hold_no_secret(workdir):
    """What MLflow keeps of a run — params, tags, the config artifacts, the summary — with a
    password in the tracking URI and an S3 secret key in the storage URI."""
    from mlflow.tracking import MlflowClient

    from raykd.schemes.offline import log_config

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    server = f"http://raykd:{SECRET}@mlflow.example:5000"
    (workdir / "job.yaml").write_text(f"tracking:\n  uri: {server}\n")
    cfg = load_config(workdir / "job.yaml",
                      [f"train.storage_path=s3://AKIAEXAMPLE:{SECRET}@bucket/raykd"])
    run_id = tracking.start_run(uri, "secrets", "distill")
    log_config(uri, run_id, cfg, str(workdir / "job.yaml"))
    tracking.log_params(uri, run_id, {"server": server})
    tracking.set_tags(uri, run_id, {"raykd.source": server})
    tracking.log_dict(uri, run_id, {"mlflow": {"tracking_uri": server}}, "summary.json")
    tracking.end_run(uri, run_id)

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    logged = json.dumps({"params": run.data.params, "tags": run.data.tags})
    assert SECRET not in logged
    assert run.data.params["train.storage_path"] == "s3://AKIAEXAMPLE:***@bucket/raykd"
    assert run.data.params["server"] == "http://raykd:***@mlflow.example:5000"
    files = [a.path for a in client.list_artifacts(run_id, "config")] + ["summary.json"]
    assert {"config/config.resolved.yaml", "config/job.yaml"} <= set(files)
    for path in files:
        text = Path(client.download_artifacts(run_id, path, str(workdir / "dl"))).read_text()
        assert SECRET not in text
        assert "***@" in text


def test_workers_do_not_look_for_the_drivers_files_again(tmp_path):
    """A worker or the actor re-reads the config the driver validated: a checkpoint path that
    exists only on the submitting node must not fail validation there, but fail where it is
    read, naming the field and the node."""
    from raykd.config import validate
    from raykd.teacher.loading import local_checkpoint

    missing = str(tmp_path / "elsewhere" / "teacher.safetensors")
    raw = load_config().to_dict()
    raw["teacher"]["checkpoint"] = missing
    with pytest.raises(ConfigError, match=r"^teacher.checkpoint: file .* does not exist"):
        validate(raw, check_files=True)  # the driver
    assert validate(raw).teacher.checkpoint == missing  # a worker or the actor
    with pytest.raises(ConfigError, match=r"^teacher.checkpoint: file .* does not exist on "):
        local_checkpoint(missing, "")
