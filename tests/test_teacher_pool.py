"""The cache build as batch inference on a pool of teacher replicas (raykd/teacher/pool.py), on
the suite's Ray instance: 2 replicas build the 1-replica cache bit for bit, a built cache is
reused without a forward pass, a shard damaged on disk is recomputed alone and never served, and
a pool larger than the cluster is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raykd.config import ConfigError
from raykd.teacher.cache import CacheError, TeacherCache, check_cache
from raykd.teacher.client import CachedTeacher, TeacherHandoff
from tests.test_teacher_actor import make_cfg, save_teacher

N = 1294  # digits train split


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("pool") / "t.safetensors", 3)


def actor(cfg):
    from raykd.teacher.actor import TeacherActor

    return TeacherActor(cfg.to_dict(), [cfg.teacher.checkpoint], cfg.tracking.uri)


def manifest(stats) -> dict:
    return json.loads((Path(stats["path"]) / "manifest.json").read_text())


def test_two_replicas_build_the_one_replica_cache_bit_for_bit(ray_session, teacher, tmp_path):
    sets = {"teacher.shard_size": 500, "teacher.batch_size": 128}
    one = make_cfg(tmp_path / "one", teacher, **sets)
    two = make_cfg(tmp_path / "two", teacher, **sets, **{"teacher.replicas": 2})
    built = actor(one).ensure_cache()
    assert built["status"] == "built" and built["replicas"] == 1
    assert built["forward_samples"] == N and built["shards"] == 3
    pooled = actor(two).ensure_cache()
    assert pooled["status"] == "built" and pooled["replicas"] == 2
    assert pooled["forward_samples"] == N and pooled["key"] == built["key"]
    assert manifest(pooled)["checksums"] == manifest(built)["checksums"]  # fp32, bit for bit
    assert manifest(pooled)["shards"] == manifest(built)["shards"]
    a = np.load(Path(built["path"]) / "logits.npy")
    assert a.shape == (N, 1, 10) and np.array_equal(a, np.load(Path(pooled["path"]) /
                                                                 "logits.npy"))
    again = actor(two).ensure_cache()  # a fresh actor: verified, reused, no teacher pass
    assert again["status"] == "reused" and again["forward_samples"] == 0


def test_shard_corrupted_on_disk_is_rebuilt_alone_never_served(ray_session, teacher, tmp_path):
    cfg = make_cfg(tmp_path, teacher, **{"teacher.shard_size": 300, "teacher.replicas": 2})
    built = actor(cfg)
    first = built.ensure_cache()
    want = manifest(first)["checksums"]
    path = Path(first["path"])
    handoff = TeacherHandoff(mode="cached", table=built.cache_table(), spec=built.spec)
    before = CachedTeacher(handoff).logits(torch.arange(N))  # what a worker was served
    raw = np.load(path / "logits.npy", mmap_mode="r+")
    raw[650, 0, 3] += 0.5  # shard 2 of 5 (rows 600..899)
    raw.flush()
    del raw
    spec = actor(cfg).spec
    assert check_cache(tmp_path / "cache", spec).state == "corrupt"
    with pytest.raises(CacheError, match="corrupt"):
        TeacherCache.open(tmp_path / "cache", spec)
    worker = CachedTeacher(handoff)  # a worker reading the damaged cache from its files
    assert torch.equal(worker.logits(torch.arange(0, 600, 7)), before[0:600:7])
    with pytest.raises(ConfigError, match=r"logits.npy rows 600:900 do not match their sha256 "
                                          r"checksum; it is not served. Run `raykd cache verify"):
        worker.logits(torch.tensor([5, 650]))
    worker.close()
    repaired = actor(cfg).ensure_cache()
    assert repaired["status"] == "rebuilt" and repaired["previous"] == "corrupt"
    assert repaired["kept_shards"] == 4 and repaired["forward_samples"] == 300
    assert manifest(repaired)["checksums"] == want
    assert torch.equal(CachedTeacher(handoff).logits(torch.arange(N)), before)


def test_a_pool_larger_than_the_cluster_is_refused_in_one_line(ray_session, teacher, tmp_path):
    from raykd.teacher.service import serve_teacher

    cfg = make_cfg(tmp_path, teacher, **{"teacher.replicas": 64, "teacher.replica_cpus": 1})
    with pytest.raises(ConfigError) as err:
        serve_teacher(cfg, [cfg.teacher.checkpoint], cfg.tracking.uri)
    message = str(err.value)
    assert message.startswith("teacher.replicas: 64 teacher replicas × 1 CPU need 64 CPUs")
    assert "lower teacher.replicas" in message and "\n" not in message
    gpus = make_cfg(tmp_path, teacher, **{"teacher.replica_gpus": 1})
    from raykd.teacher.pool import check_pool_fits

    with pytest.raises(ConfigError, match="teacher.replicas: 1 teacher replicas × 1 GPU"):
        check_pool_fits(gpus, {"CPU": 4})
    for free in ({"teacher.replicas": 64},  # replica_cpus 0 (default): nothing reserved
                 {"teacher.mode": "live", "teacher.replicas": 64, "teacher.replica_cpus": 1}):
        check_pool_fits(make_cfg(tmp_path, teacher, **free), {"CPU": 4})
