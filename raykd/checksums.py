"""sha256 of files and tensors: the one way raykd checksums bytes (caches, datasets, weights).

Files are read in 8 MiB chunks, so checksumming a multi-GB cache or checkpoint never holds it in
memory. Tensors are hashed through flat byte views of their memory (no copy for contiguous CPU
tensors), so the same values in the same dtype and shape always give the same digest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

CHUNK = 8 << 20


def file_sha256(path: str | Path, fsync: bool = False, offset: int = 0,
                length: int | None = None) -> str:
    """sha256 hex of the file's bytes ``offset:offset+length`` (the whole file by default).
    ``fsync`` also flushes the file's dirty pages first: fsync on a read-only descriptor still
    does (Linux), so a checksum written after it describes bytes that are on the disk."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if fsync:
            os.fsync(fh.fileno())
        fh.seek(offset)
        left = length
        while left is None or left > 0:
            chunk = fh.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def tensor_bytes(tensor: torch.Tensor | np.ndarray) -> np.ndarray:
    """The raw bytes of a tensor or array, flat, as uint8 (bit-exact for any dtype, bfloat16
    included); a view when the memory is already contiguous on the CPU."""
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)


def update_with_tensors(digest, tensors: Iterable[torch.Tensor | np.ndarray]):
    """Feed every tensor's raw bytes to ``digest`` (a hashlib object), in order; returns it."""
    for tensor in tensors:
        digest.update(tensor_bytes(tensor))
    return digest


def tensors_sha256(*tensors: torch.Tensor | np.ndarray) -> str:
    """sha256 hex over the raw bytes of ``tensors``, in order."""
    return update_with_tensors(hashlib.sha256(), tensors).hexdigest()
