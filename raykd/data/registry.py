"""The dataset registry: which names exist, and how a ``DataConfig`` becomes split datasets.

Image and array sources are served from a prepared row store (``store.py``, prepared once per
fingerprint by ``prepare.py``): each source gives a cheap identity of its files (what names the
store) and a plan (what the preparer decodes). Text (``ready_splits``) builds its own token
blocks. Sources are imported only when used, so ``import raykd.data`` (done by config
validation) does not pay for torchvision or scikit-learn. An opened store is kept per process
(keyed by its config); it holds the labels, never the rows.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from raykd.data.indexed import SPLITS, DatasetInfo, SplitBase

if TYPE_CHECKING:
    from raykd.config import DataConfig

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    needs_root: bool  # read by config validation: data.root must be set (and exist)
    description: str
    # A Plan (raykd.data.sources) of the rows to prepare; text: (info, {split: dataset}) itself.
    builder: Callable[[DataConfig], Any]
    identity: Callable[[DataConfig], str] | None = None  # cheap: names the store (not text)
    ready_splits: bool = False


def _lazy(module: str, function: str) -> Callable[[DataConfig], Any]:
    def build(cfg: DataConfig) -> Any:
        return getattr(importlib.import_module(module), function)(cfg)

    build.__qualname__ = build.__name__ = function
    return build


_TV = "raykd.data.torchvision_sets"
_TORCHVISION = (_lazy(_TV, "torchvision_plan"), _lazy(_TV, "torchvision_identity"))
_BUILTIN = "raykd.data.builtin"

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("digits", False, "scikit-learn's bundled 8x8 handwritten digits (1797 images, "
                "10 classes); no download", _lazy(_BUILTIN, "digits_plan"),
                _lazy(_BUILTIN, "digits_identity")),
    DatasetSpec("mnist", True, "MNIST 28x28 grayscale digits (torchvision layout under data.root)",
                *_TORCHVISION),
    DatasetSpec("fashion_mnist", True, "Fashion-MNIST 28x28 grayscale clothing (torchvision "
                "layout under data.root)", *_TORCHVISION),
    DatasetSpec("cifar10", True, "CIFAR-10 32x32 colour images, 10 classes (python batches "
                "under data.root)", *_TORCHVISION),
    DatasetSpec("cifar100", True, "CIFAR-100 32x32 colour images, 100 fine classes (python "
                "batches under data.root)", *_TORCHVISION),
    DatasetSpec("imagefolder", True, "images in one folder per class under data.root, resized to "
                "data.image_size", _lazy("raykd.data.imagefolder", "imagefolder_plan"),
                _lazy("raykd.data.imagefolder", "imagefolder_identity")),
    DatasetSpec("synthetic", False, "seeded class-mean-plus-noise images (data.num_samples, "
                "image_size, channels, num_classes); no files",
                _lazy(_BUILTIN, "synthetic_plan"), _lazy(_BUILTIN, "synthetic_identity")),
    DatasetSpec("text", False, "a local corpus (data.path: .txt, .jsonl, .parquet) as blocks of "
                "data.block_size token ids for causal language models",
                _lazy("raykd.data.text", "load_text"), ready_splits=True),
)}


@dataclass(frozen=True)
class _Loaded:
    info: DatasetInfo
    splits: dict[str, SplitBase]


def store_folder(cfg: DataConfig) -> Path:
    """Where the store of ``cfg`` is (or will be): ``<data.store_dir>/<fingerprint>``."""
    from raykd.data.store import fingerprint, store_root

    return store_root(cfg) / fingerprint(cfg, DATASETS[cfg.name].identity(cfg))


def _open_store(cfg: DataConfig, verify: bool) -> _Loaded:
    from raykd.data.prepare import prepare
    from raykd.data.store import files_complete, open_splits, read_manifest

    folder = store_folder(cfg)
    manifest = None if verify else read_manifest(folder)
    if manifest is None or not files_complete(folder, manifest):
        prepare(cfg, folder, lambda: DATASETS[cfg.name].builder(cfg).limited(cfg.limit),
                verify=verify)
        manifest = read_manifest(folder)
    if manifest["skipped_files"] and cfg.on_bad_file == "error":
        from raykd.errors import ConfigError

        raise ConfigError(f"data.on_bad_file: the data store {folder} was prepared with "
                          f"data.on_bad_file=skip and left out {manifest['skipped_files']} "
                          f"unreadable file(s) (first: {manifest['skipped'][0]}); fix or remove "
                          f"them, or set data.on_bad_file=skip")
    splits = open_splits(folder, manifest)
    return _Loaded(splits["train"].info, splits)


@functools.lru_cache(maxsize=4)
def _load(cfg: DataConfig, resolved_root: str | None) -> _Loaded:
    # resolved_root is part of the cache key only: a relative root means another folder once the
    # working directory changes.
    spec = DATASETS[cfg.name]
    if spec.ready_splits:
        info, ready = spec.builder(cfg)
        return _Loaded(info, ready)
    return _open_store(cfg, verify=False)


def _resolved_root(cfg: DataConfig) -> str | None:
    if cfg.root and DATASETS[cfg.name].needs_root and not cfg.download:
        from raykd.node_files import require

        require(cfg.root, "data.root", "folder")  # on a worker's node: names the node
    root = str(Path(cfg.root).expanduser().resolve()) if cfg.root else None
    if cfg.path:
        from raykd.node_files import require

        require(cfg.path, "data.path")  # a corpus missing on a worker's node names the node
        root = str(Path(cfg.path).expanduser().resolve())
    return root


def _loaded(cfg: DataConfig) -> _Loaded:
    return _load(cfg, _resolved_root(cfg))


_VERIFIED: set[str] = set()  # stores this process has verified (a verb preflights per fit)


def prepare_data(cfg: DataConfig) -> None:
    """The driver's step before any worker starts (preflight): prepare the store when it is
    missing, or verify every shard's checksum and repair what does not match."""
    if DATASETS[cfg.name].ready_splits:
        return
    _resolved_root(cfg)
    folder = str(store_folder(cfg))
    if folder not in _VERIFIED:
        _open_store(cfg, verify=True)
        _VERIFIED.add(folder)


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Shape, classes, split sizes, content identity and preprocessing of the configured data."""
    return _loaded(cfg).info


def build_dataset(cfg: DataConfig, split: Split) -> SplitBase:
    """One split of the configured dataset (shared per process; treat it as read-only)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return _loaded(cfg).splits[split]
