"""The per-token teacher cache of language models: for every position of every train block, the
teacher's top-k logits, their token ids and the log-mass of the rest (``TokenTopK``, format and
math in raykd.teacher.token_topk), at T = 1; the loss applies its temperature when it reads.

Layout ``<teacher.cache_dir>/<key>/``: ``manifest.json`` (the spec, the sha256 of the data file,
bytes per token) and ``token_topk.safetensors`` (no pickle; read memory-mapped). The key hashes
the :class:`TokenCacheSpec`: the teacher's weights, the tokenizer, the corpus checksum, the block
size, k, the dtype and the format — any change lands in a new folder, so nothing stale is read.
Written in a hidden sibling folder and renamed into place (manifest last), as the image cache.

The actor serves it in row shards of ``teacher.shard_size`` blocks through the object store,
as plain numpy arrays (:func:`shard_arrays`); workers rebuild a ``TokenTopK`` from them
(:func:`topk_from_shards`) and index it locally per step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raykd.checksums import file_sha256
from raykd.teacher.cache import CacheError, CacheStatus
from raykd.teacher.files import publish_folder, write_json_durable

FORMAT_VERSION = 1
KIND = "token_topk"
DATA_FILE = "token_topk.safetensors"
MANIFEST = "manifest.json"
DEFAULT_TOPK = 32  # teacher.topk unset: k per token (a few hundred bytes per token in fp16)
MAX_LOGITS_BYTES = 1 << 28  # one teacher pass holds at most this much float32 logits


@dataclass(frozen=True, kw_only=True)
class TokenCacheSpec:
    teacher_fingerprint: str
    dataset_identity: str  # corpus sha256, tokenizer sha256, block size (raykd.data.text)
    corpus_sha256: str
    tokenizer_sha256: str
    block_size: int
    num_samples: int  # blocks of the train split
    num_classes: int  # the vocabulary
    topk: int
    dtype: str = "float16"
    split: str = "train"
    kind: str = KIND
    format_version: int = FORMAT_VERSION
    views: int = 1  # what the image cache's readers ask of every spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def token_spec(cfg, info, fingerprint: str, num_blocks: int, teacher_info=None
               ) -> TokenCacheSpec:
    """``teacher_info``: the teacher's own tokenizer's info when it is not the data's
    (raykd.data.cross_tokens); the cached ids, vocabulary and tokenizer checksum are its."""
    own = teacher_info or info
    if cfg.teacher.cache_dtype not in ("float16", "bfloat16"):
        from raykd.config import ConfigError

        raise ConfigError(f"teacher.cache_dtype: the per-token cache stores float16 or "
                          f"bfloat16, not {cfg.teacher.cache_dtype}; set "
                          f"teacher.cache_dtype=float16")
    return TokenCacheSpec(
        teacher_fingerprint=fingerprint, dataset_identity=info.identity,
        corpus_sha256=info.corpus_sha256, tokenizer_sha256=own.tokenizer_sha256,
        block_size=info.block_size, num_samples=num_blocks, num_classes=own.vocab_size,
        topk=min(cfg.teacher.topk or DEFAULT_TOPK, own.vocab_size),
        dtype=cfg.teacher.cache_dtype)


def is_token_cache(path: str | Path) -> bool:
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def _check_folder(path: Path, spec_dict: dict[str, Any] | None, verify: bool) -> CacheStatus:
    if not (path / MANIFEST).is_file():
        return CacheStatus("missing", f"no per-token cache {path.name} under {path.parent}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        recorded = manifest["spec"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return CacheStatus("corrupt", f"{path / MANIFEST} is unreadable ({err})")
    if spec_dict is not None and recorded != spec_dict:
        diff = sorted(k for k in spec_dict.keys() | recorded.keys()
                      if recorded.get(k) != spec_dict.get(k))
        return CacheStatus("stale", f"{path} was built for a different {', '.join(diff)}")
    if not (path / DATA_FILE).is_file():
        return CacheStatus("truncated", f"{DATA_FILE} is missing")
    if (path / DATA_FILE).stat().st_size != manifest.get("data_bytes"):
        return CacheStatus("truncated", f"{DATA_FILE} has {(path / DATA_FILE).stat().st_size} "
                                        f"bytes, the manifest says {manifest.get('data_bytes')}")
    if verify and file_sha256(path / DATA_FILE) != manifest.get("sha256"):
        return CacheStatus("corrupt", f"{DATA_FILE} does not match its sha256 checksum")
    checked = " verified" if verify else ""
    return CacheStatus("fresh", f"{path.name}: {recorded['num_samples']} blocks × "
                                f"{recorded['block_size']} tokens{checked}")


def check_token_cache(root: str | Path, spec: TokenCacheSpec, verify: bool = True
                      ) -> CacheStatus:
    return _check_folder(Path(root).expanduser() / spec.key(), spec.to_dict(), verify)


def build_token_cache(root: str | Path, spec: TokenCacheSpec,
                      produce: Callable[[int, int], torch.Tensor], batch_size: int,
                      lengths: torch.Tensor | None = None) -> Path:
    """Run ``produce(start, end) -> logits [end−start, L, V]`` over the blocks, encode each
    batch's top-k, write the file and (last) the manifest, publish the folder atomically.

    ``lengths`` [num_samples]: real teacher positions per block when the teacher read its own
    tokenization of the text (raykd.data.cross_tokens); the positions after them get a NaN
    tail log-mass, "no teacher token here", which ``token_uld`` leaves out."""
    from raykd.teacher.token_topk import (TokenTopK, bytes_per_token, encode_token_topk,
                                          save_token_topk)

    dtype = getattr(torch, spec.dtype)
    rows = max(1, min(batch_size, MAX_LOGITS_BYTES // (4 * spec.block_size * spec.num_classes)))
    parts = []
    for start in range(0, spec.num_samples, rows):
        end = min(start + rows, spec.num_samples)
        logits = produce(start, end)
        if tuple(logits.shape) != (end - start, spec.block_size, spec.num_classes):
            raise CacheError(f"teacher logits for blocks {start}:{end} have shape "
                             f"{tuple(logits.shape)}, expected ({end - start}, "
                             f"{spec.block_size}, {spec.num_classes})")
        if not bool(torch.isfinite(logits).all()):
            raise CacheError(f"teacher logits for blocks {start}:{end} are not finite")
        part = encode_token_topk(logits.float(), spec.topk, dtype)
        if lengths is not None:
            past = torch.arange(spec.block_size) >= lengths[start:end, None]
            part.tail_logmass[past] = float("nan")
        parts.append(part)
    topk = TokenTopK(torch.cat([p.values for p in parts]), torch.cat([p.ids for p in parts]),
                     torch.cat([p.tail_logmass for p in parts]), spec.num_classes)
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{spec.key()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_token_topk(tmp / DATA_FILE, topk)
        manifest = {"kind": KIND, "format_version": FORMAT_VERSION, "key": spec.key(),
                    "spec": spec.to_dict(), "dtype": spec.dtype,
                    "sha256": file_sha256(tmp / DATA_FILE, fsync=True),
                    "data_bytes": (tmp / DATA_FILE).stat().st_size,
                    "tokens": spec.num_samples * spec.block_size,
                    "bytes_per_token": bytes_per_token(spec.topk, spec.num_classes, dtype),
                    "created": datetime.now(UTC).isoformat(timespec="seconds")}
        write_json_durable(tmp / MANIFEST, manifest)  # last: without it, never "fresh"
        return publish_folder(tmp, root / spec.key(),
                              lambda: check_token_cache(root, spec).fresh)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class TokenCache:
    """A fresh per-token cache, opened (memory-mapped through safetensors)."""

    path: Path
    spec: TokenCacheSpec
    manifest: dict[str, Any]
    topk: Any  # TokenTopK

    @classmethod
    def open(cls, root: str | Path, spec: TokenCacheSpec, verify: bool = True) -> TokenCache:
        from raykd.teacher.token_topk import load_token_topk

        status = check_token_cache(root, spec, verify)
        if not status.fresh:
            raise CacheError(f"per-token teacher cache is {status.state}: {status.reason}")
        path = Path(root).expanduser() / spec.key()
        return cls(path, spec, json.loads((path / MANIFEST).read_text()),
                   load_token_topk(path / DATA_FILE))

    @property
    def num_samples(self) -> int:
        return self.spec.num_samples

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def bytes_per_sample(self) -> int:
        return int(round(self.manifest["bytes_per_token"] * self.spec.block_size))


# -- through the object store -------------------------------------------------------------------
def _numpy(t: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: its bits travel as int16 (shard_arrays records the dtype)
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def shard_arrays(topk, start: int, end: int) -> dict[str, np.ndarray]:
    """Blocks ``start:end`` as contiguous numpy arrays (what Ray's object store holds)."""
    from raykd.teacher.token_topk import slice_rows

    part = slice_rows(topk, slice(start, end))
    return {"values": np.ascontiguousarray(_numpy(part.values)),
            "ids": np.ascontiguousarray(_numpy(part.ids)),
            "tail_logmass": np.ascontiguousarray(_numpy(part.tail_logmass)),
            "vocab_size": np.array([topk.vocab_size], dtype=np.int64),
            "bfloat16": np.array([topk.values.dtype == torch.bfloat16], dtype=np.bool_)}


def topk_from_shards(shards: list[dict[str, np.ndarray]]):
    """One ``TokenTopK`` over all rows of ``shards`` (in order)."""
    import warnings

    from raykd.teacher.token_topk import TokenTopK

    def joined(name: str) -> torch.Tensor:
        parts = [torch.from_numpy(s[name]) for s in shards]
        # one shard: the object store's (node-shared) memory itself, no copy
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    with warnings.catch_warnings():  # object-store arrays are read-only; they are only read
        warnings.simplefilter("ignore", UserWarning)
        values, ids, tail = joined("values"), joined("ids"), joined("tail_logmass")
    if bool(shards[0]["bfloat16"][0]):
        values = values.view(torch.bfloat16)
    return TokenTopK(values, ids, tail, int(shards[0]["vocab_size"][0]))


# -- raykd cache inspect / verify -------------------------------------------------------------
def inspect_token_cache(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    manifest = json.loads((path / MANIFEST).read_text())
    spec = manifest["spec"]
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    dense = spec["num_classes"] * 4  # float32 logits of every token of the vocabulary
    per_token = float(manifest["bytes_per_token"])
    return {"path": str(path), "key": path.name, "kind": KIND,
            "format_version": manifest.get("format_version"), "encoding": "token_topk",
            "dtype": manifest.get("dtype"), "spec": spec, "created": manifest.get("created"),
            "files": files, "total_bytes": sum(files.values()), "tokens": manifest["tokens"],
            "bytes_per_token": per_token,
            "measured_bytes_per_token": round(manifest["data_bytes"] / manifest["tokens"], 2),
            "dense_float32_bytes_per_token": dense,
            "compression": round(dense / per_token, 2) if per_token else None}


def verify_token_cache(path: str | Path, verify: bool = True) -> CacheStatus:
    path = Path(path).expanduser()
    status = _check_folder(path, None, verify)
    if status.fresh:
        spec = json.loads((path / MANIFEST).read_text())["spec"]
        blob = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        if hashlib.sha256(blob.encode()).hexdigest()[:20] != path.name:
            return CacheStatus("stale", f"folder {path.name} is not its spec's key")
    return status
