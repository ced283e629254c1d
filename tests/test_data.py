"""The dataset registry: splits, real on-disk formats (written tiny here), augmentation."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from raykd.config import ConfigError, DataConfig, load_config, validate
from raykd.data import DATASETS, DatasetInfo, IndexedDataset, build_dataset, dataset_info
from raykd.data.augment import augment, splitmix64, view_seeds
from raykd.data.splits import stratified_take

SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------- helpers: real file formats

def write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's IDX format: big-endian magic (0x0000 0803 for 3-d uint8 = 2051, 0x0801 = 2049
    for 1-d labels), then one big-endian uint32 per dimension, then the raw uint8 bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str, n_train: int = 40, n_test: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {"train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
                        np.arange(n_train, dtype=np.uint8) % 10),
              "t10k": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                       (np.arange(n_test, dtype=np.uint8) * 3) % 10)}
    raw = root / folder / "raw"
    for prefix, (images, labels) in arrays.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return arrays


def write_cifar(root: Path, hundred: bool, per_batch: int = 6, n_test: int = 8, seed: int = 0):
    """CIFAR's python format: pickled dicts with 'data' (uint8 [N, 3072], channel-planar rows)
    and 'labels' / 'fine_labels'. The originals are Python 2 pickles whose str keys load as str
    under encoding='latin1' (torchvision's reader); Python 3 str keys load the same way."""
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    num_classes = 100 if hundred else 10
    label_key = "fine_labels" if hundred else "labels"
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    train_rows, train_labels = [], []

    def dump(name: str, rows: np.ndarray, labels: list[int]) -> None:
        entry = {"data": rows, label_key: labels, "batch_label": name}
        if hundred:
            entry["coarse_labels"] = [y // 5 for y in labels]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    for i, name in enumerate(names):
        n = per_batch * (5 if hundred else 1)
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(n) * 7 + i) % num_classes]
        dump(name, rows, labels)
        train_rows.append(rows)
        train_labels += labels
    test_rows = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in np.arange(n_test) % num_classes]
    dump("test" if hundred else "test_batch", test_rows, test_labels)
    meta_name, meta_key = ("meta", "fine_label_names") if hundred else ("batches.meta",
                                                                          "label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"class{k}" for k in range(num_classes)]}, f, protocol=2)
    return (np.concatenate(train_rows), np.array(train_labels)), (test_rows, np.array(test_labels))


def write_pngs(folder: Path, colours: dict[str, tuple[int, int, int]], per_class: int,
               size: int = 12) -> None:
    from PIL import Image

    for name, colour in colours.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size + i % 3), colour).save(folder / name / f"{i}.png")


def rows(ds) -> torch.Tensor:
    """Every row of a split as stored (uint8 or float32)."""
    return ds.stored(torch.arange(len(ds)))


def multiset(rows: torch.Tensor, labels: torch.Tensor) -> list[bytes]:
    return sorted(r.numpy().tobytes() + bytes([int(y)]) for r, y in zip(rows, labels))


def assert_matches_source(ds, source_rows: torch.Tensor, source_labels):
    """Every item of ``ds`` is one of the source items, with its own label (uint8 exact)."""
    lookup = {r.numpy().tobytes(): int(y) for r, y in zip(source_rows, source_labels)}
    for row, label in zip(rows(ds), ds.labels):
        assert lookup[row.numpy().tobytes()] == int(label)


# ---------------------------------------------------------------- registry & digits

def test_registry_names_and_roots():
    assert set(DATASETS) == {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100",
                             "imagefolder", "synthetic", "text"}
    # text needs data.path (a file), not data.root
    assert {n for n, s in DATASETS.items() if not s.needs_root} == {"digits", "synthetic",
                                                                     "text"}
    assert all(spec.name == name and spec.description for name, spec in DATASETS.items())


def test_digits_splits_partition_the_dataset_deterministically():
    from sklearn.datasets import load_digits

    cfg = DataConfig(name="digits", split_seed=0, val_fraction=0.1)
    info = dataset_info(cfg)
    assert isinstance(info, DatasetInfo)
    assert info.input_shape == (1, 8, 8) and info.num_classes == 10
    assert sum(info.sizes.values()) == 1797 and info.sizes["test"] == 359
    assert info.sizes["val"] == round(0.1 * (1797 - 359))
    splits = {s: build_dataset(cfg, s) for s in SPLITS}
    assert all(len(splits[s]) == info.sizes[s] and splits[s].info == info for s in SPLITS)

    # Partition: the three splits together are exactly the 1797 digits, each once.
    bunch = load_digits()
    source = torch.from_numpy(bunch.images).to(torch.uint8).unsqueeze(1)
    together = multiset(torch.cat([rows(splits[s]) for s in SPLITS]),
                        torch.cat([splits[s].labels for s in SPLITS]))
    assert together == multiset(source, torch.from_numpy(bunch.target))
    # Stratified: every class appears in test in about its 20% share.
    test_counts = torch.bincount(splits["test"].labels, minlength=10)
    assert test_counts.min() >= 33 and test_counts.max() <= 39

    # Same seed → same split (planned again, not the per-process cache); another seed →
    # another.
    again = DATASETS["digits"].builder(cfg)
    assert again.splits["train"].items.tolist() == \
        DATASETS["digits"].builder(cfg).splits["train"].items.tolist()
    assert torch.equal(torch.from_numpy(again.splits["train"].labels), splits["train"].labels)
    other = DATASETS["digits"].builder(cfg.model_copy(update={"split_seed": 1}))
    assert other.splits["test"].items.tolist() != again.splits["test"].items.tolist()
    assert dataset_info(DataConfig(split_seed=1)).identity != info.identity


def test_digits_items_and_batches():
    ds = build_dataset(DataConfig(name="digits"), "train")
    i, x, y = ds[3]
    assert i == 3 and x.dtype == torch.float32 and x.shape == (1, 8, 8) and isinstance(y, int)
    assert torch.equal(x, ds.stored(torch.tensor([3]))[0].float() / 16)
    assert 0.0 <= float(ds.get_batch(torch.arange(len(ds)))[1].min())
    assert float(ds.get_batch(torch.arange(len(ds)))[1].max()) == 1.0
    idx = torch.tensor([5, 0, 17, 5, len(ds) - 1])
    b_idx, bx, by = ds.get_batch(idx)
    items = [ds[int(k)] for k in idx]
    assert torch.equal(b_idx, idx) and bx.dtype == torch.float32 and by.dtype == torch.int64
    assert torch.equal(bx, torch.stack([it[1] for it in items]))
    assert by.tolist() == [it[2] for it in items] and [it[0] for it in items] == idx.tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_checksum_limit_and_identity():
    full = build_dataset(DataConfig(name="digits"), "train")
    expected = hashlib.sha256(rows(full).numpy().tobytes() + full.labels.numpy().tobytes())
    assert full.checksum() == expected.hexdigest()
    cfg = DataConfig(name="digits", limit=50)
    info = dataset_info(cfg)
    assert info.sizes == {"train": 50, "val": 50, "test": 50}
    limited = build_dataset(cfg, "train")
    assert torch.equal(rows(limited), rows(full)[:50])  # limit applies after splitting
    assert info.identity != dataset_info(DataConfig(name="digits")).identity
    # root / download do not change what the data is.
    same_data = DataConfig(name="digits", limit=50, download=True)
    assert dataset_info(same_data).identity == info.identity
    empty_val = build_dataset(DataConfig(name="digits", val_fraction=0.0), "val")
    assert len(empty_val) == 0 and len(empty_val.checksum()) == 64


def test_subset_indices():
    ds = IndexedDataset(torch.zeros(6, 1, 2, 2, dtype=torch.uint8),
                        torch.tensor([0, 1, 2, 1, 0, 3]), scale=255.0)
    assert ds.subset_indices(None, []).tolist() == [0, 1, 2, 3, 4, 5]
    assert ds.subset_indices(None, [1]).tolist() == [0, 2, 4, 5]
    assert ds.subset_indices([0, 1], []).tolist() == [0, 1, 3, 4]
    assert ds.subset_indices([0, 1], [0]).tolist() == [1, 3]
    assert ds.subset_indices([7], []).tolist() == []


def test_stratified_take_is_exact_and_proportional():
    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 4)
    keep, take = stratified_take(labels, 0.25, torch.Generator().manual_seed(3))
    assert len(take) == 11 and len(keep) == 33
    assert sorted(keep.tolist() + take.tolist()) == list(range(44))
    # Quantiles (rank + 0.5) / size: the 11 lowest hold 7 or 8 of class 0 (a tie at 0.25 with
    # class 1, broken at random), 3 or 2 of class 1 and 1 of class 2 (its 4 items: 0.125, ...).
    assert torch.bincount(labels[take], minlength=3).tolist() in ([7, 3, 1], [8, 2, 1])


# ---------------------------------------------------------------- torchvision formats

@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_round_trip(tmp_path, name, folder):
    arrays = write_mnist(tmp_path, folder)
    cfg = DataConfig(name=name, root=str(tmp_path), val_fraction=0.25, split_seed=4)
    info = dataset_info(cfg)
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10
    assert info.sizes == {"train": 30, "val": 10, "test": 10}
    assert info.preprocessing.startswith("uint8/255")
    test = build_dataset(cfg, "test")  # the official test set, in file order
    images, labels = arrays["t10k"]
    assert rows(test).dtype == torch.uint8
    assert torch.equal(rows(test)[:, 0], torch.from_numpy(images))
    assert test.labels.tolist() == labels.tolist()
    _, x, y = test[2]
    assert torch.allclose(x[0], torch.from_numpy(images[2]).float() / 255) and y == labels[2]
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    source = torch.from_numpy(arrays["train"][0]).unsqueeze(1)
    assert multiset(torch.cat([rows(train), rows(val)]),
                    torch.cat([train.labels, val.labels])) == \
        multiset(source, torch.from_numpy(arrays["train"][1]))
    assert_matches_source(val, source, arrays["train"][1])


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_round_trip(tmp_path, hundred):
    (train_rows, train_labels), (test_rows, test_labels) = write_cifar(tmp_path, hundred)
    name = "cifar100" if hundred else "cifar10"
    cfg = DataConfig(name=name, root=str(tmp_path), val_fraction=0.2)
    info = dataset_info(cfg)
    assert info.input_shape == (3, 32, 32) and info.num_classes == (100 if hundred else 10)
    assert info.sizes == {"train": 24, "val": 6, "test": 8}
    test = build_dataset(cfg, "test")
    # CIFAR rows are channel-planar (1024 R, 1024 G, 1024 B): CHW is a plain reshape.
    expected = torch.from_numpy(test_rows).reshape(-1, 3, 32, 32)
    assert torch.equal(rows(test), expected)
    assert test.labels.tolist() == test_labels.tolist()
    train = build_dataset(cfg, "train")
    assert_matches_source(train, torch.from_numpy(train_rows).reshape(-1, 3, 32, 32), train_labels)
    _, x, _ = train[0]
    assert x.shape == (3, 32, 32) and torch.equal(x, rows(train)[0].float() / 255)


def test_missing_dataset_is_one_line_config_error(tmp_path):
    for name, layout in (("mnist", "MNIST/raw/"), ("cifar10", "cifar-10-batches-py/")):
        with pytest.raises(ConfigError) as err:
            dataset_info(DataConfig(name=name, root=str(tmp_path)))
        msg = str(err.value)
        assert "\n" not in msg and err.value.__cause__ is None and err.value.__suppress_context__
        assert msg.startswith(f"data.root: no {name} dataset under {tmp_path}")
        assert f"{tmp_path}/{layout}" in msg and "data.download=true" in msg


def test_corrupt_mnist_file_is_config_error(tmp_path):
    write_mnist(tmp_path, "MNIST")
    (tmp_path / "MNIST/raw/train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(ConfigError, match=r"^data\.root: the mnist files under .* unreadable"):
        dataset_info(DataConfig(name="mnist", root=str(tmp_path)))


# ---------------------------------------------------------------- imagefolder

COLOURS = {"blue": (0, 0, 255), "green": (0, 200, 0), "red": (255, 0, 0)}


def test_imagefolder_single_folder(tmp_path):
    write_pngs(tmp_path, COLOURS, per_class=10)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=6, val_fraction=0.25)
    info = dataset_info(cfg)
    assert info.input_shape == (3, 6, 6) and info.num_classes == 3
    assert info.sizes == {"train": 18, "val": 6, "test": 6}
    assert "resize 6x6" in info.preprocessing
    for split in SPLITS:
        ds = build_dataset(cfg, split)
        assert rows(ds).dtype == torch.uint8
        for row, label in zip(rows(ds), ds.labels):  # solid colours survive the resize exactly
            colour = list(COLOURS.values())[int(label)]  # classes sorted: blue, green, red
            assert torch.equal(row, torch.tensor(colour, dtype=torch.uint8)[:, None, None]
                               .expand(3, 6, 6))
    # The seeded shuffle makes a limited train split a mix of classes, not just "blue".
    limited = build_dataset(cfg.model_copy(update={"limit": 6}), "train")
    assert len(set(limited.labels.tolist())) > 1


def test_imagefolder_presplit_folders(tmp_path):
    write_pngs(tmp_path / "train", COLOURS, per_class=5)
    write_pngs(tmp_path / "test", {"red": COLOURS["red"], "green": COLOURS["green"]}, per_class=2)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=4, val_fraction=0.2)
    info = dataset_info(cfg)
    assert info.num_classes == 3 and info.sizes == {"train": 12, "val": 3, "test": 4}
    test = build_dataset(cfg, "test")  # renumbered to train's classes: green=1, red=2
    assert sorted(test.labels.tolist()) == [1, 1, 2, 2]
    for row, label in zip(rows(test), test.labels):
        assert int(row[0, 0, 0]) == (255 if int(label) == 2 else 0)

    write_pngs(tmp_path / "val", {"purple": (128, 0, 128)}, per_class=1)
    with pytest.raises(ConfigError, match=r"^data\.root: class folder\(s\) purple"):
        dataset_info(cfg.model_copy(update={"split_seed": 9}))


def test_imagefolder_without_images_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.root: no class folders under"):
        dataset_info(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8))


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_and_learnable():
    cfg = DataConfig(name="synthetic", num_samples=400, image_size=6, channels=2, num_classes=5,
                     split_seed=11)
    info = dataset_info(cfg)
    assert info.input_shape == (2, 6, 6) and info.num_classes == 5
    assert info.sizes == {"train": 400, "val": 100, "test": 100}
    first, second = DATASETS["synthetic"].builder(cfg), DATASETS["synthetic"].builder(cfg)

    def decoded(plan, split):
        part = plan.splits[split]
        return torch.from_numpy(plan.decoder(split, part.items, part.labels)[0])

    assert all(torch.equal(decoded(first, s), decoded(second, s)) for s in SPLITS)
    other = DATASETS["synthetic"].builder(cfg.model_copy(update={"split_seed": 12}))
    assert not torch.equal(decoded(first, "train"), decoded(other, "train"))
    # Any cut of the rows (a shard) decodes to the same rows as the whole split.
    part = first.splits["train"]
    cut = torch.from_numpy(first.decoder("train", part.items[250:300], part.labels[250:300])[0])
    assert torch.equal(cut, decoded(first, "train")[250:300])

    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    _, item, _ = train[0]
    item.zero_()  # items are copies: the shared, cached split stays intact
    assert float(train[0][1].abs().sum()) > 0
    x_train, x_test = rows(train), rows(test)
    assert x_train.dtype == torch.float32 and 0 <= float(x_train.min())
    assert float(x_train.max()) <= 1
    means = torch.stack([x_train[train.labels == k].mean(0) for k in range(5)]).flatten(1)
    predicted = torch.cdist(x_test.flatten(1), means).argmin(1)
    assert (predicted == test.labels).float().mean() > 0.6  # chance is 0.2


# ---------------------------------------------------------------- augmentation

def reference_splitmix64(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_splitmix64_matches_reference_and_view_seeds_broadcast():
    values = [0, 1, 2, 12345, -1, -(1 << 63), (1 << 63) - 1]
    got = splitmix64(torch.tensor(values, dtype=torch.int64))
    assert [v & ((1 << 64) - 1) for v in got.tolist()] == \
        [reference_splitmix64(v & ((1 << 64) - 1)) for v in values]
    idx = torch.arange(50)
    seeds = view_seeds(idx, 3, base_seed=7)
    assert seeds.shape == (50,) and seeds.dtype == torch.int64 and bool((seeds >= 0).all())
    assert torch.equal(seeds, view_seeds(idx, torch.full((50,), 3), 7))
    grid = view_seeds(idx[:, None], torch.arange(4)[None, :], 7)  # [50, 4]
    assert grid.shape == (50, 4) and len(set(grid.flatten().tolist())) == 200
    assert torch.equal(grid[:, 3], seeds)
    assert not torch.equal(view_seeds(idx, 3, base_seed=8), seeds)


def test_augment_is_deterministic_bounded_and_identity_at_zero():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 9, 9)
    seeds = view_seeds(torch.arange(64), 0, base_seed=1)
    assert augment(x, seeds, jitter=0) is x
    out = augment(x, seeds, jitter=2, flip=True)
    assert torch.equal(out, augment(x.clone(), seeds.clone(), jitter=2, flip=True))
    other_view = augment(x, view_seeds(torch.arange(64), 1, base_seed=1), jitter=2, flip=True)
    assert not torch.equal(out, other_view)

    # One lit pixel per image: it moves by at most jitter per axis, and shifts vary by seed.
    jitter = 2
    lit = torch.zeros(64, 1, 9, 9, dtype=torch.uint8)
    lit[:, 0, 4, 4] = 1
    moved = augment(lit, seeds, jitter)
    assert moved.dtype == torch.uint8 and int(moved.sum()) == 64  # never pushed off a 9x9 image
    pos = torch.nonzero(moved[:, 0])  # rows: (sample, y, x)
    dy, dx = pos[:, 1] - 4, pos[:, 2] - 4
    assert int(dy.abs().max()) <= jitter and int(dx.abs().max()) <= jitter
    assert len(set(zip(dy.tolist(), dx.tolist()))) >= 10  # of the 25 possible shifts
    # Zero fill: a shift of the all-ones image leaves zeros on the vacated border.
    ones = augment(torch.ones(64, 1, 9, 9), seeds, jitter)
    assert float(ones.sum(dim=(1, 2, 3)).min()) >= 49 and bool((ones <= 1).all())
    assert bool((ones.sum(dim=(1, 2, 3)) < 81).any())


def test_augment_flip_only():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(32, 1, 1, 1)
    out = augment(x, torch.arange(32), jitter=0, flip=True)
    flipped = torch.tensor([torch.equal(o, x[0].flip(-1)) for o in out])
    kept = torch.tensor([torch.equal(o, x[0]) for o in out])
    assert bool((flipped ^ kept).all()) and 0 < int(flipped.sum()) < 32


# ---------------------------------------------------------------- config integration

def test_unknown_dataset_name_lists_allowed_names():
    with pytest.raises(ConfigError) as err:
        validate({"data": {"name": "nope"}})
    assert str(err.value).startswith("data.name: unknown dataset 'nope'; allowed: cifar10, "
                                     "cifar100, digits, fashion_mnist, imagefolder, mnist")
    with pytest.raises(ConfigError, match=r"^data\.root: dataset 'mnist' needs data\.root"):
        validate({"data": {"name": "mnist"}})


def test_load_config_unknown_dataset():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.name=nope"])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("data.name: unknown dataset 'nope'; allowed: ")
    assert all(name in msg for name in DATASETS)
