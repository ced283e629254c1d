"""Teacher soft-label cache: format, identity, integrity, atomicity, top-k (no Ray, fast)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from raykd.teacher.cache import (FORMAT_VERSION, CacheError, CacheShard, CacheSpec, TeacherCache,
                                 build_cache, check_cache, lookup, teacher_fingerprint,
                                 verify_cache)
from raykd.teacher.commands import inspect_cache
from raykd.teacher.topk import (bytes_per_row, decode_rows, encode_rows, index_dtype,
                                reconstruct_topk)

N, V, C = 37, 3, 10


def make_spec(**over) -> CacheSpec:
    base = dict(teacher_fingerprint="t" * 64, dataset_identity="synthetic:abc", split="train",
                preprocessing="none", num_samples=N, num_classes=C, views=V, dtype="float32")
    return CacheSpec(**{**base, **over})


def table(spec: CacheSpec, seed: int = 0, scale: float = 5.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.num_samples, spec.views, spec.num_classes, generator=g) * scale


def producer(logits: torch.Tensor, calls: list | None = None):
    def produce(start: int, end: int, view: int) -> torch.Tensor:
        if calls is not None:
            calls.append((start, end, view))
        with torch.inference_mode():  # as the actor does: the result is an inference tensor
            return logits[start:end, view].clone()
    return produce


def build(root, spec, logits, batch_size=8):
    return build_cache(root, spec, producer(logits), batch_size, progress=False)


# -- round trips -------------------------------------------------------------------------------
def test_fp32_round_trip_exact_across_uneven_shards(tmp_path):
    spec = make_spec()
    logits = table(spec)
    calls: list = []
    path = build_cache(tmp_path, spec, producer(logits, calls), 8, progress=False)
    assert path == tmp_path / spec.key() and (path / "manifest.json").is_file()
    assert len(calls) == V * 5 and {c[2] for c in calls} == {0, 1, 2}  # every view, 5 batches
    cache = TeacherCache.open(tmp_path, spec)
    shards = cache.shards(10)
    assert [(s.start, s.end) for s in shards] == [(0, 10), (10, 20), (20, 30), (30, 37)]
    assert [len(s) for s in shards] == [10, 10, 10, 7]
    idx = torch.tensor([36, 0, 9, 10, 29, 30, 19, 20, 5, 36])  # crosses every shard boundary
    views = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 1, 0])
    assert torch.equal(lookup(shards, idx, views), logits[idx, views])
    for v in range(V):  # an int view, and shards passed in any order
        assert torch.equal(lookup(shards[::-1], idx, v), logits[idx, v])
    assert torch.equal(cache.read(torch.arange(N), 1), logits[:, 1])
    assert lookup(shards, torch.tensor([], dtype=torch.long), 0).shape == (0, C)


@pytest.mark.parametrize("dtype,torch_dtype,rtol", [("float16", torch.float16, 1e-3),
                                                    ("bfloat16", torch.bfloat16, 8e-3)])
def test_half_precision_round_trip(tmp_path, dtype, torch_dtype, rtol):
    spec = make_spec(dtype=dtype)
    logits = table(spec)
    build(tmp_path, spec, logits)
    cache = TeacherCache.open(tmp_path, spec)
    out = lookup(cache.shards(16), torch.arange(N), torch.arange(N) % V)
    expected = logits[torch.arange(N), torch.arange(N) % V]
    assert out.dtype == torch.float32
    assert torch.equal(out, expected.to(torch_dtype).float())  # exactly one rounding, no more
    assert torch.allclose(out, expected, rtol=rtol, atol=1e-3)


def test_bfloat16_stored_as_raw_bits(tmp_path):
    spec = make_spec(dtype="bfloat16")
    logits = table(spec)
    path = build(tmp_path, spec, logits)
    raw = np.load(path / "logits.npy", allow_pickle=False)
    assert raw.dtype == np.uint16 and raw.shape == (N, V, C)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["spec"]["dtype"] == "bfloat16"
    bits = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float()
    assert torch.equal(bits, logits.to(torch.bfloat16).float())


def test_lookup_on_read_only_arrays_does_not_warn(tmp_path):
    spec = make_spec(topk=3)
    logits = table(spec)
    build(tmp_path, spec, logits)
    cache = TeacherCache.open(tmp_path, spec)
    views = cache.shards(10)  # memmap slices opened mode "r"
    copies = cache.shards(10, copy=True)
    for shard in copies:
        assert all(type(a) is np.ndarray for a in shard.arrays.values())
        for a in shard.arrays.values():
            a.setflags(write=False)  # as arrays come out of Ray's object store
    assert not any(a.flags.writeable for s in views for a in s.arrays.values()
                   if a.ndim > 1)
    # a shard rebuilt from its arrays alone (what the worker gets from ray.get) still decodes
    rebuilt = [CacheShard(start=s.start, end=s.end, arrays=dict(s.arrays)) for s in copies]
    idx = torch.tensor([3, 31, 12, 12])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = lookup(views, idx, 1)
        b = lookup(rebuilt, idx, 1)
    assert torch.equal(a, b) and a.shape == (4, C)


def test_lookup_rejects_out_of_range(tmp_path):
    spec = make_spec()
    build(tmp_path, spec, table(spec))
    shards = TeacherCache.open(tmp_path, spec).shards(10)
    with pytest.raises(IndexError):
        lookup(shards, torch.tensor([N]), 0)
    with pytest.raises(IndexError):
        lookup(shards[1:], torch.tensor([0]), 0)
    with pytest.raises(IndexError):
        lookup(shards, torch.tensor([0]), V)


# -- identity ----------------------------------------------------------------------------------
def test_fingerprint_tracks_every_weight():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    b = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    b.load_state_dict(a.state_dict())
    fa = teacher_fingerprint([a.state_dict()])
    assert fa == teacher_fingerprint([b.state_dict()]) and len(fa) == 64
    with torch.no_grad():
        b[0].weight[1, 2] += 1e-6
    assert teacher_fingerprint([b.state_dict()]) != fa
    assert teacher_fingerprint([a.state_dict(), b.state_dict()]) != \
        teacher_fingerprint([b.state_dict(), a.state_dict()])  # ensemble order matters
    as_double = {k: v.double() for k, v in a.state_dict().items()}
    assert teacher_fingerprint([as_double]) != fa  # same values, different dtype
    bf16 = {"w": torch.ones(2, dtype=torch.bfloat16)}
    assert teacher_fingerprint([bf16]) != teacher_fingerprint([{"w": torch.ones(2)}])


def test_spec_key_and_validation():
    spec = make_spec()
    assert spec.key() == make_spec().key() and len(spec.key()) == 20
    assert spec.format_version == FORMAT_VERSION
    assert make_spec(topk=C).topk is None and make_spec(topk=C + 5).key() == spec.key()
    numpy_ints = make_spec(num_samples=np.int64(N), views=np.int32(V), topk=np.int64(4))
    assert type(numpy_ints.num_samples) is int and numpy_ints.key() == make_spec(topk=4).key()
    with pytest.raises(CacheError):
        make_spec(dtype="int8")
    with pytest.raises(CacheError):
        make_spec(views=0)
    with pytest.raises(TypeError):
        CacheSpec("t", "d", "train", "none", 1, 2)  # keyword-only: no positional mix-ups


@pytest.mark.parametrize("field,value", [("teacher_fingerprint", "u" * 64),
                                         ("dataset_identity", "synthetic:other"),
                                         ("topk", 4), ("dtype", "float16")])
def test_changed_spec_is_not_served(tmp_path, field, value):
    spec = make_spec()
    assert check_cache(tmp_path, spec).state == "missing"
    build(tmp_path, spec, table(spec))
    assert check_cache(tmp_path, spec).state == "fresh"
    changed = dataclasses.replace(spec, **{field: value})
    assert changed.key() != spec.key()
    status = check_cache(tmp_path, changed)
    assert status.state == "missing" and field in status.reason  # names what changed
    # A folder under the right key whose manifest disagrees (copied by hand) is stale.
    shutil.copytree(tmp_path / spec.key(), tmp_path / changed.key())
    status = check_cache(tmp_path, changed)
    assert status.state == "stale" and field in status.reason
    with pytest.raises(CacheError, match="stale"):
        TeacherCache.open(tmp_path, changed)
    assert verify_cache(tmp_path / changed.key()).state == "stale"  # folder ≠ its spec's key
    build(tmp_path, changed, table(changed))  # a build replaces the stale folder
    assert check_cache(tmp_path, changed).state == "fresh"
    assert check_cache(tmp_path, spec).state == "fresh"  # and leaves other keys alone


# -- integrity ---------------------------------------------------------------------------------
def test_truncated_file_detected(tmp_path):
    spec = make_spec()
    path = build(tmp_path, spec, table(spec))
    file = path / "logits.npy"
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    status = check_cache(tmp_path, spec, verify=False)
    assert status.state == "truncated" and "logits.npy" in status.reason
    with pytest.raises(CacheError, match="truncated"):
        TeacherCache.open(tmp_path, spec)
    file.write_bytes(data[:40])  # cut inside the header
    assert check_cache(tmp_path, spec).state == "truncated"
    np.save(file, np.zeros((N, V, C - 1), np.float32))  # a complete file of the wrong shape
    assert check_cache(tmp_path, spec).state == "truncated"
    file.unlink()
    assert check_cache(tmp_path, spec).state == "truncated"
    assert verify_cache(path).state == "truncated"


def test_corrupt_byte_detected_and_rebuild_replaces_it(tmp_path):
    spec = make_spec(dtype="float16")
    logits = table(spec)
    path = build(tmp_path, spec, logits)
    file = path / "logits.npy"
    data = bytearray(file.read_bytes())
    data[len(data) - 7] ^= 0x01  # one bit in the data region; header and size intact
    file.write_bytes(bytes(data))
    status = check_cache(tmp_path, spec)
    assert status.state == "corrupt" and "checksum" in status.reason
    assert verify_cache(path).state == "corrupt"
    assert check_cache(tmp_path, spec, verify=False).state == "fresh"  # sizes alone can't tell
    with pytest.raises(CacheError, match="corrupt"):
        TeacherCache.open(tmp_path, spec)
    (path / "manifest.json").write_text("{not json")
    assert check_cache(tmp_path, spec).state == "corrupt"
    assert build(tmp_path, spec, logits) == path
    assert check_cache(tmp_path, spec).state == "fresh"
    assert torch.equal(TeacherCache.open(tmp_path, spec).read(torch.arange(N), 2),
                       logits[:, 2].half().float())
    assert [p.name for p in tmp_path.iterdir()] == [spec.key()]  # nothing left aside


def test_crash_inside_produce_leaves_nothing_under_the_key_and_resumes(tmp_path):
    spec = make_spec()
    logits = table(spec)

    def produce(start, end, view):
        if view == 1 and start >= 16:
            raise RuntimeError("teacher died")
        return logits[start:end, view]

    with pytest.raises(RuntimeError, match="teacher died"):  # shards 0 and 1 (of 8 rows) done
        build_cache(tmp_path, spec, produce, 8, progress=False, shard_size=8)
    assert not (tmp_path / spec.key()).exists()  # nothing under the key: only a hidden partial
    assert [p.name for p in tmp_path.iterdir()] == [f".partial-{spec.key()}"]
    assert check_cache(tmp_path, spec).state == "missing"
    for bad, match in ((lambda s, e, v: logits[s:e, v, :-1], "shape"),
                       (lambda s, e, v: logits[s:e, v] * float("nan"), "non-finite")):
        with pytest.raises(CacheError, match=match):
            build_cache(tmp_path, spec, bad, 8, progress=False, shard_size=8)
    calls: list = []
    build_cache(tmp_path, spec, producer(logits, calls), 8, progress=False, shard_size=8)
    assert sorted({c[0] for c in calls}) == [16, 24, 32]  # only the unfinished shards' batches
    assert len(calls) == 3 * V
    cache = TeacherCache.open(tmp_path, spec)  # verified: kept and new shards side by side
    for view in range(V):
        assert torch.equal(cache.read(torch.arange(N), view), logits[:, view])
    assert [p.name for p in tmp_path.iterdir()] == [spec.key()]
    half = make_spec(dtype="float16")
    with pytest.raises(CacheError, match="bfloat16"):  # 1e5 overflows float16's 65504
        build_cache(tmp_path, half, lambda s, e, v: logits[s:e, v] * 1e5, 8, progress=False)
    assert not (tmp_path / half.key()).exists()


def test_partial_shard_whose_bytes_changed_is_computed_again(tmp_path):
    from raykd.teacher.shards import ShardWriter

    spec = make_spec()
    logits = table(spec)
    writer = ShardWriter(tmp_path, spec, 10)  # an interrupted build: shards 0 and 2 finished
    for start in (0, 20):
        idx = np.arange(start, start + 10)[::-1].copy()  # rows arrive in any order: placed by index
        writer.put(idx, {"logits": logits[idx].numpy()})
    writer.close()
    partial = tmp_path / f".partial-{spec.key()}"
    assert sorted(p.name for p in (partial / "done").iterdir()) == ["0.json", "2.json"]
    data = partial / "logits.npy"
    from raykd.teacher.shards import npy_data_offset

    with open(data, "r+b") as fh:  # one flipped byte inside shard 2's rows
        fh.seek(npy_data_offset(data) + 25 * V * C * 4)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    resumed = ShardWriter(tmp_path, spec, 10)
    assert resumed.kept == [0] and resumed.missing() == [(10, 20), (20, 30), (30, 37)]
    resumed.close()
    calls: list = []
    build_cache(tmp_path, spec, producer(logits, calls), 5, progress=False, shard_size=10)
    assert {c[0] for c in calls} == set(range(10, 37, 5))
    assert torch.equal(TeacherCache.open(tmp_path, spec).read(torch.arange(N), 1), logits[:, 1])


def test_published_shard_corrupted_on_disk_is_rebuilt_alone(tmp_path):
    spec = make_spec()
    logits = table(spec)
    path = build_cache(tmp_path, spec, producer(logits), 8, progress=False, shard_size=10)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["shards"]["size"] == 10 and len(manifest["shards"]["sha256"]) == 4
    raw = np.load(path / "logits.npy", mmap_mode="r+")
    raw[33, 0, 0] += 1.0  # shard 3
    raw.flush()
    del raw
    assert check_cache(tmp_path, spec).state == "corrupt"
    with pytest.raises(CacheError, match="corrupt"):  # never served
        TeacherCache.open(tmp_path, spec)
    calls: list = []
    build_cache(tmp_path, spec, producer(logits, calls), 8, progress=False, shard_size=10)
    assert {c[0] for c in calls} == {30}  # shard 3 alone, every view
    assert torch.equal(TeacherCache.open(tmp_path, spec).read(torch.arange(N), 0), logits[:, 0])


def test_progress_bar_can_be_silenced(tmp_path, capsys):
    spec = make_spec(num_samples=8, views=1)
    build_cache(tmp_path, spec, producer(table(spec)), 4, progress=False)
    assert capsys.readouterr().err == ""
    build_cache(tmp_path / "b", spec, producer(table(spec)), 4, progress=True)
    assert spec.key() in capsys.readouterr().err


# -- top-k -------------------------------------------------------------------------------------
def test_topk_reconstruction_by_hand():
    logits = torch.tensor([[3.0, -1.0, 5.0, 0.0, 2.0, -4.0]])
    # top-2 = class 2 (5.0), class 0 (3.0); tail = mean(-1, 0, 2, -4) = -0.75
    expected = torch.tensor([[3.0, -0.75, 5.0, -0.75, -0.75, -0.75]])
    rows = encode_rows(logits, "float32", 2)
    assert rows["topk_indices"].tolist() == [[2, 0]] and rows["topk_indices"].dtype == np.uint8
    assert rows["topk_values"].tolist() == [[5.0, 3.0]] and rows["tail"].tolist() == [-0.75]
    assert torch.equal(decode_rows(rows, 6), expected)
    direct = reconstruct_topk(torch.tensor([[5.0, 3.0]]), torch.tensor([[2, 0]]),
                              torch.tensor([-0.75]), 6)
    assert torch.equal(direct, expected) and direct.dtype == torch.float32


def test_topk_cache_ratios_exact_and_tail_understated(tmp_path):
    spec = make_spec(num_samples=64, views=2, num_classes=100, topk=5)
    logits = table(spec, seed=3, scale=3.0)
    path = build(tmp_path, spec, logits, batch_size=20)
    assert sorted(p.name for p in path.glob("*.npy")) == ["tail.npy", "topk_indices.npy",
                                                          "topk_values.npy"]
    cache = TeacherCache.open(tmp_path, spec)
    assert cache.is_topk
    rec = lookup(cache.shards(25), torch.arange(64), 1)
    true = logits[:, 1]
    top = true.topk(5, dim=-1).indices
    assert torch.equal(rec.gather(1, top), true.gather(1, top))  # top-k logits are exact
    for temp in (0.5, 1.0, 4.0, 20.0):
        p_rec, p_true = (rec / temp).softmax(-1), (true / temp).softmax(-1)
        ratio_rec = p_rec.gather(1, top) / p_rec.gather(1, top[:, :1])
        ratio_true = p_true.gather(1, top) / p_true.gather(1, top[:, :1])
        assert torch.allclose(ratio_rec, ratio_true, rtol=1e-5, atol=0)
        # Jensen: a uniform tail at the mean logit never has more mass than the real tail.
        tail_rec = 1 - p_rec.gather(1, top).sum(-1)
        tail_true = 1 - p_true.gather(1, top).sum(-1)
        assert bool((tail_rec <= tail_true + 1e-6).all())
        assert bool((tail_rec < tail_true).any())  # a strict approximation, not exact


def test_topk_at_least_classes_is_dense(tmp_path):
    spec = make_spec(topk=C)
    logits = table(spec)
    build(tmp_path, spec, logits)
    cache = TeacherCache.open(tmp_path, spec)
    assert not cache.is_topk and (cache.path / "logits.npy").is_file()
    assert torch.equal(cache.read(torch.arange(N), 0), logits[:, 0])
    rows = encode_rows(logits[:, 0], "float32", C - 1)  # one tail class: its mean is itself
    assert torch.equal(decode_rows(rows, C), logits[:, 0])


def test_bytes_per_sample_dense_vs_topk(tmp_path):
    assert index_dtype(100) == np.uint8 and index_dtype(256) == np.uint8
    assert index_dtype(1000) == np.uint16 and index_dtype(70000) == np.int32
    dense, topk = bytes_per_row(100, "float16", None), bytes_per_row(100, "float16", 5)
    assert (dense, topk) == (200, 17)  # 100·2  vs  5·2 values + 5·1 indices + 2 tail
    assert dense / topk >= 10
    assert bytes_per_row(100, "float16", 4) == 14 and bytes_per_row(100, "float32", None) == 400
    for k in (None, 5):
        spec = make_spec(num_samples=50, views=2, num_classes=100, dtype="float16", topk=k)
        path = build(tmp_path, spec, table(spec))
        cache = TeacherCache.open(tmp_path, spec)
        assert cache.bytes_per_sample == (200 if k is None else 17)
        payload = sum(np.load(f, mmap_mode="r").nbytes for f in path.glob("*.npy"))
        assert payload == cache.bytes_per_sample * 50 * 2
        info = inspect_cache(path)
        assert info["bytes_per_sample"] == cache.bytes_per_sample
        assert info["dense_bytes_per_sample"] == 200 and info["key"] == spec.key()
        assert info["total_bytes"] > payload and "manifest.json" in info["files"]
    assert inspect_cache(tmp_path / make_spec(num_samples=50, views=2, num_classes=100,
                                              dtype="float16", topk=5).key())["compression"] > 10
    with pytest.raises(CacheError):
        inspect_cache(tmp_path / "nope")
