"""Every ``jobs/*.py`` runs from a checkout that was never installed (issue #28): a copy of
``raykd/`` and ``jobs/`` in a temp folder, run by this venv's Python with ``-S`` — no site
processing, so no ``.pth`` file and no editable-install finder — and the venv's site-packages
on PYTHONPATH (a plain path entry: the dependencies, not raykd). The only raykd the job can find
is the copy beside it, through ``jobs/_entry.py``. (`ray job submit --working-dir`: see
tests/test_submit.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p for p in (REPO / "jobs").glob("*.py") if not p.name.startswith("_"))
VERB = {"born_again": "born-again", "hinton_mnist": "hinton-mnist",
        "noisy_student": "noisy-student", "seq_kd": "seq-kd", "train_teacher": "train-teacher"}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    for folder in ("raykd", "jobs"):
        shutil.copytree(REPO / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return root


def _run_plain(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin",
           "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-S", str(script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_raykd_is_not_importable_without_the_entry(checkout, tmp_path):
    """The premise: under -S with that PYTHONPATH, no raykd is on the path by itself."""
    probe = tmp_path / "probe.py"
    probe.write_text("import raykd\n")
    proc = _run_plain(probe, cwd=tmp_path)
    assert proc.returncode == 1 and "No module named 'raykd'" in proc.stderr


def test_every_job_runs_from_a_plain_checkout(checkout, tmp_path):
    assert len(JOBS) == 8
    with ThreadPoolExecutor(4) as pool:
        procs = list(pool.map(lambda job: _run_plain(checkout / "jobs" / job.name, "--help",
                                                     cwd=tmp_path), JOBS))
    for job, proc in zip(JOBS, procs, strict=True):
        verb = VERB.get(job.stem, job.stem)
        assert proc.returncode == 0, f"{job.name}: {proc.stderr[-2000:]}"
        assert proc.stdout.startswith(f"usage: raykd {verb} "), (job.name, proc.stdout[:200])

