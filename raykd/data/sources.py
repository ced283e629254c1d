"""What a dataset source hands the row store's preparer: a :class:`Plan`.

A plan says, per split, which items make the rows (file paths, positions in a source array) and
their labels, the row shape, dtype and scale, and a picklable decoder that turns a range of items
into rows — run once per shard by the preparer (in this process, or in Ray Data workers). A plan
never holds decoded rows of a split. Listing files and carving splits happen here; decoding
happens only in the decoder.

A source's *identity* (``source_identity``) is cheap: the names, sizes and modification times of
its files, never their content. It names the store's folder (``store.fingerprint``), so every
process finds the prepared store without decoding anything.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# (position of the item in the shard, file name, reason) of an item that could not be decoded
BadItem = tuple[int, str, str]
# decoder(split, items, labels) -> (rows [n_good, *row_shape], bad items)
Decoder = Callable[[str, Any, np.ndarray], tuple[np.ndarray, list[BadItem]]]


@dataclass(frozen=True)
class SplitItems:
    items: Any  # a list (file paths) or an int64 array (positions); sliced per shard
    labels: np.ndarray  # int64, one per item


@dataclass(frozen=True)
class Plan:
    row_shape: tuple[int, ...]  # (C, H, W)
    dtype: str  # numpy dtype name of the stored rows: uint8 or float32
    scale: float  # stored value / scale = model input
    num_classes: int
    preprocessing: str
    splits: dict[str, SplitItems]
    decoder: Decoder
    # decoding-heavy sources (image files) cap a shard's items so the shards spread over workers
    max_shard_rows: int | None = None
    identity_params: str = ""  # source parameters that shape the content (image_size, ...)

    def limited(self, limit: int | None) -> Plan:
        """The first ``limit`` items of each split (``data.limit``), after splitting."""
        if limit is None:
            return self
        from dataclasses import replace

        return replace(self, splits={s: SplitItems(p.items[:limit], p.labels[:limit])
                                     for s, p in self.splits.items()})


def files_identity(folder: Path, keep: Callable[[str], bool] = lambda name: True) -> str:
    """sha256 over (relative path, size, mtime_ns) of every file under ``folder`` that ``keep``
    accepts, in sorted order; streamed, so a million files never sit in a list. "missing" when
    the folder does not exist (the preparer then names what is missing)."""
    if not folder.is_dir():
        return "missing"
    digest = hashlib.sha256()
    count = 0
    for here, dirs, files in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(here, folder)
        for name in sorted(files):
            if not keep(name):
                continue
            st = os.stat(os.path.join(here, name))
            digest.update(f"{rel}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            count += 1
    return f"files={count},sha256={digest.hexdigest()[:20]}"
