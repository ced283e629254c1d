"""docker/: what can be checked without a Docker engine or Kubernetes (none exist here).

The image must be Ray's official one at the lock file's Ray and Python, install the lock file's
versions, and copy paths that exist; the KubeRay manifest must parse and its entrypoint must be
a real job whose arguments parse and validate."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from raykd.cli import build_parser
from raykd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def _locked(name: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return next(p["version"] for p in lock["package"] if p["name"] == name)


def test_base_image_is_rays_at_the_locked_versions():
    default = re.search(r"^ARG RAY_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", DOCKERFILE, re.M)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert default == f"rayproject/ray:{_locked('ray')}-{py}-cpu"
    # the GPU variant the comments and docker/README.md tell users to build
    gpu = f"rayproject/ray:{_locked('ray')}-{py}-gpu"
    assert gpu in DOCKERFILE and gpu in (ROOT / "docker" / "README.md").read_text()


def test_the_image_installs_the_lock_files_versions():
    assert "uv export --frozen" in DOCKERFILE and "uv pip install --system" in DOCKERFILE
    # the same export the Dockerfile runs, here: it must pin what the lock pins
    out = subprocess.run(["uv", "export", "--frozen", "--no-emit-project", "--no-hashes"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    pins = dict(re.findall(r"^([a-z0-9_.-]+)==(\S+)", out, re.M))
    for pkg in ("ray", "torch", "torchvision", "mlflow", "pydantic", "safetensors"):
        assert pins[pkg] == _locked(pkg), pkg


def test_every_copied_path_exists():
    copied = [p for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", DOCKERFILE, re.M)
              for p in line.split()[:-1]]
    assert {"uv.lock", "pyproject.toml", "raykd", "jobs"} <= set(copied)
    for path in copied:
        assert (ROOT / path).exists(), path
    assert (ROOT / "docker" / "Dockerfile").is_file()


def _manifest() -> dict:
    return yaml.safe_load((ROOT / "docker" / "rayjob.yaml").read_text())


def test_rayjob_manifest_parses_and_runs_a_real_job():
    job = _manifest()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == _locked("ray")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "python" and re.fullmatch(r"jobs/\w+\.py", words[1])
    script = ROOT / words[1]
    assert script.is_file()
    verb = re.search(r'run_verb\("([\w-]+)"\)', script.read_text()).group(1)
    args = build_parser().parse_args([verb, *words[2:]])
    cfg = load_config(args.config, args.overrides)
    assert cfg.tracking.uri.startswith("http://")  # a server, not a file on one pod
    assert cfg.train.storage_path.startswith("s3://")  # checkpoints every pod reaches
    # /dev/shm is memory-backed in every pod (the object store lives there)
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for group in pods:
        spec = group["template"]["spec"]
        shm = {v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium")
               == "Memory"}
        mounts = {m["name"] for c in spec["containers"] for m in c["volumeMounts"]
                  if m["mountPath"] == "/dev/shm"}
        assert shm & mounts, group.get("groupName", "head")
        assert "object-store-memory" in group["rayStartParams"]


@pytest.mark.parametrize("bad", ["--set train.epochs=zero", "--set trian.epochs=1"])
def test_a_broken_entrypoint_would_be_caught(bad):
    # the check above is not vacuous: a manifest with a bad override fails it
    from raykd.config import ConfigError

    words = shlex.split(_manifest()["spec"]["entrypoint"]) + shlex.split(bad)
    with pytest.raises(ConfigError):
        args = build_parser().parse_args(["distill", *words[2:]])
        load_config(args.config, args.overrides)
