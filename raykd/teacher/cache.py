"""Teacher soft-label cache: the teacher's RAW logits over a dataset split, on disk, memory-mapped.

Layout ``<root>/<key>/``: ``manifest.json`` plus ``.npy`` arrays (written with
``np.lib.format.open_memmap``, read with ``np.load(mmap_mode="r", allow_pickle=False)``; nothing
is ever pickled, so opening a cache cannot execute code)::

    dense  logits.npy        [N, V, C]  cache dtype (bfloat16 as raw uint16 bits)
    top-k  topk_values.npy   [N, V, k]  cache dtype
           topk_indices.npy  [N, V, k]  uint8 / uint16 / int32 (smallest that holds C)
           tail.npy          [N, V]     cache dtype: mean of the other C−k logits

Raw logits, not probabilities: the temperature is applied at read time, so every Tune trial over
T reads one cache. V is the number of views per sample: 1 in ``cached`` mode; in ``replay`` mode
view v of sample i is the seeded augmentation that the caller's ``produce`` applies. The top-k
encoding and its reconstruction (and why it is approximate) are documented in ``topk.py``.

Identity: a :class:`CacheSpec` holds everything the logits depend on (teacher weights fingerprint,
dataset identity, split, preprocessing, views, augmentation, dtype, top-k, sizes, format version).
Its ``key()`` names the folder, so a changed teacher lands in a new folder instead of reading an
old one: its status is ``missing``, and the reason names the fields in which the nearest existing
cache differs. The manifest repeats the spec, so a folder under the key that does not match it
(copied by hand, a key collision) is reported ``stale`` rather than served.

Integrity: :func:`check_cache` compares every ``.npy`` header and file size with the shapes the spec
implies (``truncated``), then the sha256 of every array file with the manifest (``corrupt``).
Checksumming reads the whole cache once per open — ~0.6 s per GB of sha256 plus the disk reads —
which is cheap next to serving a silently damaged cache to every trial; ``verify=False`` skips it.

Atomicity: :func:`build_cache` writes into a hidden sibling folder, writes the manifest last, and
renames the folder into place; nothing half-written is ever visible under ``<key>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raykd.teacher.topk import (DTYPES, STORAGE, CacheShard, array_layout, bytes_per_row,
                                effective_topk, encode_rows, lookup, reconstruct_topk)

__all__ = ["FORMAT_VERSION", "CacheError", "CacheShard", "CacheSpec", "CacheStatus",
           "TeacherCache", "build_cache", "check_cache", "inspect_cache", "lookup",
           "reconstruct_topk", "teacher_fingerprint", "verify_cache"]

FORMAT_VERSION = 1  # bump whenever the layout or encoding changes: old folders then go unread
STATES = ("fresh", "missing", "stale", "truncated", "corrupt")
MANIFEST = "manifest.json"
_CHUNK = 8 << 20


class CacheError(RuntimeError):
    """A cache that cannot be built or served (not fresh, bad produce() output, ...)."""


@dataclass(frozen=True, kw_only=True)
class CacheSpec:
    """Everything the cached logits depend on. Keyword-only, so fields cannot be mixed up."""

    teacher_fingerprint: str
    dataset_identity: str
    split: str
    preprocessing: str
    num_samples: int
    num_classes: int
    views: int = 1
    dtype: str = "float16"
    topk: int | None = None
    augment: str = ""  # description of the replayed augmentation; '' for none
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CacheError(f"cache dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        # numpy integers are accepted and stored as int: the spec must round-trip through JSON.
        for name, low in (("num_samples", 1), ("num_classes", 2), ("views", 1), ("topk", 1)):
            value = getattr(self, name)
            if value is None and name == "topk":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise CacheError(f"cache {name} must be an integer ≥ {low}, got {value!r}")
            object.__setattr__(self, name, int(value))
        # k ≥ C stores dense rows; normalising here gives both spellings the same key and folder.
        object.__setattr__(self, "topk", effective_topk(self.topk, self.num_classes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Folder name: 20 hex digits (80 bits) of sha256 over every field."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class CacheStatus:
    state: str  # one of STATES
    reason: str = ""

    @property
    def fresh(self) -> bool:
        return self.state == "fresh"

    def __str__(self) -> str:
        return f"{self.state}: {self.reason}" if self.reason else self.state


def teacher_fingerprint(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, names sorted within each state
    dict. Several dicts = an ensemble teacher; their order matters (member i is hashed as i)."""
    if isinstance(state_dicts, Mapping):
        state_dicts = [state_dicts]
    h = hashlib.sha256(f"raykd-teacher:{len(state_dicts)}".encode())
    for member, state in enumerate(state_dicts):
        h.update(f"\0member:{member}:{len(state)}".encode())
        for name in sorted(state):
            tensor = state[name]
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a "
                                f"tensor; the fingerprint hashes tensors only")
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"\0{len(name)}:{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # bit-exact, any dtype incl. bf16
    return h.hexdigest()


# -- integrity -------------------------------------------------------------------------------
def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
        if fsync:  # fsync on a read-only descriptor still flushes the file's dirty pages (Linux)
            os.fsync(fh.fileno())
    return h.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any]:
    """The folder's manifest; ValueError (or OSError) if it is not a JSON object."""
    manifest = json.loads((path / MANIFEST).read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("spec"), dict):
        raise ValueError("manifest.json holds no spec")
    return manifest


def _spec_layout(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return array_layout(spec.num_samples, spec.views, spec.num_classes, spec.dtype, spec.topk)


def _check_arrays(path: Path, manifest: dict[str, Any], spec: CacheSpec,
                  verify: bool) -> CacheStatus:
    """Shapes/sizes against what the spec implies (not what the manifest claims), then sums."""
    layout = _spec_layout(spec)
    for name, (shape, dtype) in layout.items():
        file = path / f"{name}.npy"
        if not file.is_file():
            return CacheStatus("truncated", f"{file.name} is missing")
        try:
            with open(file, "rb") as fh:
                major, _ = np.lib.format.read_magic(fh)
                read = (np.lib.format.read_array_header_1_0 if major == 1
                        else np.lib.format.read_array_header_2_0)
                got_shape, fortran, got_dtype = read(fh)
                offset = fh.tell()
        except (ValueError, OSError, EOFError) as err:
            return CacheStatus("truncated", f"{file.name}: unreadable header ({err})")
        if tuple(got_shape) != shape or got_dtype != dtype or fortran:
            return CacheStatus("truncated", f"{file.name} holds {got_dtype}{list(got_shape)}, "
                                            f"expected {dtype}{list(shape)}")
        want, size = offset + int(np.prod(shape)) * dtype.itemsize, file.stat().st_size
        if size < want:
            return CacheStatus("truncated", f"{file.name} has {size} of {want} bytes")
        if size > want:
            return CacheStatus("corrupt", f"{file.name} has {size - want} trailing bytes")
    if verify:
        sums = manifest.get("checksums") or {}
        for name in layout:
            if _sha256(path / f"{name}.npy") != sums.get(f"{name}.npy"):
                return CacheStatus("corrupt", f"{name}.npy does not match its sha256 checksum")
    return CacheStatus("fresh", f"{path.name}: {spec.num_samples}×{spec.views} rows verified"
                       if verify else f"{path.name}: shapes match (checksums not verified)")


def _spec_diff(recorded: Mapping[str, Any], spec: CacheSpec) -> list[str]:
    expected = spec.to_dict()
    return sorted(k for k in expected.keys() | recorded.keys()
                  if recorded.get(k, None) != expected.get(k, None))


def _nearest(root: Path, spec: CacheSpec) -> str:
    """Why a key is missing, in the user's terms: which fields differ from the closest other
    cache under ``root`` (a changed teacher reads 'differs in teacher_fingerprint')."""
    best: tuple[int, str, list[str]] | None = None
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for folder in sorted(folders)[:256]:  # bounded: this only words a message
        try:
            diff = _spec_diff(_read_manifest(folder)["spec"], spec)
        except (OSError, ValueError):
            continue
        if best is None or len(diff) < best[0]:
            best = (len(diff), folder.name, diff)
    if best is None:
        return ""
    return f"; nearest cache {best[1]} differs in {', '.join(best[2])}"


def check_cache(root: str | Path, spec: CacheSpec, verify: bool = True) -> CacheStatus:
    """State of the cache for ``spec`` under ``root``: fresh | missing | stale | truncated |
    corrupt, with a one-line reason. ``verify`` also compares sha256 checksums (reads it all)."""
    root = Path(root).expanduser()
    path = root / spec.key()
    if not (path / MANIFEST).is_file():
        near = _nearest(root, spec) if root.is_dir() else ""
        return CacheStatus("missing", f"no cache {spec.key()} under {root}{near}")
    try:
        manifest = _read_manifest(path)
    except (OSError, ValueError) as err:
        return CacheStatus("corrupt", f"{path / MANIFEST} is unreadable ({err})")
    diff = _spec_diff(manifest["spec"], spec)
    if diff:
        return CacheStatus("stale", f"{path} was built for a different {', '.join(diff)}")
    return _check_arrays(path, manifest, spec, verify)


def verify_cache(path: str | Path, verify: bool = True) -> CacheStatus:
    """A cache folder checked against its own manifest (``raykd cache verify``)."""
    path = Path(path).expanduser()
    if not (path / MANIFEST).is_file():
        return CacheStatus("missing", f"no {MANIFEST} in {path}")
    try:
        manifest = _read_manifest(path)
        spec = CacheSpec(**manifest["spec"])
    except (OSError, ValueError, TypeError, CacheError) as err:
        return CacheStatus("corrupt", f"{path / MANIFEST} is unreadable ({err})")
    if spec.format_version != FORMAT_VERSION:
        return CacheStatus("stale", f"format version {spec.format_version}, this raykd reads "
                                    f"{FORMAT_VERSION}")
    if path.name != spec.key():
        return CacheStatus("stale", f"folder {path.name} is not its spec's key {spec.key()}")
    return _check_arrays(path, manifest, spec, verify)


# -- building --------------------------------------------------------------------------------
def _checked(out: Any, start: int, end: int, view: int, num_classes: int) -> torch.Tensor:
    logits = torch.as_tensor(out).detach().to("cpu", torch.float32)
    if tuple(logits.shape) != (end - start, num_classes):
        raise CacheError(f"produce({start}, {end}, {view}) returned shape {tuple(logits.shape)}, "
                         f"expected ({end - start}, {num_classes})")
    if not bool(torch.isfinite(logits).all()):
        raise CacheError(f"produce({start}, {end}, {view}) returned non-finite logits")
    return logits


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:  # makes the rename itself durable; not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(root: Path, spec: CacheSpec, tmp: Path) -> Path:
    """Rename ``tmp`` to ``root/<key>``. rename(2) cannot replace a non-empty folder, so an old
    one is first renamed aside (the key is then briefly missing, never half-written). A fresh
    cache that a concurrent builder published first is kept and ours discarded."""
    final = root / spec.key()
    for _ in range(5):
        try:
            os.rename(tmp, final)
            _fsync_dir(root)
            return final
        except OSError:
            if not final.exists():
                raise
        if check_cache(root, spec).fresh:
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        trash = root / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            continue  # someone else moved it meanwhile: try our rename again
        shutil.rmtree(trash, ignore_errors=True)
    raise CacheError(f"could not publish {final}: another process keeps replacing it")


def build_cache(root: str | Path, spec: CacheSpec,
                produce: Callable[[int, int, int], torch.Tensor], batch_size: int,
                progress: bool = True) -> Path:
    """Run ``produce(start, end, view) -> raw logits [end−start, C]`` over every view and batch,
    write the arrays, checksums and (last) the manifest, publish atomically. Returns the folder.
    Any stale, truncated or corrupt folder under the key is replaced."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise CacheError(f"batch_size must be ≥ 1, got {batch_size}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    key = spec.key()
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        layout = _spec_layout(spec)
        maps = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype,
                                                shape=shape)
                for name, (shape, dtype) in layout.items()}
        total = spec.num_samples * spec.views
        # In an actor stderr is a pipe to the driver's log: a line every 10 s, not every batch.
        with tqdm(total=total, unit="sample", desc=f"teacher cache {key}",
                  disable=not progress, mininterval=0.1 if sys.stderr.isatty() else 10.0) as bar:
            for view in range(spec.views):
                for start in range(0, spec.num_samples, batch_size):
                    end = min(start + batch_size, spec.num_samples)
                    logits = _checked(produce(start, end, view), start, end, view,
                                      spec.num_classes)
                    try:
                        rows = encode_rows(logits, spec.dtype, spec.topk)
                    except ValueError as err:
                        raise CacheError(f"samples {start}:{end} view {view}: {err}") from None
                    for name, block in rows.items():
                        maps[name][start:end, view] = block
                    bar.update(end - start)
        for name in list(maps):  # flush and unmap before reading the files back for checksums
            maps.pop(name).flush()
        checksums = {f"{name}.npy": _sha256(tmp / f"{name}.npy", fsync=True) for name in layout}
        manifest = {
            "format_version": FORMAT_VERSION, "key": key, "spec": spec.to_dict(),
            "encoding": "topk" if spec.topk else "dense", "dtype": spec.dtype,
            "arrays": {name: {"file": f"{name}.npy", "shape": list(shape), "storage_dtype": dt.str}
                       for name, (shape, dt) in layout.items()},
            "checksums": checksums,
            "bytes_per_sample": bytes_per_row(spec.num_classes, spec.dtype, spec.topk),
            "created": datetime.now(UTC).isoformat(timespec="seconds")}
        _write_json(tmp / MANIFEST, manifest)  # last: a folder without it is never "fresh"
        return _publish(root, spec, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- reading ---------------------------------------------------------------------------------
class TeacherCache:
    """A fresh cache, memory-mapped read-only. Open with :meth:`open`."""

    def __init__(self, path: Path, spec: CacheSpec, manifest: dict[str, Any],
                 arrays: dict[str, np.ndarray]):
        self.path, self.spec, self.manifest, self.arrays = path, spec, manifest, arrays
        self.is_topk = spec.topk is not None
        self.num_samples, self.num_classes, self.views = (spec.num_samples, spec.num_classes,
                                                          spec.views)
        self.bytes_per_sample = bytes_per_row(spec.num_classes, spec.dtype, spec.topk)

    @classmethod
    def open(cls, root: str | Path, spec: CacheSpec, verify: bool = True) -> TeacherCache:
        status = check_cache(root, spec, verify=verify)
        if not status.fresh:
            raise CacheError(f"teacher cache is {status.state}: {status.reason}")
        path = Path(root).expanduser() / spec.key()
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                  for name in _spec_layout(spec)}
        return cls(path, spec, _read_manifest(path), arrays)

    def shards(self, shard_size: int, copy: bool = False) -> list[CacheShard]:
        """Contiguous row ranges of at most ``shard_size`` samples (all views). Arrays are
        read-only memmap slices, or with ``copy`` plain contiguous in-memory ndarrays (what
        Ray's object store holds zero-copy)."""
        if shard_size < 1:
            raise CacheError(f"shard_size must be ≥ 1, got {shard_size}")
        meta = np.array([self.num_classes], dtype=np.int64)
        out = []
        for start in range(0, self.num_samples, shard_size):
            end = min(start + shard_size, self.num_samples)
            arrays = {name: np.array(a[start:end]) if copy else a[start:end]
                      for name, a in self.arrays.items()}
            out.append(CacheShard(start, end, {**arrays, "num_classes": meta.copy()}))
        return out

    def read(self, idx: torch.Tensor, view: torch.Tensor | int = 0) -> torch.Tensor:
        """float32 logits [B, C] straight from the memmaps (no sharding; local use and tests)."""
        return lookup(self.shards(self.num_samples), idx, view)


# -- inspection ------------------------------------------------------------------------------
def inspect_cache(path: str | Path) -> dict[str, Any]:
    """Summary of one cache folder for ``raykd cache inspect`` (no checksumming)."""
    path = Path(path).expanduser()
    try:
        manifest = _read_manifest(path)
    except (OSError, ValueError) as err:
        raise CacheError(f"{path} is not a teacher cache ({err})") from None
    spec = manifest["spec"]
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    per_sample = int(manifest.get("bytes_per_sample", 0))
    dense = int(spec.get("num_classes", 0)) * STORAGE.get(spec.get("dtype"), STORAGE["float32"]
                                                          ).itemsize
    return {"path": str(path), "key": path.name, "format_version": manifest.get("format_version"),
            "encoding": manifest.get("encoding"), "dtype": manifest.get("dtype"), "spec": spec,
            "arrays": manifest.get("arrays", {}), "created": manifest.get("created"),
            "files": files, "total_bytes": sum(files.values()),
            "bytes_per_sample": per_sample, "dense_bytes_per_sample": dense,
            "compression": round(dense / per_sample, 2) if per_sample else None}
