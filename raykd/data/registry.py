"""The dataset registry: which names exist, and how a ``DataConfig`` becomes split datasets.

Sources are imported only when used, so ``import raykd.data`` (done by config validation) does not
pay for torchvision or scikit-learn. A loaded dataset is kept per process (keyed by its config),
so ``dataset_info`` followed by ``build_dataset`` for each split decodes and hashes it once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from raykd.data.indexed import SPLITS, DatasetInfo, IndexedDataset

if TYPE_CHECKING:
    from raykd.config import DataConfig
    from raykd.data.splits import RawSplits

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    needs_root: bool  # read by config validation: data.root must be set (and exist)
    description: str
    builder: Callable[[DataConfig], RawSplits]  # loads and splits; limit/hashing happen here
    # The builder returns (info, {split: dataset}) itself, limit and identity included (text:
    # token blocks are not [N, C, H, W] images).
    ready_splits: bool = False


def _lazy(module: str, function: str) -> Callable[[DataConfig], RawSplits]:
    def build(cfg: DataConfig) -> RawSplits:
        return getattr(importlib.import_module(module), function)(cfg)

    build.__qualname__ = build.__name__ = function
    return build


_TORCHVISION = ("raykd.data.torchvision_sets", "load_torchvision_splits")

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("digits", False, "scikit-learn's bundled 8x8 handwritten digits (1797 images, "
                "10 classes); no download", _lazy("raykd.data.builtin", "load_digits_splits")),
    DatasetSpec("mnist", True, "MNIST 28x28 grayscale digits (torchvision layout under data.root)",
                _lazy(*_TORCHVISION)),
    DatasetSpec("fashion_mnist", True, "Fashion-MNIST 28x28 grayscale clothing (torchvision "
                "layout under data.root)", _lazy(*_TORCHVISION)),
    DatasetSpec("cifar10", True, "CIFAR-10 32x32 colour images, 10 classes (python batches "
                "under data.root)", _lazy(*_TORCHVISION)),
    DatasetSpec("cifar100", True, "CIFAR-100 32x32 colour images, 100 fine classes (python "
                "batches under data.root)", _lazy(*_TORCHVISION)),
    DatasetSpec("imagefolder", True, "images in one folder per class under data.root, resized to "
                "data.image_size", _lazy("raykd.data.imagefolder", "load_imagefolder_splits")),
    DatasetSpec("synthetic", False, "seeded class-mean-plus-noise images (data.num_samples, "
                "image_size, channels, num_classes); no files",
                _lazy("raykd.data.builtin", "load_synthetic_splits")),
    DatasetSpec("text", False, "a local corpus (data.path: .txt, .jsonl, .parquet) as blocks of "
                "data.block_size token ids for causal language models",
                _lazy("raykd.data.text", "load_text"), ready_splits=True),
)}


@dataclass(frozen=True)
class _Loaded:
    info: DatasetInfo
    splits: dict[str, IndexedDataset]


def _identity(cfg: DataConfig, raw: RawSplits, splits: dict[str, IndexedDataset]) -> str:
    # Content hash over every split: any change of files, split seed/fraction or limit shows up.
    # data.root and data.download are deliberately absent (the same data elsewhere is the same).
    content = hashlib.sha256("|".join(f"{s}:{splits[s].checksum()}" for s in SPLITS).encode())
    parts = [cfg.name, f"split_seed={cfg.split_seed}", f"val_fraction={cfg.val_fraction}",
             f"limit={cfg.limit}"]
    if raw.identity_params:
        parts.append(raw.identity_params)
    return "|".join([*parts, f"sha256={content.hexdigest()[:16]}"])


@functools.lru_cache(maxsize=4)
def _load(cfg: DataConfig, resolved_root: str | None) -> _Loaded:
    # resolved_root is part of the cache key only: a relative root means another folder once the
    # working directory changes.
    spec = DATASETS[cfg.name]
    if spec.ready_splits:
        info, ready = spec.builder(cfg)
        return _Loaded(info, ready)
    raw = spec.builder(cfg)
    splits = {}
    for split in SPLITS:
        inputs, labels = raw.inputs[split], raw.labels[split]
        if cfg.limit is not None:  # after splitting: the first N items of each split
            inputs, labels = inputs[:cfg.limit], labels[:cfg.limit]
        splits[split] = IndexedDataset(inputs, labels, scale=raw.scale)
    shape = tuple(int(d) for d in splits["train"].inputs.shape[1:])
    info = DatasetInfo(name=cfg.name, input_shape=shape, num_classes=raw.num_classes,
                       sizes={s: len(splits[s]) for s in SPLITS},
                       identity=_identity(cfg, raw, splits), preprocessing=raw.preprocessing)
    for dataset in splits.values():
        dataset.info = info
    return _Loaded(info, splits)


def _loaded(cfg: DataConfig) -> _Loaded:
    if cfg.root and DATASETS[cfg.name].needs_root and not cfg.download:
        from raykd.node_files import require

        require(cfg.root, "data.root", "folder")  # on a worker's node: names the node
    root = str(Path(cfg.root).expanduser().resolve()) if cfg.root else None
    if cfg.path:
        from raykd.node_files import require

        require(cfg.path, "data.path")  # a corpus missing on a worker's node names the node
        root = str(Path(cfg.path).expanduser().resolve())
    return _load(cfg, root)


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Shape, classes, split sizes, content identity and preprocessing of the configured data."""
    return _loaded(cfg).info


def build_dataset(cfg: DataConfig, split: Split) -> IndexedDataset:
    """One split of the configured dataset (shared per process; treat it as read-only)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return _loaded(cfg).splits[split]
