"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 read through torchvision's own dataset classes.

Test = the official test set; val = ``data.val_fraction`` of the official train set, carved with
``data.split_seed``; train = the rest. Pixels stay uint8 (÷255 on access), stored CHW.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.error import URLError

import torch
from torchvision import datasets as tv

from raykd.config import ConfigError
from raykd.data.splits import RawSplits, carve_val

if TYPE_CHECKING:
    from raykd.config import DataConfig


class UnpinnedCIFAR10(tv.CIFAR10):
    """torchvision's CIFAR-10 reader without its per-file md5 pins.

    ``tv.CIFAR10._check_integrity`` compares every batch file with the md5 of the official
    release and reports anything else as "not found or corrupted", which rejects legitimate
    user-supplied data in the same format (re-packed copies, subsets, test fixtures). We accept
    any file in the official layout and format instead, and rely on raykd's own content hash
    (``DatasetInfo.identity`` = sha256 of the loaded tensors) to notice when the data changes.
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


def _as_tensors(dataset: tv.VisionDataset) -> tuple[torch.Tensor, torch.Tensor]:
    data = dataset.data
    inputs = data if isinstance(data, torch.Tensor) else torch.from_numpy(data)
    if inputs.ndim == 3:  # MNIST-style [N, H, W] grayscale
        inputs = inputs.unsqueeze(1)
    else:  # CIFAR: [N, H, W, C] (torchvision transposes to HWC) → CHW
        inputs = inputs.permute(0, 3, 1, 2)
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return inputs.to(torch.uint8).contiguous(), labels


def load_torchvision_splits(cfg: DataConfig) -> RawSplits:
    root = Path(cfg.root or ".").expanduser()
    train_set = _open(cfg.name, root, train=True, download=cfg.download)
    test_set = _open(cfg.name, root, train=False, download=False)  # fetched with train, if asked
    pool_x, pool_y = _as_tensors(train_set)
    test_x, test_y = _as_tensors(test_set)
    (train_x, train_y), (val_x, val_y) = carve_val(pool_x, pool_y, cfg.val_fraction,
                                                   cfg.split_seed)
    labels_seen = int(torch.cat([pool_y, test_y]).max()) + 1 if len(pool_y) + len(test_y) else 0
    num_classes = max(len(train_set.classes), labels_seen)
    return RawSplits(inputs={"train": train_x, "val": val_x, "test": test_x},
                     labels={"train": train_y, "val": val_y, "test": test_y},
                     num_classes=num_classes, scale=255.0,
                     preprocessing="uint8/255, normalize none")
