"""Durable, atomic file steps shared by every teacher cache (soft labels, per-token top-k):
write a JSON file so that it is on the disk before anything that names it, publish a folder built
under a hidden name by renaming it into place, and keep two builders of one key apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class CacheError(RuntimeError):
    """A cache that cannot be built or served (not fresh, bad teacher output, unpublishable)."""


def write_bytes_durable(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` through a temporary sibling, fsync it, rename it into place:
    a reader sees the old file or the whole new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_durable(path: Path, data: dict[str, Any]) -> None:
    """``data`` as indented JSON, written by :func:`write_bytes_durable`."""
    write_bytes_durable(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def fsync_file(path: Path) -> None:
    """Flush the file's dirty pages (memory-mapped writes included) to the disk."""
    with open(path, "rb") as fh:  # fsync on a read-only descriptor flushes them too (Linux)
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    try:  # makes a rename itself durable; not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(tmp: Path, final: Path, already_fresh: Callable[[], bool]) -> Path:
    """Rename the finished folder ``tmp`` to ``final``. rename(2) cannot replace a non-empty
    folder, so an old one is first renamed aside (the key is then briefly missing, never
    half-written). If a concurrent builder published a fresh folder first
    (``already_fresh()``), that one is kept and ``tmp`` discarded."""
    for _ in range(5):
        try:
            os.rename(tmp, final)
            fsync_dir(final.parent)
            return final
        except OSError:
            if not final.exists():
                raise
        if already_fresh():
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        trash = final.parent / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            continue  # someone else moved it meanwhile: try our rename again
        shutil.rmtree(trash, ignore_errors=True)
    raise CacheError(f"could not publish {final}: another process keeps replacing it")


@contextlib.contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """Exclusive lock for building caches under ``root`` (an flock on the folder itself, so it
    leaves no file behind): a second builder of the same cache waits, then finds it published
    instead of writing beside it. Builds of different caches in one folder take turns."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
