"""A folder of images, one sub-folder per class, listed with torchvision's ``ImageFolder``.

Layouts: ``<root>/<class>/<image>`` (split here: test 20%, val ``val_fraction`` of the rest) or
``<root>/train/<class>/...`` with optional ``val/`` and ``test/`` beside it (a missing one is
carved from train the same way); classes are the train folder's class names. The plan holds file
paths and labels only; :class:`ImageDecoder` decodes a shard's files (RGB, resized to
``data.image_size`` square, uint8 CHW) in the store's preparer. An unreadable file stops the
prepare (``data.on_bad_file: error``) or is left out (``skip``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from raykd.config import ConfigError
from raykd.data.sources import Plan, SplitItems, files_identity
from raykd.data.splits import TEST_FRACTION, seeded_generator, stratified_take

if TYPE_CHECKING:
    from raykd.config import DataConfig

LAYOUT_HINT = "<root>/<class>/<image> or <root>/train/<class>/<image> (+ optional val/, test/)"
MAX_SHARD_IMAGES = 2048  # decoding is the work: shards small enough to spread over workers
_SUFFIXES = tuple(IMG_EXTENSIONS)


def imagefolder_identity(cfg: DataConfig) -> str:
    root = Path(cfg.root or ".").expanduser()
    files = files_identity(root, lambda name: name.lower().endswith(_SUFFIXES))
    return f"{files},image_size={cfg.image_size}"


def _open_folder(folder: Path, root: Path) -> ImageFolder:
    try:
        # allow_empty: a class may have no images in one split (e.g. val) and still be a class.
        # Listing only: ImageFolder decodes nothing until an item is read.
        return ImageFolder(str(folder), allow_empty=True)
    except FileNotFoundError:
        raise ConfigError(f"data.root: no class folders under {folder}; expected {LAYOUT_HINT} "
                          f"under {root}") from None


def _listing(folder: ImageFolder, classes: list[str] | None = None
             ) -> tuple[np.ndarray, torch.Tensor]:
    """(paths, labels) of ``folder``'s files, labels renumbered to ``classes`` when given."""
    paths = np.array([os.path.abspath(p) for p, _ in folder.samples], dtype=object)
    labels = torch.tensor([t for _, t in folder.samples], dtype=torch.int64)
    if classes is not None and len(labels):
        labels = torch.tensor([classes.index(c) for c in folder.classes])[labels]
    return paths, labels


def _shuffled(paths: np.ndarray, labels: torch.Tensor, generator: torch.Generator):
    # ImageFolder lists items class by class; a seeded shuffle makes `data.limit` (a prefix of
    # each split) a mix of classes instead of the first few classes only.
    order = torch.randperm(len(labels), generator=generator)
    return paths[order.numpy()], labels[order]


def _split_folder(folder: Path, root: Path, classes: list[str], generator: torch.Generator):
    found = _open_folder(folder, root)
    unknown = sorted(set(found.classes) - set(classes))
    if unknown:
        raise ConfigError(f"data.root: class folder(s) {', '.join(unknown)} in {folder} have no "
                          f"counterpart in {root / 'train'}; every class needs training images")
    return _shuffled(*_listing(found, classes), generator)


def imagefolder_plan(cfg: DataConfig) -> Plan:
    root = Path(cfg.root or ".").expanduser()
    size = cfg.image_size
    generator = seeded_generator(cfg.split_seed)
    presplit = (root / "train").is_dir()
    train_folder = _open_folder(root / "train" if presplit else root, root)
    classes = list(train_folder.classes)
    pool_p, pool_y = _shuffled(*_listing(train_folder), generator)
    if len(pool_y) == 0:
        raise ConfigError(f"data.root: no images under {root}; expected {LAYOUT_HINT}")

    splits: dict[str, SplitItems] = {}
    for split in ("test", "val"):  # test first, so val is a fraction of what test leaves
        folder = root / split
        if presplit and folder.is_dir():
            p, y = _split_folder(folder, root, classes, generator)
        else:
            fraction = TEST_FRACTION if split == "test" else cfg.val_fraction
            keep, take = stratified_take(pool_y, fraction, generator)
            p, y = pool_p[take.numpy()], pool_y[take]
            pool_p, pool_y = pool_p[keep.numpy()], pool_y[keep]
        splits[split] = SplitItems(list(p), y.numpy())
    splits["train"] = SplitItems(list(pool_p), pool_y.numpy())
    return Plan(row_shape=(3, size, size), dtype="uint8", scale=255.0, num_classes=len(classes),
                preprocessing=f"RGB, resize {size}x{size} (bilinear, antialias), uint8/255, "
                              f"normalize none",
                splits={s: splits[s] for s in ("train", "val", "test")},
                decoder=ImageDecoder(size), max_shard_rows=MAX_SHARD_IMAGES,
                identity_params=f"image_size={size},num_classes={len(classes)}")


# What PIL raises for a file that is not a readable image: OSError (UnidentifiedImageError,
# truncated data), SyntaxError / ValueError (broken headers), DecompressionBombError.
_BAD_IMAGE = (OSError, SyntaxError, ValueError)


@dataclass(frozen=True)
class ImageDecoder:
    """A shard's image files as uint8 [n, 3, S, S] rows (RGB, resized to S square)."""

    size: int

    def __call__(self, split: str, items: list[str], labels: np.ndarray):
        from PIL import Image
        from torchvision import transforms

        to_tensor = transforms.Compose([transforms.Resize((self.size, self.size),
                                                          antialias=True),
                                        transforms.PILToTensor()])
        rows = np.empty((len(items), 3, self.size, self.size), dtype=np.uint8)
        bad, n = [], 0
        for i, path in enumerate(items):
            try:
                with open(path, "rb") as fh, Image.open(fh) as img:  # torchvision's pil_loader
                    rows[n] = to_tensor(img.convert("RGB")).numpy()
            except (*_BAD_IMAGE, Image.DecompressionBombError) as err:
                bad.append((i, path, type(err).__name__))
                continue
            n += 1
        return rows[:n], bad
