"""Datasets that need no files: scikit-learn's bundled digits and a seeded synthetic task."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from raykd.data.sources import Plan, SplitItems
from raykd.data.splits import seeded_generator, three_way_split

if TYPE_CHECKING:
    from raykd.config import DataConfig

DIGITS_MAX = 16  # sklearn digits pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap)
SYNTHETIC_NOISE = 0.35  # std of the per-pixel noise around each class's mean pattern
SYNTHETIC_CHUNK = 256  # rows drawn from one seeded noise stream (independent of shard sizes)


def _digits_csv():
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("sklearn")  # finds the package without executing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"


@functools.lru_cache(maxsize=1)
def digits_arrays():
    """(images [1797, 8, 8], targets [1797]) of scikit-learn's bundled digits, read from the
    CSV that scikit-learn ships, as its ``load_digits`` does, without importing scikit-learn:
    that import (scipy and all) costs ~4.6 CPU-seconds in a process on a 2-core machine."""
    import gzip

    csv = _digits_csv()
    if csv is None:
        from sklearn.datasets import load_digits  # raises the clear ImportError

        bunch = load_digits()
        return bunch.images, bunch.target
    with gzip.open(csv, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def digits_identity(cfg: DataConfig) -> str:
    csv = _digits_csv()
    if csv is None or not csv.is_file():
        return "sklearn-digits"
    st = csv.stat()
    return f"digits.csv.gz,{st.st_size},{st.st_mtime_ns}"


def decode_digits(split: str, items: np.ndarray, labels: np.ndarray):
    images, _ = digits_arrays()
    # 0..16 integers fit uint8 exactly: stored compactly, divided by 16 on access.
    return images[np.asarray(items)].astype(np.uint8)[:, None], []


def digits_plan(cfg: DataConfig) -> Plan:
    _, targets = digits_arrays()  # ships with scikit-learn; never downloads
    positions = torch.arange(len(targets))
    items, labels = three_way_split(positions, torch.from_numpy(targets).to(torch.int64),
                                    cfg.val_fraction, cfg.split_seed)
    return Plan(row_shape=(1, 8, 8), dtype="uint8", scale=float(DIGITS_MAX), num_classes=10,
                preprocessing=f"digits/{float(DIGITS_MAX)}; normalize none",
                splits={s: SplitItems(items[s].numpy(), labels[s].numpy()) for s in items},
                decoder=decode_digits)


def synthetic_identity(cfg: DataConfig) -> str:
    return (f"num_samples={cfg.num_samples},image_size={cfg.image_size},"
            f"channels={cfg.channels},num_classes={cfg.num_classes}")


@dataclass(frozen=True)
class SyntheticDecoder:
    """Rows ``items`` (contiguous positions) of a split: the class mean plus noise drawn from
    one stream per chunk of :data:`SYNTHETIC_CHUNK` rows, seeded by (split_seed, split, chunk),
    so any shard can be generated alone and every sharding gives the same rows."""

    means: np.ndarray  # [num_classes, C, H, W] float32
    seed: int

    def __call__(self, split: str, items: np.ndarray, labels: np.ndarray):
        items = np.asarray(items)
        if len(items) == 0:
            return np.empty((0, *self.means.shape[1:]), np.float32), []
        first, last = int(items[0]), int(items[-1]) + 1
        code = ("train", "val", "test").index(split)
        chunks = []
        for c in range(first // SYNTHETIC_CHUNK, (last - 1) // SYNTHETIC_CHUNK + 1):
            rng = np.random.default_rng([self.seed % (1 << 63), code, c])
            chunks.append(rng.standard_normal((SYNTHETIC_CHUNK, *self.means.shape[1:]),
                                              dtype=np.float32))
        noise = np.concatenate(chunks)[first % SYNTHETIC_CHUNK:][:last - first]
        rows = self.means[labels] + noise * np.float32(SYNTHETIC_NOISE)
        return np.clip(rows, 0.0, 1.0, out=rows), []


def synthetic_plan(cfg: DataConfig) -> Plan:
    """Each class has a fixed random mean image; items are that mean plus Gaussian noise, clipped
    to [0, 1]. Linearly separable in expectation, so a small model learns it well above chance,
    yet noisy enough that a teacher's soft labels carry information. Fully determined by
    ``split_seed`` and the shape parameters."""
    generator = seeded_generator(cfg.split_seed)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    means = torch.rand((cfg.num_classes, *shape), generator=generator)
    n_eval = max(cfg.num_samples // 4, 1)
    sizes = {"train": cfg.num_samples, "val": n_eval, "test": n_eval}
    splits = {}
    for split, n in sizes.items():  # labels drawn in a fixed order: each split is reproducible
        y = torch.randperm(n, generator=generator) % cfg.num_classes  # balanced classes
        splits[split] = SplitItems(np.arange(n, dtype=np.int64), y.numpy())
    return Plan(row_shape=shape, dtype="float32", scale=1.0, num_classes=cfg.num_classes,
                preprocessing=f"synthetic float32 in [0,1] (noise std {SYNTHETIC_NOISE}); "
                              f"normalize none", splits=splits,
                decoder=SyntheticDecoder(means.numpy(), cfg.split_seed),
                identity_params=synthetic_identity(cfg))
