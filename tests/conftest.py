"""One Ray instance for the whole test session; MLflow in a per-test sqlite file."""

from __future__ import annotations

import os
import re

import pytest

# Quiet, deterministic, and never reaching for the network.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session", autouse=True)
def same_data_default():
    """In-process tests read configs/digits_same_data.yaml where a user gets the embedded default.

    The embedded default (README command 1) learns from 10% of the labels with a 600-epoch
    teacher; the suite's tests of mechanics (caches, storage, faults, schemes) were written, and
    their floors measured, on the fully labelled split, and they keep it. Tests of the default's
    own scenario run it in a subprocess (test_e2e_distill) or take ``embedded_default``.
    Yields the real ``read_yaml``."""
    from pathlib import Path

    import raykd.config

    same_data = Path(__file__).resolve().parents[1] / "configs" / "digits_same_data.yaml"
    read = raykd.config.read_yaml
    patch = pytest.MonkeyPatch()
    patch.setattr(raykd.config, "read_yaml", lambda path: read(same_data if path is None else path))
    yield read
    patch.undo()


@pytest.fixture()
def embedded_default(same_data_default, monkeypatch):
    """This test reads the default a user gets (raykd/configs/digits.yaml), not the suite's."""
    import raykd.config

    monkeypatch.setattr(raykd.config, "read_yaml", same_data_default)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on 2 cores: a Tune trial driver and the teacher actor can sit beside two
        # training workers. Oversubscription only slows the tests, it never changes results.
        from raykd.train.fit import init_ray, local_ray_options

        init_ray(num_cpus=4, logging_level="WARNING", log_to_driver=True, **local_ray_options())
    yield ray
    ray.shutdown()


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """Run in a fresh folder: caches, Ray Train storage and mlflow.db land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def mlflow_uri(workdir):
    return f"sqlite:///{workdir / 'mlflow.db'}"


@pytest.fixture(scope="session")
def digits_teacher(ray_session, tmp_path_factory):
    """A digits teacher trained once through `raykd train-teacher` (one real Ray Train fit),
    shared by every test that only needs *a* trained teacher."""
    from raykd.cli import main

    root = tmp_path_factory.mktemp("teacher")
    out = root / "teacher" / "model.safetensors"  # --out is a folder
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rc = main(["train-teacher", "--set", "teacher.epochs=3", "--set",
                   f"tracking.uri=sqlite:///{root / 'mlflow.db'}", "--out", str(out.parent)])
    finally:
        os.chdir(cwd)
    assert rc == 0 and out.is_file()
    return out


# Ray forwards its actors' log lines to the driver's stderr ("(ActorName pid=123) ..."), and
# actors left by an earlier test can still be writing when a CLI test reads stderr.
_RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\(\w+ pid=\d+")


@pytest.fixture()
def cli_stderr(capsys):
    """Read captured stderr without the lines Ray forwarded from its actors."""
    def read() -> str:
        lines = capsys.readouterr().err.splitlines()
        return "\n".join(line for line in lines if not _RAY_FORWARDED.match(line)).strip()
    return read
