"""The per-token teacher cache of language models (raykd.teacher.token_cache): the key follows
every input it depends on, a damaged file is refused, the workers' reader gives back exactly the
encoded rows (bf16 included), the actor builds it from a Hugging Face teacher folder, and a pool
of 2 replicas builds the 1-replica cache bit for bit, then reuses it without a teacher pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


from raykd.teacher.client import TeacherHandoff, TokenCachedTeacher
from raykd.teacher.token_cache import (TokenCache, TokenCacheSpec, build_token_cache,
                                       check_token_cache, inspect_token_cache, verify_token_cache)

SPEC = dict(teacher_fingerprint="t" * 64, dataset_identity="text|x", corpus_sha256="c" * 64,
            tokenizer_sha256="k" * 64, block_size=8, num_samples=5, num_classes=40, topk=4)


def produce(start, end):
    g = torch.Generator().manual_seed(start)
    return torch.randn(end - start, 8, 40, generator=g) * 3


@pytest.mark.parametrize("field, value", [("teacher_fingerprint", "u" * 64),
                                          ("tokenizer_sha256", "j" * 64),
                                          ("corpus_sha256", "d" * 64), ("block_size", 16),
                                          ("topk", 8), ("dtype", "bfloat16")])
def test_key_changes_with_every_input(field, value):
    assert TokenCacheSpec(**SPEC).key() != TokenCacheSpec(**{**SPEC, field: value}).key()


def reader_of(cache) -> TokenCachedTeacher:
    """What a worker builds from the handoff: rows read from the shard files."""
    return TokenCachedTeacher(TeacherHandoff(mode="cached", table=cache.table(), spec=cache.spec,
                                             per_token=True))


def same_topk(a, b) -> bool:
    return (a.vocab_size == b.vocab_size and a.values.dtype == b.values.dtype
            and a.ids.dtype == b.ids.dtype and torch.equal(a.values, b.values)
            and torch.equal(a.ids, b.ids) and torch.equal(a.tail_logmass, b.tail_logmass))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_build_open_and_read_rows_back(tmp_path, dtype):
    from raykd.teacher.token_topk import encode_token_topk, slice_rows

    spec = TokenCacheSpec(**{**SPEC, "dtype": dtype})
    assert check_token_cache(tmp_path, spec).state == "missing"
    # three teacher passes, in shards of 3 blocks (3 + 2)
    build_token_cache(tmp_path, spec, produce, batch_size=2, shard_size=3)
    cache = TokenCache.open(tmp_path, spec)
    expected = encode_token_topk(torch.cat([produce(0, 2), produce(2, 3), produce(3, 5)]), 4,
                                 getattr(torch, dtype))
    assert cache.table().bounds == [(0, 3), (3, 5)]
    assert same_topk(cache.read(torch.arange(5)), expected)
    teacher = reader_of(cache)
    for idx in (torch.tensor([4, 0, 4, 2]), torch.randperm(5), torch.tensor([3])):
        got = teacher.topk(idx)
        assert same_topk(got, slice_rows(expected, idx)) and got.values.dtype == getattr(torch,
                                                                                      dtype)
    teacher.prefetch(torch.tensor([1, 2]))
    assert same_topk(teacher.topk(torch.tensor([1, 2])), slice_rows(expected, [1, 2]))
    assert teacher.reader.verified_bytes == 5 * 8 * (4 * (2 + 1) + 4)  # every shard, once
    teacher.close()
    info = inspect_token_cache(cache.path)
    assert info["tokens"] == 5 * 8 and info["dense_float32_bytes_per_token"] == 160
    assert info["bytes_per_token"] == 4 * (2 + 1) + 4  # 4 values, uint8 ids (vocab 40), tail
    assert info["measured_bytes_per_token"] == info["bytes_per_token"]


def test_damaged_and_stale_caches_are_refused(tmp_path):
    from raykd.config import ConfigError

    spec = TokenCacheSpec(**SPEC)
    path = build_token_cache(tmp_path, spec, produce, batch_size=8, shard_size=2)
    assert verify_token_cache(path).fresh
    teacher = reader_of(TokenCache.open(tmp_path, spec))
    data = path / "tail_logmass.npy"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # block 4: the last shard
    data.write_bytes(bytes(raw))
    assert check_token_cache(tmp_path, spec).state == "corrupt"
    assert check_token_cache(tmp_path, spec, verify=False).fresh  # size unchanged
    assert teacher.topk(torch.tensor([0, 3])).shape == (2, 8)  # intact shards still served
    with pytest.raises(ConfigError, match="tail_logmass.npy rows 4:5 do not match their "
                                          "sha256 checksum.*raykd cache verify"):
        teacher.topk(torch.tensor([4]))  # never served
    teacher.close()
    data.write_bytes(bytes(raw[:-10]))
    assert check_token_cache(tmp_path, spec, verify=False).state == "truncated"
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["spec"]["topk"] = 9
    (path / "manifest.json").write_text(json.dumps(manifest))
    status = check_token_cache(tmp_path, spec)
    assert status.state == "stale" and "topk" in status.reason
    # rebuilding replaces the damaged folder under the key
    build_token_cache(tmp_path, spec, produce, batch_size=8)
    assert check_token_cache(tmp_path, spec).fresh


def test_actor_builds_the_cache_from_a_teacher_folder(tmp_path):
    """The teacher actor, in process (no Ray): HF teacher folder → per-token cache → shards."""
    from lm_corpus import write_corpus, write_teacher

    from raykd.config import load_config
    from raykd.teacher.actor import TeacherActor

    corpus = write_corpus(tmp_path / "c.txt", sentences=200)
    teacher = write_teacher(tmp_path / "teacher", corpus, steps=0)
    cfg = load_config(None, ["data.name=text", f"data.path={corpus}", "data.block_size=16",
                             f"data.tokenizer={teacher}", "teacher.name=hf_causal_lm",
                             f"teacher.checkpoint={teacher}", "teacher.topk=8",
                             f"teacher.cache_dir={tmp_path / 'cache'}"])
    actor = TeacherActor(cfg.to_dict(), [str(teacher)], "")
    first = actor.ensure_cache()
    assert first["status"] == "built" and first["per_token"] and first["topk"] == 8
    assert first["bytes_per_token"] == 8 * (2 + 2) + 4  # vocab 300: int16 ids
    from raykd.data import build_dataset

    topk = TokenCachedTeacher(TeacherHandoff(mode="cached", table=actor.cache_table(),
                                             spec=actor.spec, per_token=True)).topk(
        torch.arange(2))
    train = build_dataset(cfg.data, "train")
    _, x, _ = train.get_batch(torch.arange(2))
    with torch.no_grad():
        top1 = actor.models[0](x).argmax(-1)
    assert torch.equal(topk.ids[:, :, 0].long(), top1)  # the cached top-1 is the teacher's
    again = TeacherActor(cfg.to_dict(), [str(teacher)], "").ensure_cache()
    assert again["status"] == "reused" and again["key"] == first["key"]


def test_two_replicas_build_the_one_replica_token_cache_bit_for_bit(ray_session, tmp_path):
    """teacher.replicas = 2: the per-token cache is built on the Ray Data pool, shard by shard,
    and equals the one the actor builds alone (float32, every array byte for byte); a fresh
    actor then reuses it without a teacher pass, and a worker reads it row by row."""
    import numpy as np
    from lm_corpus import write_corpus, write_teacher

    from raykd.config import load_config
    from raykd.teacher.actor import TeacherActor

    corpus = write_corpus(tmp_path / "c.txt", sentences=200)
    teacher = write_teacher(tmp_path / "teacher", corpus, steps=0)

    def cfg(folder: str, replicas: int):
        return load_config(None, [
            "data.name=text", f"data.path={corpus}", "data.block_size=16",
            f"data.tokenizer={teacher}", "teacher.name=hf_causal_lm",
            f"teacher.checkpoint={teacher}", "teacher.topk=8", "teacher.cache_dtype=float32",
            "teacher.shard_size=24", "teacher.batch_size=8", f"teacher.replicas={replicas}",
            f"teacher.cache_dir={tmp_path / folder}"])

    def build(c):
        return TeacherActor(c.to_dict(), [str(teacher)], "").ensure_cache()

    one, two = build(cfg("one", 1)), build(cfg("two", 2))
    n = one["num_samples"]
    assert one["status"] == two["status"] == "built" and two["replicas"] == 2
    assert n > 24 and two["shards"] == -(-n // 24)  # several shards
    assert one["forward_samples"] == two["forward_samples"] == n
    assert one["key"] == two["key"] and one["dtype"] == "float32"
    manifests = [json.loads((Path(s["path"]) / "manifest.json").read_text())
                 for s in (one, two)]
    assert manifests[0]["checksums"] == manifests[1]["checksums"]
    assert manifests[0]["shards"] == manifests[1]["shards"]
    for name in ("values", "ids", "tail_logmass"):
        a, b = (np.load(Path(s["path"]) / f"{name}.npy") for s in (one, two))
        assert a.shape[:2] == (n, 16) and np.array_equal(a, b)
    again = build(cfg("two", 2))
    assert again["status"] == "reused" and again["forward_samples"] == 0
    spec = TokenCacheSpec(**manifests[1]["spec"])
    reader = reader_of(TokenCache.open(tmp_path / "two", spec))
    idx = torch.randperm(n)[:10]
    got = reader.topk(idx)
    want = TokenCache.open(tmp_path / "one", spec).read(idx)
    assert same_topk(got, want) and got.values.dtype == torch.float32
    reader.close()
