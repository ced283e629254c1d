"""Teacher soft-label cache: the teacher's RAW logits over a dataset split, on disk.

Layout ``<root>/<key>/``: ``manifest.json`` plus ``.npy`` arrays (written through memory maps;
workers read rows with ``reader.py``; nothing is ever pickled, so opening one runs no code)::

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

Atomicity and resuming: caches are written shard by shard into a hidden sibling folder that a
restarted build finds again (``shards.py``: finished shards are checksummed and kept, the rest
recomputed); the manifest is written last and the folder renamed into place, so nothing
half-written is ever visible under ``<key>``. Filled by a pool of replicas (``pool.py``) or a
``produce`` function (:func:`build_cache`, the actor's own teacher when replicas = 1).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raykd.checksums import file_sha256, update_with_tensors
from raykd.teacher.files import CacheError, build_lock
from raykd.teacher.shards import ShardWriter, batch_ranges
from raykd.teacher.topk import (DTYPES, CacheShard, array_layout, bytes_per_row,
                                effective_topk, encode_rows, lookup, reconstruct_topk)

__all__ = ["FORMAT_VERSION", "BuildResult", "CacheError", "CacheShard", "CacheSpec", "CacheStatus",
           "TeacherCache", "build_cache", "check_cache", "encode_views", "fill_cache", "lookup",
           "nearest_cache", "produced_rows", "read_manifest", "reconstruct_topk",
           "teacher_fingerprint", "verify_cache"]

FORMAT_VERSION = 1  # bump whenever the layout or encoding changes: old folders then go unread
STATES = ("fresh", "missing", "stale", "truncated", "corrupt")
MANIFEST = "manifest.json"


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

    # What the writer, the checks and the pool ask of a spec (the per-token spec of language
    # models, token_cache.TokenCacheSpec, answers the same four): the arrays, how a teacher
    # batch is encoded into their rows, how many rows one teacher pass takes, manifest fields.
    def layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return array_layout(self.num_samples, self.views, self.num_classes, self.dtype,
                            self.topk)

    def encode(self, per_view: Sequence[Any], start: int, end: int) -> dict[str, np.ndarray]:
        return encode_views(per_view, self, start, end)

    def teacher_batch(self, batch_size: int) -> int:
        return batch_size

    def manifest_extras(self) -> dict[str, Any]:
        return {"encoding": "topk" if self.topk else "dense",
                "bytes_per_sample": bytes_per_row(self.num_classes, self.dtype, self.topk)}


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
            h.update(f"\0{len(name)}:{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
            update_with_tensors(h, [tensor])  # bit-exact, any dtype incl. bf16
    return h.hexdigest()


# -- integrity -------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict[str, Any]:
    """The folder's manifest; ValueError (or OSError) if it is not a JSON object."""
    manifest = json.loads((path / MANIFEST).read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("spec"), dict):
        raise ValueError("manifest.json holds no spec")
    return manifest


def _check_arrays(path: Path, manifest: dict[str, Any], spec: CacheSpec,
                  verify: bool) -> CacheStatus:
    """Shapes/sizes against what the spec implies (not what the manifest claims), then sums."""
    layout = spec.layout()
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
            if file_sha256(path / f"{name}.npy") != sums.get(f"{name}.npy"):
                return CacheStatus("corrupt", f"{name}.npy does not match its sha256 checksum")
    return CacheStatus("fresh", f"{path.name}: {spec.num_samples}×{spec.views} rows verified"
                       if verify else f"{path.name}: shapes match (checksums not verified)")


def _spec_diff(recorded: Mapping[str, Any], spec: CacheSpec) -> list[str]:
    expected = spec.to_dict()
    return sorted(k for k in expected.keys() | recorded.keys()
                  if recorded.get(k, None) != expected.get(k, None))


def nearest_cache(root: Path, spec, same_data: bool = False) -> tuple[str, list[str]] | None:
    """The other cache under ``root`` whose spec differs from ``spec`` in the fewest fields:
    ``(key, differing fields)``, or None. ``same_data`` keeps only caches of the same dataset
    identity and split. Only words messages and reports; it never changes what is served."""
    if not root.is_dir():
        return None
    want = spec.to_dict()
    best: tuple[int, str, list[str]] | None = None
    folders = [p for p in root.iterdir()
               if p.is_dir() and not p.name.startswith(".") and p.name != spec.key()]
    for folder in sorted(folders)[:256]:  # bounded: a message is not worth a long scan
        try:
            got = read_manifest(folder)["spec"]
        except (OSError, ValueError):
            continue
        if same_data and [got.get("dataset_identity"), got.get("split")] != [
                want.get("dataset_identity"), want.get("split")]:
            continue
        diff = _spec_diff(got, spec)
        if best is None or len(diff) < best[0]:
            best = (len(diff), folder.name, diff)
    return None if best is None else (best[1], best[2])


def check_cache(root: str | Path, spec: CacheSpec, verify: bool = True) -> CacheStatus:
    """State of the cache for ``spec`` under ``root``: fresh | missing | stale | truncated |
    corrupt, with a one-line reason. ``verify`` also compares sha256 checksums (reads it all)."""
    root = Path(root).expanduser()
    path = root / spec.key()
    if not (path / MANIFEST).is_file():
        near = nearest_cache(root, spec)
        near = f"; nearest cache {near[0]} differs in {', '.join(near[1])}" if near else ""
        return CacheStatus("missing", f"no cache {spec.key()} under {root}{near}")
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as err:
        return CacheStatus("corrupt", f"{path / MANIFEST} is unreadable ({err})")
    diff = _spec_diff(manifest["spec"], spec)
    if diff:
        return CacheStatus("stale", f"{path} was built for a different {', '.join(diff)}")
    return _check_arrays(path, manifest, spec, verify)


def verify_cache(path: str | Path, verify: bool = True, spec_type: type = None) -> CacheStatus:
    """A cache folder checked against its own manifest (``raykd cache verify``); ``spec_type``:
    the spec class its manifest holds (:class:`CacheSpec` unless said otherwise)."""
    path = Path(path).expanduser()
    if not (path / MANIFEST).is_file():
        return CacheStatus("missing", f"no {MANIFEST} in {path}")
    try:
        manifest = read_manifest(path)
        spec = (spec_type or CacheSpec)(**manifest["spec"])
    except (OSError, ValueError, TypeError, CacheError) as err:
        return CacheStatus("corrupt", f"{path / MANIFEST} is unreadable ({err})")
    current = type(spec).__dataclass_fields__["format_version"].default
    if spec.format_version != current:
        return CacheStatus("stale", f"format version {spec.format_version}, this raykd reads "
                                    f"{current}")
    if path.name != spec.key():
        return CacheStatus("stale", f"folder {path.name} is not its spec's key {spec.key()}")
    return _check_arrays(path, manifest, spec, verify)


# -- building --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildResult:  # computed: samples labelled now (all views); kept: verified old shards
    path: Path
    computed_samples: int
    kept_shards: int
    shards: int
    first_rows_s: float = 0.0  # until the first labelled rows arrived: the build's start-up


def encode_views(per_view: Sequence[Any], spec: CacheSpec, start: int, end: int
                 ) -> dict[str, np.ndarray]:
    """Raw logits of samples ``start:end`` (one [B, C] per view) → ``{array: rows [B, V, ...]}``,
    encoded; a wrong shape, a non-finite or overflowing logit is a CacheError, never stored."""
    encoded = []
    for view, out in enumerate(per_view):
        logits = torch.as_tensor(out).detach().to("cpu", torch.float32)
        if tuple(logits.shape) != (end - start, spec.num_classes):
            raise CacheError(f"teacher logits for samples {start}:{end} view {view} have shape "
                             f"{tuple(logits.shape)}, expected ({end - start}, "
                             f"{spec.num_classes})")
        if not bool(torch.isfinite(logits).all()):
            raise CacheError(f"teacher logits for samples {start}:{end} view {view} are "
                             f"non-finite")
        try:
            encoded.append(encode_rows(logits, spec.dtype, spec.topk))
        except ValueError as err:
            raise CacheError(f"samples {start}:{end} view {view}: {err}") from None
    return {name: np.stack([e[name] for e in encoded], axis=1) for name in encoded[0]}


def fill_cache(root: str | Path, spec: CacheSpec, shard_size: int,
               compute: Callable[[list[tuple[int, int]]], Iterator[tuple[np.ndarray, dict]]],
               progress: bool = True) -> BuildResult:
    """Build (or finish) the cache for ``spec`` under ``root``: ``compute(missing row ranges)``
    yields ``(sample indices, encoded rows)`` in any order; finished shards of an interrupted
    build are kept (``shards.py``). One builder per key at a time; publishes atomically."""
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise CacheError(f"shard_size must be ≥ 1, got {shard_size}")
    root = Path(root).expanduser()
    with build_lock(root):
        if (root / spec.key() / MANIFEST).is_file() and check_cache(root, spec).fresh:
            return BuildResult(root / spec.key(), 0, 0, 0)  # a concurrent builder was first
        writer = ShardWriter(root, spec, shard_size,
                             is_fresh=lambda: check_cache(root, spec).fresh)
        try:
            todo = writer.missing()
            total = sum(end - start for start, end in todo)
            started, first = time.perf_counter(), None
            # In an actor stderr is a pipe to the driver's log: a line every 10 s, not per batch.
            with tqdm(total=total * spec.views, unit="sample", desc=f"teacher cache {spec.key()}",
                      disable=not progress,
                      mininterval=0.1 if sys.stderr.isatty() else 10.0) as bar:
                for index, rows in compute(todo):
                    first = first or time.perf_counter() - started
                    writer.put(index, rows)
                    bar.update(len(index) * spec.views)
            path = writer.publish()
        finally:
            writer.close()
    return BuildResult(path, total, len(writer.kept), len(writer.bounds), round(first or 0.0, 3))


def build_cache(root: str | Path, spec: CacheSpec,
                produce: Callable[[int, int, int], torch.Tensor], batch_size: int,
                progress: bool = True, shard_size: int | None = None) -> Path:
    """In-process build: ``produce(start, end, view) -> raw logits [end−start, C]`` over every
    batch and view of the shards still missing. Returns the published folder. (The teacher
    actor builds through a pool of replicas instead: ``pool.py``.)"""
    return fill_cache(root, spec, shard_size or spec.num_samples,
                      produced_rows(produce, spec, batch_size), progress).path


def produced_rows(produce: Callable[[int, int, int], torch.Tensor], spec: CacheSpec,
                  batch_size: int):
    """``compute`` for :func:`fill_cache` from ``produce(start, end, view)``, batch by batch
    within each missing shard (the batches the pool's replicas see: ``pool.input_rows``)."""
    if batch_size < 1:
        raise CacheError(f"batch_size must be ≥ 1, got {batch_size}")

    def compute(todo: list[tuple[int, int]]) -> Iterator[tuple[np.ndarray, dict]]:
        for start, end in batch_ranges(todo, spec.teacher_batch(batch_size)):
            yield np.arange(start, end), spec.encode(
                [produce(start, end, view) for view in range(spec.views)], start, end)

    return compute


# -- reading ---------------------------------------------------------------------------------
class TeacherCache:
    """A fresh cache, memory-mapped read-only. Open with :meth:`open`."""

    def __init__(self, path: Path, spec: CacheSpec, manifest: dict[str, Any],
                 arrays: dict[str, np.ndarray]):
        self.path, self.spec, self.manifest, self.arrays = path, spec, manifest, arrays
        self.is_topk = spec.topk is not None
        self.num_samples, self.num_classes, self.views = (spec.num_samples, spec.num_classes,
                                                          spec.views)
        self.bytes_per_sample = int(manifest.get("bytes_per_sample", 0))

    @classmethod
    def open(cls, root: str | Path, spec: CacheSpec, verify: bool = True) -> TeacherCache:
        status = check_cache(root, spec, verify=verify)
        if not status.fresh:
            raise CacheError(f"teacher cache is {status.state}: {status.reason}")
        path = Path(root).expanduser() / spec.key()
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                  for name in spec.layout()}
        return cls(path, spec, read_manifest(path), arrays)

    def table(self):
        """What a worker needs to read this cache from its files (``reader.CacheTable``)."""
        from raykd.teacher.reader import CacheTable

        return CacheTable.from_manifest(self.path, self.manifest)

    def shards(self, shard_size: int, copy: bool = False) -> list[CacheShard]:
        """Row ranges of at most ``shard_size`` samples (all views): read-only memmap slices,
        or with ``copy`` in-memory ndarrays (local use and tests)."""
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
