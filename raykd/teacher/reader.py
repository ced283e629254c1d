"""Worker-side reading of a published teacher cache straight from its files, row by row.

A published cache (``cache.py``, ``shards.py``) is one ``.npy`` file per array over all N rows
plus ``manifest.json``, which keeps the sha256 of every shard's byte range in every file. The
driver hands each worker a :class:`CacheTable` — the folder, the arrays' files, shapes and
dtypes, the shard bounds and their checksums, all read from the manifest by the teacher actor —
and nothing else: no shard travels through Ray's object store, so nothing pins the cache there.

A :class:`CacheReader` opens the files lazily; the first time a step touches a shard it
re-hashes that shard's byte ranges (streamed through a 1 MiB buffer) and compares them with the
manifest: a mismatch is refused with one line naming the file and ``raykd cache verify``, never
served. A cache of at most ``RAYKD_CACHE_RESIDENT_BYTES`` (64 MiB by default: digits, CIFAR,
the top-k cache of ImageNet) is then held whole, each shard kept as it is read for its checksum,
and a step's rows are one gather in memory (~0.1 ms for 256 rows). A larger one is read row by
row: ``os.preadv`` into the batch's own arrays (one read over the batch's span when it is small,
one per run of rows otherwise; ~0.3-0.6 ms for 256 scattered rows, read ahead in a thread), no
memory map of the file (whose touched pages would count as the worker's memory), so the
worker's resident memory holds a batch's rows, whatever the size of the cache; the page cache,
which the kernel reclaims, is not the process's memory.

Why a shared folder: the workers read ``teacher.cache_dir`` where the teacher actor wrote it.
On one node that is simply the folder; on a cluster it must be storage every node reads (NFS, a
mounted bucket). A worker that does not find the folder stops the run with one line saying so.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raykd.checksums import file_sha256
from raykd.errors import ConfigError

MANIFEST = "manifest.json"
# One pread covers the rows' whole span when it is at most this large (or 4x the rows' bytes):
# fewer system calls for dense batches, and still a bounded buffer.
_SPAN_BYTES = 1 << 20
DEFAULT_RESIDENT_BYTES = 64 << 20


def resident_budget() -> int:
    """Bytes of cache a worker may hold whole (``RAYKD_CACHE_RESIDENT_BYTES``, default 64 MiB):
    a smaller cache is read once and indexed in memory (a step's rows in ~0.1 ms), a larger one
    row by row from the files (~0.3-0.6 ms for 256 scattered rows, read ahead in a thread)."""
    return int(os.environ.get("RAYKD_CACHE_RESIDENT_BYTES", DEFAULT_RESIDENT_BYTES))


@dataclass(frozen=True)
class CacheTable:
    """Where a published cache is and how its rows are laid out (from its manifest)."""

    path: str  # the cache folder: <teacher.cache_dir>/<key>
    num_samples: int
    arrays: dict[str, tuple[str, tuple[int, ...], str]]  # name → (file, shape, numpy dtype str)
    bounds: list[tuple[int, int]]  # shard k covers rows bounds[k][0]:bounds[k][1]
    sha256: list[dict[str, str]] = field(default_factory=list)  # per shard: {file: sha256}

    @classmethod
    def from_manifest(cls, path: str | Path, manifest: dict[str, Any]) -> CacheTable:
        """The table of the cache in ``path`` (the manifest already checked by its opener).
        A manifest without per-shard sums (older caches) is one shard with the whole-file sums."""
        arrays = {name: (a["file"], tuple(int(d) for d in a["shape"]), a["storage_dtype"])
                  for name, a in manifest["arrays"].items()}
        n = next(iter(arrays.values()))[1][0]
        shards = manifest.get("shards") or {}
        if shards.get("sha256"):
            size = int(shards["size"])
            bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
            sums = [dict(s) for s in shards["sha256"]]
        else:
            bounds, sums = [(0, n)], [dict(manifest.get("checksums") or {})]
        return cls(str(path), n, arrays, bounds, sums)


class CacheReader:
    """Rows of a cache read from its files (see the module docstring). Thread-safe: a prefetch
    thread and the training step may read at once."""

    def __init__(self, table: CacheTable):
        self.table = table
        self.path = Path(table.path)
        self._starts = np.array([b[0] for b in table.bounds], dtype=np.int64)
        self._files: dict[str, tuple[int, int, int, np.dtype, tuple[int, ...]]] = {}
        self._verified: set[int] = set()
        # A cache of at most RAYKD_CACHE_RESIDENT_BYTES is held whole once read (each shard as
        # it is verified: those bytes are read anyway); a larger one is read row by row.
        total = table.num_samples * sum(int(np.prod(shape[1:])) * np.dtype(dt).itemsize
                                        for _, shape, dt in table.arrays.values())
        self.keep = total <= resident_budget()
        self._kept: dict[str, np.ndarray] = {}  # array name → all rows (verified shards filled)
        self._lock = threading.RLock()  # _open may close() while holding it
        self.verified_bytes = 0  # bytes checksummed so far (each shard once)
        self.read_calls = 0  # preads of rows so far

    # -- opening -----------------------------------------------------------------------------
    def _open(self) -> None:
        """Open every array file once: fd, data offset, bytes per row, dtype, row shape."""
        if self._files:
            return
        if not (self.path / MANIFEST).is_file():
            raise ConfigError(
                f"teacher.cache_dir: the teacher cache {self.path} is not on this node "
                f"({socket.gethostname()}); put teacher.cache_dir on storage every node reads "
                f"(a shared path)")
        from raykd.teacher.shards import npy_data_offset

        for name, (file, shape, dtype) in self.table.arrays.items():
            full = self.path / file
            dt = np.dtype(dtype)
            try:
                offset = npy_data_offset(full)
                fd = os.open(full, os.O_RDONLY)
            except (OSError, ValueError, EOFError) as err:
                self.close()
                raise ConfigError(self._damaged(file, f"cannot be read ({err})")) from None
            row_shape = tuple(shape[1:])
            self._files[name] = (fd, offset, int(np.prod(row_shape)) * dt.itemsize, dt, row_shape)

    def _damaged(self, file: str, what: str) -> str:
        return (f"teacher.cache_dir: {self.path / file} {what}; it is not served. Run `raykd "
                f"cache verify {self.path}`, then rerun (the cache is rebuilt)")

    def _verify(self, shards: np.ndarray) -> None:
        """Checksum every shard of ``shards`` not yet checked (once per reader)."""
        todo = [int(k) for k in shards if int(k) not in self._verified]
        if not todo:
            return
        with self._lock:
            self._open()
            for k in todo:
                if k in self._verified:
                    continue
                start, end = self.table.bounds[k]
                want = self.table.sha256[k] if k < len(self.table.sha256) else {}
                for name, (fd, offset, row, dtype, shape) in self._files.items():
                    file = self.table.arrays[name][0]
                    if self.keep:  # read whole once: hash these bytes, then serve from them
                        if name not in self._kept:  # untouched pages: no memory until read
                            n = self.table.num_samples
                            self._kept[name] = np.empty((n, *shape), dtype=dtype)
                        buf = memoryview(self._kept[name][start:end]).cast("B")
                        if os.preadv(fd, [buf], offset + start * row) != len(buf):
                            raise ConfigError(self._damaged(file, "is truncated"))
                        got = hashlib.sha256(buf).hexdigest()
                    else:
                        got = file_sha256(self.path / file, offset=offset + start * row,
                                          length=(end - start) * row)
                    self.verified_bytes += (end - start) * row
                    if got != want.get(file):
                        raise ConfigError(self._damaged(
                            file, f"rows {start}:{end} do not match their sha256 checksum"))
                self._verified.add(k)

    # -- reading -----------------------------------------------------------------------------
    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._starts, rows, side="right") - 1

    def rows(self, idx) -> dict[str, np.ndarray]:
        """``{array name: rows [len(idx), ...]}`` of samples ``idx`` (any order, repeats
        allowed), each shard they touch verified first."""
        rows = np.asarray(idx, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.table.num_samples):
            bad = rows[(rows < 0) | (rows >= self.table.num_samples)][0]
            raise IndexError(f"sample index {int(bad)} is outside the cache's "
                             f"{self.table.num_samples} rows")
        if not self._files:
            with self._lock:
                self._open()
        if rows.size:
            self._verify(np.unique(self.shard_of(rows)))
        if self.keep:
            return self._gather_kept(rows)
        uniq, inverse = np.unique(rows, return_inverse=True)
        return {name: self._read(name, uniq)[inverse] for name in self.table.arrays}

    def _gather_kept(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows from the verified shards held in memory (a small cache): one gather each."""
        if not rows.size:
            return {name: np.empty((0, *shape), dtype=dtype)
                    for name, (_, _, _, dtype, shape) in self._files.items()}
        return {name: a[rows] for name, a in self._kept.items()}

    def _read(self, name: str, uniq: np.ndarray) -> np.ndarray:
        """Rows ``uniq`` (sorted, distinct) of one array: one read over their span when it is
        small, else one read per run of consecutive rows; straight into the result's memory
        (``os.preadv``), so a batch leaves no garbage of small buffers behind."""
        fd, offset, row, dtype, shape = self._files[name]
        out = np.empty((len(uniq), *shape), dtype=dtype)
        if not len(uniq):
            return out
        lo, hi = int(uniq[0]), int(uniq[-1]) + 1
        if (hi - lo) * row <= max(_SPAN_BYTES, 4 * len(uniq) * row):
            span = np.empty((hi - lo, *shape), dtype=dtype)
            self._pread_into(name, fd, memoryview(span).cast("B"), offset + lo * row)
            out[:] = span[uniq - lo]
            return out
        view = memoryview(out).cast("B")
        starts = np.concatenate(([0], np.flatnonzero(np.diff(uniq) != 1) + 1))
        ends = np.append(starts[1:], len(uniq))
        self.read_calls += len(starts)
        # plain ints in a tight loop: a system call per run is the cost, not numpy per run
        for a, b, first in zip((starts * row).tolist(), (ends * row).tolist(),
                               (offset + uniq[starts] * row).tolist()):
            if os.preadv(fd, [view[a:b]], first) != b - a:  # shrank after it was verified
                raise ConfigError(self._damaged(self.table.arrays[name][0], "is truncated"))
        return out

    def _pread_into(self, name: str, fd: int, buf: memoryview, offset: int) -> None:
        self.read_calls += 1
        if os.preadv(fd, [buf], offset) != len(buf):  # the file shrank after it was verified
            raise ConfigError(self._damaged(self.table.arrays[name][0], "is truncated"))

    def close(self) -> None:
        with self._lock:  # not while a prefetch reads
            files, self._files = self._files, {}
            self._kept.clear()
            self._verified.clear()
        for fd, *_ in files.values():
            os.close(fd)

