"""The per-token teacher cache of language models (raykd.teacher.token_cache), in process: the
key follows every input it depends on, a damaged file is refused, shards survive the trip
through numpy (bf16 included), and the actor builds it from a Hugging Face teacher folder."""

from __future__ import annotations

import json

import pytest
import torch


from raykd.teacher.token_cache import (TokenCache, TokenCacheSpec, build_token_cache,
                                       check_token_cache, inspect_token_cache, shard_arrays,
                                       topk_from_shards, verify_token_cache)

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


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_build_open_and_shards_round_trip(tmp_path, dtype):
    from raykd.teacher.token_topk import encode_token_topk

    spec = TokenCacheSpec(**{**SPEC, "dtype": dtype})
    assert check_token_cache(tmp_path, spec).state == "missing"
    build_token_cache(tmp_path, spec, produce, batch_size=2)  # three teacher passes
    cache = TokenCache.open(tmp_path, spec)
    expected = encode_token_topk(torch.cat([produce(0, 2), produce(2, 4), produce(4, 5)]), 4,
                                 getattr(torch, dtype))
    assert torch.equal(cache.topk.values, expected.values)
    assert torch.equal(cache.topk.ids, expected.ids)
    shards = [shard_arrays(cache.topk, 0, 3), shard_arrays(cache.topk, 3, 5)]
    back = topk_from_shards(shards)
    assert back.values.dtype == getattr(torch, dtype) and back.vocab_size == 40
    assert torch.equal(back.values, cache.topk.values)
    assert torch.equal(back.ids, cache.topk.ids)
    assert torch.equal(back.tail_logmass, cache.topk.tail_logmass)
    info = inspect_token_cache(cache.path)
    assert info["tokens"] == 5 * 8 and info["dense_float32_bytes_per_token"] == 160
    assert info["bytes_per_token"] == 4 * (2 + 1) + 4  # 4 values, uint8 ids (vocab 40), tail


def test_damaged_and_stale_caches_are_refused(tmp_path):
    spec = TokenCacheSpec(**SPEC)
    path = build_token_cache(tmp_path, spec, produce, batch_size=8)
    assert verify_token_cache(path).fresh
    data = path / "token_topk.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert check_token_cache(tmp_path, spec).state == "corrupt"
    assert check_token_cache(tmp_path, spec, verify=False).fresh  # size unchanged
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
    topk = topk_from_shards([actor.shard(i) for i in range(len(actor.shard_bounds()))])
    from raykd.data import build_dataset

    train = build_dataset(cfg.data, "train")
    _, x, _ = train.get_batch(torch.arange(2))
    with torch.no_grad():
        top1 = actor.models[0](x).argmax(-1)
    assert torch.equal(topk.ids[:2, :, 0].long(), top1)  # the cached top-1 is the teacher's
    again = TeacherActor(cfg.to_dict(), [str(teacher)], "").ensure_cache()
    assert again["status"] == "reused" and again["key"] == first["key"]
