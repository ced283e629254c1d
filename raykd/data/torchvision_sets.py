"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 read through torchvision's own dataset classes.

Test = the official test set; val = ``data.val_fraction`` of the official train set, carved with
``data.split_seed``; train = the rest. Pixels stay uint8 (÷255 on access), stored CHW. The files
are read whole by the store's preparer only (``TorchvisionDecoder``); every other process reads
the prepared row store.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.error import URLError

import numpy as np
import torch
from torchvision import datasets as tv

from raykd.config import ConfigError
from raykd.data.sources import Plan, SplitItems, files_identity
from raykd.data.splits import carve_val

if TYPE_CHECKING:
    from raykd.config import DataConfig


class UnpinnedCIFAR10(tv.CIFAR10):
    """torchvision's CIFAR-10 reader without its per-file md5 pins.

    ``tv.CIFAR10._check_integrity`` compares every batch file with the md5 of the official
    release and reports anything else as "not found or corrupted", which rejects legitimate
    user-supplied data in the same format (re-packed copies, subsets, test fixtures). We accept
    any file in the official layout and format instead, and rely on raykd's own content hash
    (``DatasetInfo.identity`` = sha256 of the prepared store's rows) to notice when the data
    changes.
    Downloads are unaffected: ``download()`` still verifies the archive's md5 (``tgz_md5``).
    Note that these files are Python pickles (the only format CIFAR ships in), read by
    torchvision; only point ``data.root`` at copies you trust.
    """

    train_list = [[name, None] for name, _ in tv.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in tv.CIFAR10.test_list]
    meta = {**tv.CIFAR10.meta, "md5": None}


class UnpinnedCIFAR100(tv.CIFAR100):
    """CIFAR-100 (fine labels) without per-file md5 pins; see :class:`UnpinnedCIFAR10`."""

    train_list = [[name, None] for name, _ in tv.CIFAR100.train_list]
    test_list = [[name, None] for name, _ in tv.CIFAR100.test_list]
    meta = {**tv.CIFAR100.meta, "md5": None}


# name → (torchvision class, where its files live under root, for the error message)
SOURCES: dict[str, tuple[type, str]] = {
    "mnist": (tv.MNIST, "MNIST/raw/train-images-idx3-ubyte, ..."),
    "fashion_mnist": (tv.FashionMNIST, "FashionMNIST/raw/train-images-idx3-ubyte, ..."),
    "cifar10": (UnpinnedCIFAR10, "cifar-10-batches-py/data_batch_1, ..."),
    "cifar100": (UnpinnedCIFAR100, "cifar-100-python/train, ..."),
}

# What a file in the right place but with the wrong content makes torchvision's readers raise.
_BAD_FILE_ERRORS = (AssertionError, ValueError, TypeError, KeyError, EOFError, IndexError,
                    pickle.UnpicklingError)


def _open(name: str, root: Path, train: bool, download: bool) -> tv.VisionDataset:
    cls, layout = SOURCES[name]
    where = f"torchvision layout: {root}/{layout}"
    try:
        return cls(str(root), train=train, download=download)
    except (RuntimeError, URLError, OSError) as err:
        if download:  # the fetch itself failed (offline, mirror down, archive md5 mismatch)
            # MNIST lists one error per mirror over several lines; the last is the final reason.
            reason = ([line.strip() for line in str(err).splitlines() if line.strip()]
                      or [type(err).__name__])[-1]
            raise ConfigError(f"data.download: could not fetch {name} into {root} ({reason}); "
                              f"put the files there ({where})") from None
        if isinstance(err, RuntimeError):  # torchvision's "Dataset not found" check
            raise ConfigError(f"data.root: no {name} dataset under {root}; put the files there "
                              f"({where}) or set data.download=true") from None
        raise ConfigError(f"data.root: cannot read the {name} files under {root} "
                          f"({type(err).__name__}: {err}); check the files ({where})") from None
    except _BAD_FILE_ERRORS as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise ConfigError(f"data.root: the {name} files under {root} are unreadable ({reason}); "
                          f"replace them with the official files ({where})") from None


# name → the folder under data.root that holds its files (what the store's fingerprint lists)
FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "cifar-10-batches-py",
           "cifar100": "cifar-100-python"}


def _as_arrays(dataset: tv.VisionDataset) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, C, H, W] CHW images, int64 [N] labels) of a torchvision set."""
    data = dataset.data
    inputs = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if inputs.ndim == 3:  # MNIST-style [N, H, W] grayscale
        inputs = inputs[:, None]
    else:  # CIFAR: [N, H, W, C] (torchvision transposes to HWC) → CHW
        inputs = inputs.transpose(0, 3, 1, 2)
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return inputs.astype(np.uint8, copy=False), labels


def _official(name: str, root: str, train: bool, download: bool = False
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """(images, labels, class names' count) of the official train or test set, read whole:
    these files are small (MNIST 47 MB, CIFAR 150 MB) and read only by the store's preparer."""
    dataset = _open(name, Path(root), train=train, download=download)
    return (*_as_arrays(dataset), len(dataset.classes))


def torchvision_identity(cfg: DataConfig) -> str:
    root = Path(cfg.root or ".").expanduser()
    folder = root / FOLDERS[cfg.name]
    if cfg.download and not folder.is_dir():  # fetched now, so the identity names the files
        _open(cfg.name, root, train=True, download=True)
    return files_identity(folder)


@dataclass
class TorchvisionDecoder:
    """Rows at source positions ``items`` of the official train set (train, val) or test set;
    each file is read once per decoder (one per preparing process), dropped with it."""

    name: str
    root: str
    _images: dict[bool, np.ndarray] = field(default_factory=dict, repr=False)

    def __call__(self, split: str, items: np.ndarray, labels: np.ndarray):
        train = split != "test"
        if train not in self._images:
            self._images[train] = _official(self.name, self.root, train)[0]
        return np.ascontiguousarray(self._images[train][np.asarray(items)]), []

    def __getstate__(self):  # sent to Ray Data workers without the arrays read here
        return {"name": self.name, "root": self.root, "_images": {}}


def torchvision_plan(cfg: DataConfig) -> Plan:
    root = str(Path(cfg.root or ".").expanduser().resolve())
    pool_x, pool_y, classes = _official(cfg.name, root, True, cfg.download)
    shape = tuple(int(d) for d in pool_x.shape[1:])
    del pool_x  # the decoder reads the images again, shard by shard
    _, test_y, _ = _official(cfg.name, root, False)  # fetched with train, if asked
    (train_p, train_y), (val_p, val_y) = carve_val(
        torch.arange(len(pool_y)), torch.from_numpy(pool_y), cfg.val_fraction, cfg.split_seed)
    labels_seen = int(max(pool_y.max(initial=-1), test_y.max(initial=-1))) + 1
    num_classes = max(classes, labels_seen)
    splits = {"train": SplitItems(train_p.numpy(), train_y.numpy()),
              "val": SplitItems(val_p.numpy(), val_y.numpy()),
              "test": SplitItems(np.arange(len(test_y), dtype=np.int64), test_y)}
    return Plan(row_shape=shape, dtype="uint8", scale=255.0,
                num_classes=num_classes, preprocessing="uint8/255, normalize none",
                splits=splits, decoder=TorchvisionDecoder(cfg.name, root))
