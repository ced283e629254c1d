"""A folder of images, one sub-folder per class, read with torchvision's ``ImageFolder``.

Layouts: ``<root>/<class>/<image>`` (split here: test 20%, val ``val_fraction`` of the rest) or
``<root>/train/<class>/...`` with optional ``val/`` and ``test/`` beside it (a missing one is
carved from train the same way). Every image is decoded once, converted to RGB, resized to
``data.image_size`` square and kept as uint8 CHW; classes are the train folder's class names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torchvision import transforms
from torchvision.datasets import ImageFolder

from raykd.config import ConfigError
from raykd.data.splits import TEST_FRACTION, RawSplits, seeded_generator, stratified_take

if TYPE_CHECKING:
    from raykd.config import DataConfig

LAYOUT_HINT = "<root>/<class>/<image> or <root>/train/<class>/<image> (+ optional val/, test/)"


def _open_folder(folder: Path, root: Path) -> ImageFolder:
    try:
        # allow_empty: a class may have no images in one split (e.g. val) and still be a class.
        return ImageFolder(str(folder), allow_empty=True)
    except FileNotFoundError:
        raise ConfigError(f"data.root: no class folders under {folder}; expected {LAYOUT_HINT} "
                          f"under {root}") from None


def _decode_all(folder: ImageFolder, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``folder`` as one uint8 [N, 3, S, S] tensor, plus its class indices."""
    to_tensor = transforms.Compose([transforms.Resize((image_size, image_size), antialias=True),
                                    transforms.PILToTensor()])
    inputs = torch.empty((len(folder.samples), 3, image_size, image_size), dtype=torch.uint8)
    for i, (path, _) in enumerate(folder.samples):
        try:
            inputs[i] = to_tensor(folder.loader(path))  # default loader converts to RGB
        except OSError as err:  # PIL's UnidentifiedImageError is an OSError
            raise ConfigError(f"data.root: cannot read image {path} ({type(err).__name__}); "
                              f"remove or replace it") from None
    labels = torch.tensor([target for _, target in folder.samples], dtype=torch.int64)
    return inputs, labels


def _load_split_folder(folder: Path, root: Path, classes: list[str], image_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A val/ or test/ folder, with its labels renumbered to the train folder's classes."""
    found = _open_folder(folder, root)
    unknown = sorted(set(found.classes) - set(classes))
    if unknown:
        raise ConfigError(f"data.root: class folder(s) {', '.join(unknown)} in {folder} have no "
                          f"counterpart in {root / 'train'}; every class needs training images")
    inputs, local = _decode_all(found, image_size)
    to_train_index = torch.tensor([classes.index(c) for c in found.classes], dtype=torch.int64)
    return inputs, to_train_index[local] if len(local) else local


def _shuffled(inputs: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    # ImageFolder lists items class by class; a seeded shuffle makes `data.limit` (a prefix of
    # each split) a mix of classes instead of the first few classes only.
    order = torch.randperm(len(labels), generator=generator)
    return inputs[order], labels[order]


def load_imagefolder_splits(cfg: DataConfig) -> RawSplits:
    root = Path(cfg.root or ".").expanduser()
    size = cfg.image_size
    generator = seeded_generator(cfg.split_seed)
    presplit = (root / "train").is_dir()
    train_folder = _open_folder(root / "train" if presplit else root, root)
    classes = list(train_folder.classes)
    pool_x, pool_y = _shuffled(*_decode_all(train_folder, size), generator)
    if len(pool_y) == 0:
        raise ConfigError(f"data.root: no images under {root}; expected {LAYOUT_HINT}")

    inputs: dict[str, torch.Tensor] = {}
    labels: dict[str, torch.Tensor] = {}
    for split in ("test", "val"):  # test first, so val is a fraction of what test leaves
        folder = root / split
        if presplit and folder.is_dir():
            x, y = _shuffled(*_load_split_folder(folder, root, classes, size), generator)
        else:
            fraction = TEST_FRACTION if split == "test" else cfg.val_fraction
            keep, take = stratified_take(pool_y, fraction, generator)
            x, y = pool_x[take], pool_y[take]
            pool_x, pool_y = pool_x[keep], pool_y[keep]
        inputs[split], labels[split] = x, y
    inputs["train"], labels["train"] = pool_x, pool_y
    return RawSplits(inputs, labels, num_classes=len(classes), scale=255.0,
                     preprocessing=f"RGB, resize {size}x{size} (bilinear, antialias), uint8/255, "
                                   f"normalize none",
                     identity_params=f"image_size={size},num_classes={len(classes)}")
