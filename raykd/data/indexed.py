"""The in-memory dataset every raykd split is served from, and the facts that describe it.

Every split lives in RAM as two tensors: inputs (uint8 for pixel data, a quarter of float32's size)
and int64 labels. Items carry their own position so the training loop can look up cached teacher
soft labels by train index; ``get_batch`` is the fast path (one tensor gather, no per-item Python).
"""

from __future__ import annotations

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


@dataclass(eq=False)
class IndexedDataset(Dataset):
    """One split held in memory. Read-only by convention: builds are cached and shared."""

    inputs: torch.Tensor  # [N, C, H, W]; uint8 (divided by ``scale`` on access) or float32
    labels: torch.Tensor  # [N] int64
    scale: float = 1.0  # uint8 → float32 divisor: 255 for images, 16 for sklearn digits
    info: DatasetInfo | None = None  # the whole dataset's info; set by the registry
    _checksum: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.inputs.ndim != 4:
            raise ValueError(f"inputs must be [N, C, H, W], got shape {tuple(self.inputs.shape)}")
        if self.labels.shape != (self.inputs.shape[0],):
            raise ValueError(f"labels must be [{self.inputs.shape[0]}], "
                             f"got shape {tuple(self.labels.shape)}")
        self.inputs = self.inputs.contiguous()
        self.labels = self.labels.to(torch.int64).contiguous()

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
        stored = self.inputs[i]
        x = self._to_float(stored)
        if x is stored:  # float32 data: a view of the shared, cached split; hand out a copy
            x = x.clone()
        return i, x, int(self.labels[i])

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(idx, x float32 [B, C, H, W], y int64 [B])`` for a LongTensor of split positions."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return idx, self._to_float(self.inputs[idx]), self.labels[idx]

    def checksum(self) -> str:
        """sha256 hex of the stored input bytes followed by the int64 label bytes (cached)."""
        return split_checksum(self)

    def subset_indices(self, include: list[int] | None = None,
                       exclude: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        """Positions whose label is in ``include`` (when given) and not in ``exclude``."""
        keep = torch.ones(len(self), dtype=torch.bool)
        if include is not None:
            keep &= torch.isin(self.labels, torch.tensor(list(include), dtype=torch.int64))
        if exclude:
            keep &= ~torch.isin(self.labels, torch.tensor(list(exclude), dtype=torch.int64))
        return torch.nonzero(keep, as_tuple=False).flatten()
