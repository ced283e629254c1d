"""The row store every image/array split is served from: fixed-size rows in shard files on storage.

Layout of one prepared store, ``<data.store_dir>/<name>-<fingerprint>/``::

    manifest.json              written last: without it the folder is not a store
    train-00000.bin, ...       raw rows (uint8 pixels or float32), row k of a split at byte
                               (k - shard start) * row_bytes of its shard file
    train-labels.npy, ...      int64 labels, one per row (8 bytes a row: kept in memory)

The fingerprint names the folder. It is cheap to compute in every process (the dataset's name,
the names, sizes and modification times of its source files — never their content — split_seed,
val_fraction, limit, image size and the format version; ``data.labelled`` is not part of it: it
only hides labels on top of the train split), so a Train worker finds the store the driver
prepared without decoding anything. The content identity (``DatasetInfo.identity``, part of every
teacher cache's key) comes from the shards' sha256 in the manifest.

Reading: :class:`StoreSplit` reads only the rows asked for with ``os.preadv`` (contiguous rows
coalesced into one read). No memory map: mapped pages count in a process's resident memory, read
pages land in the kernel's page cache, which does not — a worker's resident memory stays a few
batches whatever the size of the split. Checksums are verified by the preparer (``prepare.py``)
when a shard is written and when the driver opens the store, not on every read.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from raykd.data.indexed import SPLITS, DatasetInfo, SplitBase

if TYPE_CHECKING:
    from raykd.config import DataConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_OPEN_FILES = 64  # shard files a split keeps open (a large store has thousands)


def store_root(cfg: DataConfig) -> Path:
    """``data.store_dir``: as the driver resolved it, else ``.raykd/data`` (see storage.py)."""
    from raykd.train.storage import resolve

    return Path(resolve(cfg.store_dir, "data"))


def fingerprint(cfg: DataConfig, source_identity: str) -> str:
    """The store's folder name for ``cfg`` whose source files are ``source_identity``."""
    parts = {"format": FORMAT_VERSION, "name": cfg.name, "source": source_identity,
             "split_seed": cfg.split_seed, "val_fraction": cfg.val_fraction,
             "limit": cfg.limit}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return f"{cfg.name}-{digest[:20]}"


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.bin"


def labels_name(split: str) -> str:
    return f"{split}-labels.npy"


def row_bytes(manifest: dict[str, Any]) -> int:
    return int(np.prod(manifest["row_shape"])) * np.dtype(manifest["dtype"]).itemsize


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a published store of this format, or None (absent, unreadable, other
    format)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return None
    return manifest


def files_complete(folder: Path, manifest: dict[str, Any]) -> bool:
    """Every shard and label file is there with its size (a stat each: cheap, every process)."""
    size = row_bytes(manifest)
    for split in SPLITS:
        entry = manifest["splits"][split]
        for shard in entry["shards"]:
            want = (shard["end"] - shard["start"]) * size
            try:
                if (folder / shard["file"]).stat().st_size != want:
                    return False
            except OSError:
                return False
        if not (folder / entry["labels"]).is_file():
            return False
    return True


def dataset_info(manifest: dict[str, Any]) -> DatasetInfo:
    return DatasetInfo(name=manifest["name"], input_shape=tuple(manifest["row_shape"]),
                       num_classes=int(manifest["num_classes"]),
                       sizes={s: int(manifest["splits"][s]["rows"]) for s in SPLITS},
                       identity=manifest["identity"], preprocessing=manifest["preprocessing"],
                       skipped_files=int(manifest.get("skipped_files", 0)))


def open_splits(folder: Path, manifest: dict[str, Any]) -> dict[str, StoreSplit]:
    info = dataset_info(manifest)
    return {s: StoreSplit(folder, manifest, s, info) for s in SPLITS}


class StoreSplit(SplitBase):
    """One split of a prepared store: labels in memory, rows read from the shard files on
    demand. Picklable (open files are not carried; each process opens its own)."""

    def __init__(self, folder: Path, manifest: dict[str, Any], split: str, info: DatasetInfo):
        entry = manifest["splits"][split]
        self.folder, self.split, self.info = Path(folder), split, info
        self.row_shape = tuple(int(d) for d in manifest["row_shape"])
        self.dtype = np.dtype(manifest["dtype"])
        self.scale = float(manifest["scale"])
        self.row_bytes = row_bytes(manifest)
        self.files = [s["file"] for s in entry["shards"]]
        self.starts = np.array([s["start"] for s in entry["shards"]] + [entry["rows"]],
                               dtype=np.int64)
        self.sha256 = [s["sha256"] for s in entry["shards"]]
        self.labels = torch.from_numpy(np.load(self.folder / entry["labels"],
                                               allow_pickle=False).astype(np.int64))
        self._checksum: str | None = None
        self._fresh_handles()

    def _fresh_handles(self) -> None:
        self._fds: OrderedDict[int, int] = OrderedDict()
        # The teacher actor is threaded: one read at a time per split, so no thread closes a
        # file (the open-file cache evicts) that another is reading from.
        self._lock = threading.Lock()

    # -- reading ----------------------------------------------------------------------------
    def _fd(self, k: int) -> int:
        fd = self._fds.pop(k, None)
        if fd is None:
            fd = os.open(self.folder / self.files[k], os.O_RDONLY)
            while len(self._fds) >= MAX_OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[k] = fd  # most recently used last
        return fd

    def _read(self, k: int, first_row: int, out: memoryview) -> None:
        offset = (first_row - int(self.starts[k])) * self.row_bytes
        done = 0
        while done < len(out):  # preadv may return fewer bytes than asked (signals, NFS)
            got = os.preadv(self._fd(k), [out[done:]], offset + done)
            if got == 0:
                raise OSError(f"{self.folder / self.files[k]}: ends before row {first_row} "
                              f"(the store is damaged; the driver re-prepares it on its next "
                              f"run)")
            done += got

    def stored(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1).numpy()
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for a split of {n} items")
        idx = idx % max(n, 1)
        rows, inverse = np.unique(idx, return_inverse=True)  # sorted: runs are contiguous
        buf = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        if len(rows):
            shard = np.searchsorted(self.starts, rows, side="right") - 1
            breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(shard) != 0)) + 1
            flat = memoryview(buf).cast("B")
            with self._lock:
                for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
                    self._read(int(shard[a]), int(rows[a]),
                               flat[int(a) * self.row_bytes:int(b) * self.row_bytes])
        if len(rows) != len(idx) or not np.array_equal(rows, idx):
            buf = buf[inverse.reshape(-1)]
        out = buf.view(self.dtype).reshape(len(idx), *self.row_shape)
        return torch.from_numpy(out)

    def checksum(self) -> str:
        """sha256 hex of the split's stored row bytes followed by its int64 label bytes (as
        IndexedDataset's), streamed from the shard files once and kept."""
        if self._checksum is None:
            from raykd.checksums import CHUNK

            digest = hashlib.sha256()
            for name in self.files:
                with open(self.folder / name, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        digest.update(chunk)
            digest.update(self.labels.numpy().tobytes())
            self._checksum = digest.hexdigest()
        return self._checksum

    # -- lifetime ---------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fresh_handles()

    def __copy__(self) -> StoreSplit:  # with_labels: a view with its own open files
        view = object.__new__(StoreSplit)
        view.__setstate__(self.__getstate__())
        return view

    def close(self) -> None:
        with self._lock:
            while self._fds:
                os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"StoreSplit({self.folder.name}/{self.split}, rows={len(self)})"
