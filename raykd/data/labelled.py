"""Semi-supervised train splits (``data.labelled``): a labelled part and an unlabelled pool.

The labelled part is a stratified, seeded choice of the train split (a count or a fraction); the
rest is the pool. Training reads the train split through :func:`training_view`, whose pool labels
are replaced by :data:`HIDDEN` (−1): a loss that read one would fail (cross-entropy refuses −1),
so a fit that finishes has learned the pool from its teacher's pseudo-labels alone.
"""

from __future__ import annotations

import functools

import torch

from raykd.config import ConfigError, DataConfig
from raykd.data.indexed import SplitBase
from raykd.data.splits import seeded_generator, stratified_take

HIDDEN = -1
_SALT = 0x5EED_1AB1  # a stream of its own: never the split_seed draw that carved val/test


@functools.lru_cache(maxsize=4)
def labelled_split(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(labelled, pool): ascending positions of the train split (all labelled when unset)."""
    from raykd.data import build_dataset

    train = build_dataset(cfg, "train")
    n = len(train)
    if cfg.labelled is None:
        return torch.arange(n), torch.empty(0, dtype=torch.int64)
    if isinstance(cfg.labelled, int) and cfg.labelled >= n:
        raise ConfigError(f"data.labelled: {cfg.labelled} labelled samples, but the train split "
                          f"has {n}; give fewer (or a fraction in (0, 1)), or unset it")
    fraction = cfg.labelled / n if isinstance(cfg.labelled, int) else cfg.labelled
    pool, labelled = stratified_take(train.labels, fraction, seeded_generator(
        cfg.split_seed ^ _SALT))
    if len(labelled) == 0:
        raise ConfigError(f"data.labelled: {cfg.labelled} of {n} train samples rounds to none; "
                          f"give a larger count or fraction")
    return labelled, pool


@functools.lru_cache(maxsize=4)
def training_view(cfg: DataConfig) -> SplitBase:
    """The train split as training sees it: the pool's labels are :data:`HIDDEN`. The rows are
    the split's own (no copy); only the labels are a new tensor."""
    from raykd.data import build_dataset

    train = build_dataset(cfg, "train")
    if cfg.labelled is None:
        return train
    _, pool = labelled_split(cfg)
    labels = train.labels.clone()
    labels[pool] = HIDDEN
    return train.with_labels(labels)


def class_counts(cfg: DataConfig) -> list[int]:
    """Labelled samples per class (what the stratified choice kept)."""
    from raykd.data import build_dataset

    labelled, _ = labelled_split(cfg)
    train = build_dataset(cfg, "train")
    return torch.bincount(train.labels[labelled], minlength=train.info.num_classes).tolist()
