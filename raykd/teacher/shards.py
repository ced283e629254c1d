"""Writing the soft-label cache shard by shard, so that an interrupted build resumes.

The published layout is the one ``cache.py`` documents (one ``.npy`` per array over all N rows,
memory-mapped, plus ``manifest.json``); shard k is rows ``k·S : (k+1)·S`` of every array
(S = ``teacher.shard_size``, the same rows the actor serves as shard k), which is one contiguous
byte range of each file. While building, the files live in ``<root>/.partial-<key>/`` — a
name that a restarted build finds again — beside ``build.json`` (what is being built) and one
marker per finished shard, ``done/<k>.json``, holding the sha256 of the shard's byte range in
each array. A marker is written (fsync, atomic rename) only after the shard's rows are on the
disk, so a marker always describes finished rows.

Resuming: the partial folder is reused only when its ``build.json`` names the same spec and
shard size; each marked shard is re-checksummed and kept only if its bytes still match; every
other shard is computed again. Rows may arrive in any order (a pool of teacher replicas returns
batches as they finish): :meth:`ShardWriter.put` places them by index.

Repairing: the published manifest keeps the per-shard sums (``shards``). A published cache that
fails its checksum is moved back to the partial name with a marker per shard, so the same
verification keeps the shards that are intact and only the damaged ones are recomputed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from raykd.checksums import file_sha256
from raykd.teacher.files import (CacheError, fsync_dir, fsync_file, publish_folder,
                                 write_json_durable)

BUILD = "build.json"
DONE = "done"
MANIFEST = "manifest.json"


def shard_bounds(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """Row ranges ``[(start, end), ...]`` of the shards of a cache of ``num_samples`` rows."""
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def npy_data_offset(file: Path) -> int:
    """Byte offset of the array data in a ``.npy`` file (after its header)."""
    with open(file, "rb") as fh:
        major, _ = np.lib.format.read_magic(fh)
        read = (np.lib.format.read_array_header_1_0 if major == 1
                else np.lib.format.read_array_header_2_0)
        read(fh)
        return fh.tell()


class ShardWriter:
    """The partial build of one cache: which shards are finished, where rows go, publishing.

    ``spec`` is a :class:`raykd.teacher.cache.CacheSpec` (or the per-token
    ``token_cache.TokenCacheSpec``: the same ``layout()`` / ``manifest_extras()``);
    ``is_fresh()`` says whether a fresh cache under the key exists (a concurrent builder may
    publish first)."""

    def __init__(self, root: Path, spec, shard_size: int, is_fresh=lambda: False):
        self.root, self.spec, self.is_fresh = root, spec, is_fresh
        self.key = spec.key()
        self.final = root / self.key
        self.path = root / f".partial-{self.key}"
        self.bounds = shard_bounds(spec.num_samples, shard_size)
        self.shard_size = shard_size
        self.layout = spec.layout()
        self.meta = {"spec": spec.to_dict(), "shard_size": shard_size}
        self.sums: dict[int, dict[str, str]] = {}  # shard → {file: sha256 of its byte range}
        self.kept: list[int] = []  # finished shards found on disk and verified
        self.done = np.zeros(spec.num_samples, dtype=bool)
        self.maps: dict[str, np.memmap] = {}
        self._open()

    # -- opening / resuming ----------------------------------------------------------------
    def _open(self) -> None:
        self._adopt_published()
        if self._resumable():
            self.maps = {name: np.load(self.path / f"{name}.npy", mmap_mode="r+")
                         for name in self.layout}
            self._verify_markers()
            return
        shutil.rmtree(self.path, ignore_errors=True)
        (self.path / DONE).mkdir(parents=True)
        self.maps = {name: np.lib.format.open_memmap(self.path / f"{name}.npy", mode="w+",
                                                     dtype=dtype, shape=shape)
                     for name, (shape, dtype) in self.layout.items()}
        write_json_durable(self.path / BUILD, self.meta)

    def _adopt_published(self) -> None:
        """A damaged published cache with per-shard sums becomes the partial build (see module
        docstring); without them (older caches) it is simply rebuilt."""
        try:
            manifest = _read_json(self.final / MANIFEST)
            shards = manifest["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        if manifest.get("spec") != self.meta["spec"] or shards.get("size") != self.shard_size \
                or len(shards.get("sha256", [])) != len(self.bounds):
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self.final.rename(self.path)
        (self.path / MANIFEST).unlink()
        (self.path / DONE).mkdir(exist_ok=True)
        write_json_durable(self.path / BUILD, self.meta)
        for k, sums in enumerate(shards["sha256"]):
            write_json_durable(self.path / DONE / f"{k}.json", {"shard": k, "sha256": sums})

    def _resumable(self) -> bool:
        try:
            if _read_json(self.path / BUILD) != self.meta:
                return False
        except (OSError, ValueError):
            return False
        for name, (shape, dtype) in self.layout.items():
            file = self.path / f"{name}.npy"
            try:
                want = npy_data_offset(file) + int(np.prod(shape)) * dtype.itemsize
            except (OSError, ValueError, EOFError):
                return False
            if file.stat().st_size != want:
                return False
        return True

    def _verify_markers(self) -> None:
        for marker in sorted((self.path / DONE).glob("*.json")):
            try:
                k = int(_read_json(marker)["shard"])
                recorded = _read_json(marker)["sha256"]
                intact = 0 <= k < len(self.bounds) and self._range_sums(k) == recorded
            except (OSError, ValueError, KeyError, TypeError):
                intact = False
            if not intact:  # damaged or not ours: the shard is computed again
                marker.unlink(missing_ok=True)
                continue
            self.sums[k] = recorded
            self.kept.append(k)
            start, end = self.bounds[k]
            self.done[start:end] = True

    # -- writing ---------------------------------------------------------------------------
    def missing(self) -> list[tuple[int, int]]:
        """Row ranges of the shards still to compute, in order."""
        return [b for k, b in enumerate(self.bounds) if k not in self.sums]

    def put(self, index: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """Rows ``rows[name][i]`` ([V, ...] each) of samples ``index[i]``, in any order; a shard
        whose rows are all in is flushed and marked finished."""
        index = np.asarray(index, dtype=np.int64)
        for name in self.layout:
            self.maps[name][index] = rows[name]
        self.done[index] = True
        for k in np.unique(index // self.shard_size).tolist():
            start, end = self.bounds[k]
            if k not in self.sums and self.done[start:end].all():
                self._finish_shard(k)

    def _range_sums(self, k: int) -> dict[str, str]:
        start, end = self.bounds[k]
        out = {}
        for name, (shape, dtype) in self.layout.items():
            file = self.path / f"{name}.npy"
            row = int(np.prod(shape[1:])) * dtype.itemsize
            out[f"{name}.npy"] = file_sha256(file, offset=npy_data_offset(file) + start * row,
                                             length=(end - start) * row)
        return out

    def _finish_shard(self, k: int) -> None:
        for arr in self.maps.values():
            arr.flush()
        for name in self.layout:  # the rows are on the disk before their marker says so
            fsync_file(self.path / f"{name}.npy")
        self.sums[k] = self._range_sums(k)
        write_json_durable(self.path / DONE / f"{k}.json", {"shard": k, "sha256": self.sums[k]})

    def publish(self) -> Path:
        """Every shard finished: whole-file checksums, the manifest (last), atomic rename."""
        if len(self.sums) != len(self.bounds):
            raise CacheError(f"cache {self.key}: {len(self.bounds) - len(self.sums)} shard(s) "
                             f"were never computed")
        for name in list(self.maps):  # flush and unmap before reading the files back
            self.maps.pop(name).flush()
        spec = self.spec
        manifest: dict[str, Any] = {
            "format_version": spec.format_version, "key": self.key, "spec": spec.to_dict(),
            "dtype": spec.dtype, **spec.manifest_extras(),
            "arrays": {name: {"file": f"{name}.npy", "shape": list(shape), "storage_dtype": dt.str}
                       for name, (shape, dt) in self.layout.items()},
            "checksums": {f"{name}.npy": file_sha256(self.path / f"{name}.npy", fsync=True)
                          for name in self.layout},
            "shards": {"size": self.shard_size,
                       "sha256": [self.sums[k] for k in range(len(self.bounds))]},
            "created": datetime.now(UTC).isoformat(timespec="seconds")}
        write_json_durable(self.path / MANIFEST, manifest)  # last: without it, never "fresh"
        shutil.rmtree(self.path / DONE)  # the manifest holds the sums now
        (self.path / BUILD).unlink()
        fsync_dir(self.path)
        return publish_folder(self.path, self.final, self.is_fresh)

    def close(self) -> None:
        """Unmap without publishing (an interrupted build: the partial folder stays)."""
        for name in list(self.maps):
            self.maps.pop(name).flush()


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def batch_ranges(todo: list[tuple[int, int]], batch_size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each teacher batch over the row ranges ``todo``: the same batches in the
    actor and on the pool, so a cache is bit for bit the same whoever builds it."""
    for first, last in todo:
        for start in range(first, last, batch_size):
            yield start, min(start + batch_size, last)
