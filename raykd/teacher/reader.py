"""Worker-side reading of a published teacher cache straight from its files, row by row.

A published cache (``cache.py``, ``shards.py``) is one ``.npy`` file per array over all N rows
plus ``manifest.json``, which keeps the sha256 of every shard's byte range in every file. The
driver hands each worker a :class:`CacheTable` — the folder, the arrays' files, shapes and
dtypes, the shard bounds and their checksums, all read from the manifest by the teacher actor —
and nothing else: no shard travels through Ray's object store, so nothing pins the cache there.

A :class:`CacheReader` opens the files lazily; the first time a step touches a shard it
re-hashes that shard's byte ranges (streamed through a 1 MiB buffer) and compares them with the
manifest: a mismatch is refused with one line naming the file and ``raykd cache verify``, never
served. Rows are read with ``os.preadv`` into the batch's own arrays (no memory map of the
file, whose touched pages would count as the worker's memory), so a worker's resident memory
holds a batch's rows, whatever the size of the cache; the page cache, which the kernel
reclaims, is not the process's memory.

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

from raykd.errors import ConfigError

MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 20  # bytes per read while checksumming a shard
# One pread covers the rows' whole span when it is at most this large (or 4x the rows' bytes):
# fewer system calls for dense batches, and still a bounded buffer.
_SPAN_BYTES = 1 << 20


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
        self._lock = threading.Lock()
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
                for name, (fd, offset, row, _, _) in self._files.items():
                    file = self.table.arrays[name][0]
                    got = _range_sha256(fd, offset + start * row, (end - start) * row)
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
        uniq, inverse = np.unique(rows, return_inverse=True)
        return {name: self._read(name, uniq)[inverse] for name in self.table.arrays}

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
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        pos = 0
        for run in np.split(uniq, breaks):
            n = len(run)
            self._pread_into(name, fd, view[pos * row:(pos + n) * row],
                             offset + int(run[0]) * row)
            pos += n
        return out

    def _pread_into(self, name: str, fd: int, buf: memoryview, offset: int) -> None:
        self.read_calls += 1
        if os.preadv(fd, [buf], offset) != len(buf):  # the file shrank after it was verified
            raise ConfigError(self._damaged(self.table.arrays[name][0], "is truncated"))

    def close(self) -> None:
        with self._lock:  # not while a prefetch reads
            files, self._files = self._files, {}
        for fd, *_ in files.values():
            os.close(fd)


def _range_sha256(fd: int, offset: int, length: int) -> str:
    h = hashlib.sha256()
    while length > 0:
        chunk = os.pread(fd, min(_HASH_CHUNK, length), offset)
        if not chunk:
            break  # short file: the digest then differs from the manifest's
        h.update(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return h.hexdigest()
