"""The split contract every raykd image/array split keeps, and the facts that describe a dataset.

A split is served by :class:`raykd.data.store.StoreSplit` (rows read from a prepared row store on
storage, see ``store.py``); :class:`IndexedDataset` is the same contract over tensors already in
memory (tests, small ad-hoc data). Both give ``len()``, ``get_batch(idx) -> (idx, x float32
[B, C, H, W], y int64 [B])`` (the fast path: one read, no per-item Python), items that carry their
own position (the training loop looks up cached teacher soft labels by train index), ``labels``
(int64 [N], in memory: 8 bytes a row), ``stored(idx)`` (rows in their stored dtype),
``subset_indices`` and ``checksum()``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from raykd.checksums import tensors_sha256

SPLITS = ("train", "val", "test")


def split_checksum(split) -> str:
    """A split's identity in cache keys: sha256 of its ``inputs`` then ``labels`` tensors,
    computed once and kept on the split (``_checksum``)."""
    if split._checksum is None:
        split._checksum = tensors_sha256(split.inputs, split.labels)
    return split._checksum


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a teacher cache need to know about a dataset, without its data."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    sizes: dict[str, int]  # items per split: train / val / test
    # Changes whenever any split's content or the split itself changes (it holds a hash of the
    # data); teacher caches are fingerprinted with it, so stale soft labels are never reused.
    identity: str
    preprocessing: str  # human-readable: how stored values become the float32 inputs
    skipped_files: int = 0  # unreadable source files left out (data.on_bad_file=skip)


class SplitBase(Dataset):
    """What both split kinds share; a subclass gives ``labels``, ``scale``, ``info`` and
    ``stored(idx)``."""

    labels: torch.Tensor
    scale: float
    info: DatasetInfo | None

    def stored(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` as stored ([B, C, H, W], uint8 or float32), a new tensor."""
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.scale == 1.0:
            return x
        return x.to(torch.float32) / self.scale

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int]:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a split of {len(self)} items")
        i %= len(self)
        x = self._to_float(self.stored(torch.tensor([i]))[0])
        return i, x, int(self.labels[i])

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(idx, x float32 [B, C, H, W], y int64 [B])`` for a LongTensor of split positions."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return idx, self._to_float(self.stored(idx)), self.labels[idx]

    def subset_indices(self, include: list[int] | None = None,
                       exclude: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        """Positions whose label is in ``include`` (when given) and not in ``exclude``."""
        keep = torch.ones(len(self), dtype=torch.bool)
        if include is not None:
            keep &= torch.isin(self.labels, torch.tensor(list(include), dtype=torch.int64))
        if exclude:
            keep &= ~torch.isin(self.labels, torch.tensor(list(exclude), dtype=torch.int64))
        return torch.nonzero(keep, as_tuple=False).flatten()

    def with_labels(self, labels: torch.Tensor):
        """The same rows under other labels (e.g. a pool's hidden as -1): a shallow copy, the
        rows are not copied."""
        if labels.shape != self.labels.shape:
            raise ValueError(f"labels must be [{len(self)}], got shape {tuple(labels.shape)}")
        view = copy.copy(self)
        view.labels = labels.to(torch.int64)
        view._checksum = None
        return view


@dataclass(eq=False)
class IndexedDataset(SplitBase):
    """One split held in memory as tensors. Read-only by convention."""

    inputs: torch.Tensor  # [N, C, H, W]; uint8 (divided by ``scale`` on access) or float32
    labels: torch.Tensor  # [N] int64
    scale: float = 1.0  # uint8 → float32 divisor: 255 for images, 16 for sklearn digits
    info: DatasetInfo | None = None
    _checksum: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.inputs.ndim != 4:
            raise ValueError(f"inputs must be [N, C, H, W], got shape {tuple(self.inputs.shape)}")
        if self.labels.shape != (self.inputs.shape[0],):
            raise ValueError(f"labels must be [{self.inputs.shape[0]}], "
                             f"got shape {tuple(self.labels.shape)}")
        self.inputs = self.inputs.contiguous()
        self.labels = self.labels.to(torch.int64).contiguous()

    def stored(self, idx: torch.Tensor) -> torch.Tensor:
        return self.inputs[torch.as_tensor(idx, dtype=torch.int64)]

    def checksum(self) -> str:
        """sha256 hex of the stored input bytes followed by the int64 label bytes (cached)."""
        return split_checksum(self)
