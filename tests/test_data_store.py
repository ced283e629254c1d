"""The row store (raykd/data/store.py, prepare.py): image folders with bad files, a prepare done
once per fingerprint, resuming and repairing shard by shard, Ray Data's prepare against the
in-process one, rows equal to the decoded images, and a reader's memory flat in the store's size."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raykd.config import ConfigError, DataConfig, validate
from raykd.data import DATASETS, build_dataset, dataset_info, prepare_data, registry
from raykd.data.prepare import prepare
from raykd.data.store import MANIFEST, read_manifest

SPLITS = ("train", "val", "test")
COLOURS = {"blue": (0, 0, 255), "green": (0, 200, 0), "red": (255, 0, 0)}


def write_images(root: Path, per_class: int = 10, seed: int = 0) -> list[Path]:
    """Noisy RGB images of varied sizes, PNG and JPEG, one folder per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for c, (name, colour) in enumerate(COLOURS.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = 10 + i % 4, 12 + (i * 3) % 5
            pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (h, w, 3)), 0, 255)
            path = root / name / f"{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            files.append(path)
    return files


def fresh_process() -> None:
    """What a new process starts with: no opened store, nothing verified."""
    registry._load.cache_clear()
    registry._VERIFIED.clear()


def folder_config(root: Path, store: Path, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), image_size=6, store_dir=str(store),
                      val_fraction=0.2, **kw)


def plan_of(cfg: DataConfig, **changes):
    plan = DATASETS[cfg.name].builder(cfg).limited(cfg.limit)
    return dataclasses.replace(plan, **changes) if changes else plan


def store_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != MANIFEST}


def test_bad_image_stops_the_prepare_or_is_skipped_and_counted(tmp_path):
    files = write_images(tmp_path / "images")
    bad = files[13]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    store = tmp_path / "store"
    cfg = folder_config(tmp_path / "images", store)
    with pytest.raises(ConfigError) as err:
        dataset_info(cfg)
    msg = str(err.value)
    assert msg.startswith("data.on_bad_file: cannot read ") and str(bad) in msg
    assert "\n" not in msg and "data.on_bad_file=skip" in msg
    assert list(store.iterdir()) == []  # nothing half-written: no store, no partial folder

    skip = cfg.model_copy(update={"on_bad_file": "skip"})
    info = dataset_info(skip)
    assert info.skipped_files == 1 and sum(info.sizes.values()) == len(files) - 1
    for split in SPLITS:  # the rest are served, each with its own class's colour
        ds = build_dataset(skip, split)
        _, x, y = ds.get_batch(torch.arange(len(ds)))
        mean = x.mean(dim=(2, 3)) * 255
        want = torch.tensor([COLOURS[n] for n in sorted(COLOURS)], dtype=torch.float32)[y]
        assert (mean - want).abs().max() < 20
    # The store that left it out is not served to a config that asks for errors.
    fresh_process()
    with pytest.raises(ConfigError, match=r"^data\.on_bad_file: the data store .* left out 1 "):
        dataset_info(cfg)


def test_prepared_once_then_opened_without_decoding(tmp_path, monkeypatch):
    files = write_images(tmp_path / "images")
    cfg = folder_config(tmp_path / "images", tmp_path / "store")
    prepare_data(cfg)
    info = dataset_info(cfg)
    first = build_dataset(cfg, "train").get_batch(torch.arange(5))[1]
    folder = registry.store_folder(cfg)

    def no_decoding(*args):
        raise AssertionError("decoded again")

    from raykd.data import imagefolder

    monkeypatch.setattr(imagefolder.ImageDecoder, "__call__", no_decoding)
    fresh_process()
    prepare_data(cfg)  # the driver's verification re-hashes, never decodes
    assert dataset_info(cfg).identity == info.identity
    assert torch.equal(build_dataset(cfg, "train").get_batch(torch.arange(5))[1], first)
    # data.labelled and data.on_bad_file do not name another store
    assert registry.store_folder(cfg.model_copy(update={"labelled": 0.5})) == folder

    os.utime(files[0], ns=(files[0].stat().st_atime_ns, files[0].stat().st_mtime_ns + 10**9))
    assert registry.store_folder(cfg) != folder  # a changed source file: another fingerprint
    files[1].write_bytes(files[1].read_bytes() + b"\0")
    other = registry.store_folder(cfg)
    assert other != folder and not other.exists()


def test_interrupted_prepare_resumes_and_a_corrupt_shard_is_rewritten(ray_session, tmp_path,
                                                                      monkeypatch):
    import raykd.data.prepare as prep

    monkeypatch.setattr(prep, "SHARD_BYTES", 40 * 4 * 4 * 4 * 4)  # 40 rows of 4x4x4 float32
    cfg = DataConfig(name="synthetic", num_samples=200, image_size=4, channels=4,
                     store_dir=str(tmp_path / "a"))
    folder = registry.store_folder(cfg)
    calls: list[tuple[str, int]] = []

    def counting(fail_at: int | None):
        plan = plan_of(cfg)

        def decode(split, items, labels):
            calls.append((split, int(items[0])))
            if len(calls) == fail_at:
                raise KeyboardInterrupt  # the driver killed mid-prepare
            return plan.decoder(split, items, labels)

        return lambda: dataclasses.replace(plan, decoder=decode)

    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, folder, counting(fail_at=4), use_ray=False)
    assert not folder.exists() and len(list((folder.parent / f".partial-{folder.name}" / "done")
                                            .iterdir())) == 3
    calls.clear()
    prepare(cfg, folder, counting(None), use_ray=False)
    shards = sum(len(read_manifest(folder)["splits"][s]["shards"]) for s in SPLITS)
    assert shards == 5 + 2 + 2 and len(calls) == shards - 3  # only the unfinished shards

    whole = DataConfig(**{**cfg.model_dump(), "store_dir": str(tmp_path / "b")})
    prepare(whole, registry.store_folder(whole), lambda: plan_of(whole), use_ray=False)
    reference = store_bytes(registry.store_folder(whole))
    assert store_bytes(folder) == reference  # resumed = prepared in one go, byte for byte

    shard = folder / "train-00002.bin"
    damaged = bytearray(shard.read_bytes())
    damaged[7] ^= 0xFF
    shard.write_bytes(bytes(damaged))  # same size: only its checksum tells
    before = {p.name: p.stat().st_ino for p in folder.glob("*.bin")}
    fresh_process()
    assert not torch.equal(build_dataset(cfg, "train").stored(torch.arange(80, 120)),
                           build_dataset(whole, "train").stored(torch.arange(80, 120)))
    fresh_process()
    prepare_data(cfg)  # the driver's open: verified; the damaged shard alone is written again
    after = {p.name: p.stat().st_ino for p in folder.glob("*.bin")}  # (by Ray Data here)
    assert [name for name in before if before[name] != after[name]] == ["train-00002.bin"]
    assert store_bytes(folder) == reference
    train = build_dataset(cfg, "train")
    assert train.checksum() == build_dataset(whole, "train").checksum()


def test_ray_data_prepare_equals_the_in_process_one(ray_session, tmp_path):
    files = write_images(tmp_path / "images", per_class=8)
    files[5].write_bytes(b"GIF89a broken")  # skipped: rows renumbered across shards
    results = {}
    for use_ray in (True, False):
        cfg = folder_config(tmp_path / "images", tmp_path / f"ray={use_ray}",
                            on_bad_file="skip")
        folder = registry.store_folder(cfg)
        prepare(cfg, folder, lambda c=cfg: plan_of(c, max_shard_rows=3), use_ray=use_ray)
        manifest = read_manifest(folder)
        assert len(manifest["splits"]["train"]["shards"]) > 2
        results[use_ray] = (store_bytes(folder), {k: manifest[k] for k in (
            "splits", "identity", "skipped_files", "build")})
    assert results[True] == results[False]
    assert results[True][1]["skipped_files"] == 1


def test_rows_equal_the_decoded_images(tmp_path):
    from PIL import Image
    from torchvision import transforms

    write_images(tmp_path / "images")
    cfg = folder_config(tmp_path / "images", tmp_path / "store")
    plan = plan_of(cfg)
    resize = transforms.Compose([transforms.Resize((6, 6), antialias=True),
                                 transforms.PILToTensor()])
    for split in SPLITS:
        ds = build_dataset(cfg, split)
        idx = torch.arange(len(ds)).flip(0)  # any order, repeats allowed
        idx = torch.cat([idx, idx[:3]])
        _, x, y = ds.get_batch(idx)
        paths = plan.splits[split].items
        want = torch.stack([resize(Image.open(paths[i]).convert("RGB")) for i in idx.tolist()])
        assert torch.equal(x, want.float() / 255)
        assert y.tolist() == plan.splits[split].labels[idx.numpy()].tolist()


def test_imagefolder_needs_image_size_and_a_writable_store(tmp_path):
    write_images(tmp_path / "images", per_class=2)
    with pytest.raises(ConfigError, match=r"^data\.image_size: .*--set data\.image_size="):
        validate({"data": {"name": "imagefolder", "root": str(tmp_path / "images")}})
    (tmp_path / "file").write_text("")
    cfg = folder_config(tmp_path / "images", tmp_path / "file" / "store")
    with pytest.raises(ConfigError, match=r"^data\.store_dir: .*is a file"):
        dataset_info(cfg)


# The reading process's peak anonymous resident memory (RssAnon, sampled after every batch): where
# rows held in memory would show. Not ru_maxrss (Linux carries it over fork and exec: the child
# would report this test process's peak) nor VmHWM (it counts the pages of torch's shared
# libraries too, which vary by tens of MB with the machine's page cache).
READER = """
import sys, torch
from raykd.config import DataConfig
from raykd.data import build_dataset

def anon_mb():
    with open("/proc/self/status") as f:
        return max(int(l.split()[1]) // 1024 for l in f if l.startswith("RssAnon"))

cfg = DataConfig(**__import__("json").loads(sys.argv[1]))
torch.manual_seed(0)
rows, peak = 0, anon_mb()
for split in ("train", "val", "test"):
    ds = build_dataset(cfg, split)
    for idx in torch.randperm(len(ds)).split(256):  # random batches, as training reads them
        rows += len(ds.get_batch(idx)[1])
        peak = max(peak, anon_mb())
print(rows, peak)
"""


def test_a_readers_memory_does_not_grow_with_the_store(tmp_path):
    peaks = {}
    for n in (2_000, 20_000):  # 3x32x32 float32: 36 MB and 368 MB of rows
        cfg = DataConfig(name="synthetic", num_samples=n, image_size=32, channels=3,
                         store_dir=str(tmp_path))
        prepare(cfg, registry.store_folder(cfg), lambda c=cfg: plan_of(c), use_ray=False)
        out = subprocess.run([sys.executable, "-c", READER, json.dumps(cfg.model_dump())],
                             capture_output=True, text=True, check=True)
        rows, peaks[n] = (int(v) for v in out.stdout.split())
        assert rows == n + 2 * (n // 4)
    # Measured (RssAnon): 304 MB and 302 MB (torch itself is most of it). The same reader
    # holding each split whole: 327 MB and 534 MB.
    assert peaks[20_000] < peaks[2_000] + 60, peaks
