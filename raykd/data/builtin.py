"""Datasets that need no files: scikit-learn's bundled digits and a seeded synthetic task."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from raykd.data.splits import RawSplits, seeded_generator, three_way_split

if TYPE_CHECKING:
    from raykd.config import DataConfig

DIGITS_MAX = 16  # sklearn digits pixels are counts 0..16 (4x4 blocks of a 32x32 bitmap)
SYNTHETIC_NOISE = 0.35  # std of the per-pixel noise around each class's mean pattern


def digits_arrays():
    """(images [1797, 8, 8], targets [1797]) of scikit-learn's bundled digits, read from the
    CSV that scikit-learn ships, as its ``load_digits`` does, without importing scikit-learn:
    that import (scipy and all) costs ~4.6 CPU-seconds in every process that builds the data
    (the driver, each Train worker, the teacher actor) on a 2-core machine."""
    import gzip
    from importlib.util import find_spec

    import numpy as np

    spec = find_spec("sklearn")  # finds the package without executing it
    if spec is None or not spec.submodule_search_locations:
        from sklearn.datasets import load_digits  # raises the clear ImportError

        bunch = load_digits()
        return bunch.images, bunch.target
    from pathlib import Path

    csv = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(csv, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load_digits_splits(cfg: DataConfig) -> RawSplits:
    images, targets = digits_arrays()  # ships with scikit-learn; never downloads
    # 0..16 integers fit uint8 exactly: store them compactly, divide by 16 on access.
    inputs = torch.from_numpy(images).to(torch.uint8).unsqueeze(1)  # [1797, 1, 8, 8]
    labels = torch.from_numpy(targets).to(torch.int64)
    split_inputs, split_labels = three_way_split(inputs, labels, cfg.val_fraction, cfg.split_seed)
    return RawSplits(split_inputs, split_labels, num_classes=10, scale=float(DIGITS_MAX),
                     preprocessing=f"digits/{float(DIGITS_MAX)}; normalize none")


def load_synthetic_splits(cfg: DataConfig) -> RawSplits:
    """Each class has a fixed random mean image; items are that mean plus Gaussian noise, clipped
    to [0, 1]. Linearly separable in expectation, so a small model learns it well above chance,
    yet noisy enough that a teacher's soft labels carry information. Fully determined by
    ``split_seed`` and the shape parameters."""
    generator = seeded_generator(cfg.split_seed)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    means = torch.rand((cfg.num_classes, *shape), generator=generator)
    n_eval = max(cfg.num_samples // 4, 1)
    sizes = {"train": cfg.num_samples, "val": n_eval, "test": n_eval}
    inputs, labels = {}, {}
    for split, n in sizes.items():  # generated in a fixed order, so each split is reproducible
        y = torch.randperm(n, generator=generator) % cfg.num_classes  # balanced classes
        noise = torch.randn((n, *shape), generator=generator) * SYNTHETIC_NOISE
        inputs[split] = (means[y] + noise).clamp_(0.0, 1.0)
        labels[split] = y
    params = (f"num_samples={cfg.num_samples},image_size={cfg.image_size},"
              f"channels={cfg.channels},num_classes={cfg.num_classes}")
    return RawSplits(inputs, labels, num_classes=cfg.num_classes, scale=1.0,
                     preprocessing=f"synthetic float32 in [0,1] (noise std {SYNTHETIC_NOISE}); "
                                   f"normalize none", identity_params=params)
