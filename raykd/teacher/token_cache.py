"""The per-token teacher cache of language models: for every position of every train block, the
teacher's top-k logits, their token ids and the log-mass of the rest (``TokenTopK``, format and
math in raykd.teacher.token_topk), at T = 1; the loss applies its temperature when it reads.

The same format as the image cache with a sequence axis (``cache.py``, ``shards.py``):
``<teacher.cache_dir>/<key>/`` holds ``manifest.json`` and one ``.npy`` per array over all N
blocks — ``values`` [N, L, k] (float16, float32, or bfloat16 as its uint16 bits), ``ids``
[N, L, k] (uint8 / uint16 / int32) and ``tail_logmass`` [N, L] (float32). The key hashes the
:class:`TokenCacheSpec`: the teacher's weights, the tokenizer, the corpus checksum, the block
size, k, the dtype and the format — any change lands in a new folder, so nothing stale is read.

Built shard by shard of ``teacher.shard_size`` blocks through :func:`raykd.teacher.cache.fill_cache`
— by the teacher actor, or by the pool of replicas (``pool.py``) when ``teacher.replicas`` > 1 —
so an interrupted build resumes from its finished shards and a damaged shard is recomputed
alone. Nothing concatenates the whole cache: the writer places each teacher batch's rows in the
files, and the workers read the rows of their batches from the files (``reader.py``,
:func:`topk_from_rows`), each shard checksummed once before it is served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raykd.teacher.cache import (CacheError, CacheStatus, TeacherCache, check_cache, fill_cache,
                                 produced_rows, verify_cache)
from raykd.teacher.topk import STORAGE
from raykd.teacher.topk import index_dtype as np_index_dtype

FORMAT_VERSION = 2  # 2: sharded .npy arrays (1 was one safetensors file, built in one pass)
KIND = "token_topk"
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

    # -- what the shard writer, the checks and the pool ask of a spec (as cache.CacheSpec) ----
    def layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        n, length, k = self.num_samples, self.block_size, self.topk
        return {"values": ((n, length, k), STORAGE[self.dtype]),
                "ids": ((n, length, k), np_index_dtype(self.num_classes)),
                "tail_logmass": ((n, length), np.dtype("<f4"))}

    def encode(self, per_view: Sequence[Any], start: int, end: int) -> dict[str, np.ndarray]:
        """Teacher logits [end−start, L, V] of blocks ``start:end`` → rows of every array."""
        from raykd.teacher.token_topk import encode_token_topk

        (logits,) = per_view
        logits = torch.as_tensor(logits).detach()
        if tuple(logits.shape) != (end - start, self.block_size, self.num_classes):
            raise CacheError(f"teacher logits for blocks {start}:{end} have shape "
                             f"{tuple(logits.shape)}, expected ({end - start}, "
                             f"{self.block_size}, {self.num_classes})")
        # A NaN row is "no teacher token at this position" (a teacher reading its own tokens
        # of the text, raykd.data.cross_tokens, has fewer): cached as a NaN tail log-mass,
        # which token_uld leaves out. Any other non-finite value is an error.
        absent = torch.isnan(logits).all(-1)
        if not bool(torch.isfinite(logits[~absent]).all()):
            raise CacheError(f"teacher logits for blocks {start}:{end} are not finite")
        top = encode_token_topk(logits.float().masked_fill(absent[..., None], 0.0), self.topk,
                                getattr(torch, self.dtype))
        top.tail_logmass[absent] = float("nan")
        values = top.values.cpu()
        if values.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits, as uint16
            values = values.view(torch.int16).numpy().view(np.uint16)
        else:
            values = values.numpy()
        return {"values": values, "ids": top.ids.cpu().numpy(),
                "tail_logmass": top.tail_logmass.cpu().numpy()}

    def teacher_batch(self, batch_size: int) -> int:
        """Blocks per teacher pass: ``teacher.batch_size``, fewer when their float32 logits
        would pass MAX_LOGITS_BYTES (a large vocabulary)."""
        per_block = 4 * self.block_size * self.num_classes
        return max(1, min(batch_size, MAX_LOGITS_BYTES // per_block))

    def manifest_extras(self) -> dict[str, Any]:
        from raykd.teacher.token_topk import bytes_per_token

        per_token = bytes_per_token(self.topk, self.num_classes, self.dtype)
        return {"kind": KIND, "encoding": KIND, "tokens": self.num_samples * self.block_size,
                "bytes_per_token": per_token,
                "bytes_per_sample": int(round(per_token * self.block_size))}


def token_spec(cfg, info, fingerprint: str, num_blocks: int, teacher_info=None
               ) -> TokenCacheSpec:
    """The spec of the per-token cache for this config's train blocks (``teacher.cache_dtype``:
    float16 or bfloat16 as usual; float32, twice the bytes, for exact comparisons).
    ``teacher_info``: the teacher's own tokenizer's info when it is not the data's
    (raykd.data.cross_tokens); the cached ids, vocabulary and tokenizer checksum are its."""
    own = teacher_info or info
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


def check_token_cache(root: str | Path, spec: TokenCacheSpec, verify: bool = True
                      ) -> CacheStatus:
    """fresh | missing | stale | truncated | corrupt, as :func:`raykd.teacher.cache.check_cache`
    (the same checks: shapes against the spec, then every array's sha256)."""
    return check_cache(root, spec, verify=verify)


def build_token_cache(root: str | Path, spec: TokenCacheSpec,
                      produce: Callable[[int, int], torch.Tensor], batch_size: int,
                      shard_size: int | None = None, progress: bool = False) -> Path:
    """In-process build: ``produce(start, end) -> logits [end−start, L, V]`` over the blocks of
    the shards still missing, encoded batch by batch into the shard files; publishes atomically.
    (The teacher actor and the pool go through ``fill_cache`` themselves.)"""
    compute = produced_rows(lambda start, end, view: produce(start, end), spec, batch_size)
    return fill_cache(root, spec, shard_size or spec.num_samples, compute, progress).path


class TokenCache(TeacherCache):
    """A fresh per-token cache (the arrays memory-mapped, read-only; nothing loaded)."""

    @classmethod
    def open(cls, root: str | Path, spec: TokenCacheSpec, verify: bool = True) -> TokenCache:
        status = check_token_cache(root, spec, verify)
        if not status.fresh:
            raise CacheError(f"per-token teacher cache is {status.state}: {status.reason}")
        return super().open(root, spec, verify=False)

    def read(self, idx) -> Any:
        """The ``TokenTopK`` rows [B, L, k] of blocks ``idx`` (local use and tests)."""
        rows = {name: np.asarray(a[np.asarray(idx, dtype=np.int64)])
                for name, a in self.arrays.items()}
        return topk_from_rows(rows, self.spec.num_classes)


def topk_from_rows(rows: dict[str, np.ndarray], vocab_size: int):
    """A ``TokenTopK`` over rows read from the cache's arrays (writable copies: no warning,
    no shared memory). bfloat16 values come back from their uint16 bits."""
    from raykd.teacher.token_topk import TokenTopK

    values = rows["values"]
    if values.dtype == np.uint16:  # values are never stored as integers otherwise
        values = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    else:
        values = torch.from_numpy(values)
    return TokenTopK(values, torch.from_numpy(rows["ids"]),
                     torch.from_numpy(rows["tail_logmass"]), int(vocab_size))


# -- raykd cache inspect / verify -------------------------------------------------------------
def inspect_token_cache(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    manifest = json.loads((path / MANIFEST).read_text())
    spec = manifest["spec"]
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    payload = sum(int(np.prod(a["shape"])) * np.dtype(a["storage_dtype"]).itemsize
                  for a in manifest["arrays"].values())
    dense = spec["num_classes"] * 4  # float32 logits of every token of the vocabulary
    per_token = float(manifest["bytes_per_token"])
    return {"path": str(path), "key": path.name, "kind": KIND,
            "format_version": manifest.get("format_version"), "encoding": "token_topk",
            "dtype": manifest.get("dtype"), "spec": spec, "created": manifest.get("created"),
            "files": files, "total_bytes": sum(files.values()), "tokens": manifest["tokens"],
            "bytes_per_token": per_token,
            "measured_bytes_per_token": round(payload / manifest["tokens"], 2),
            "dense_float32_bytes_per_token": dense,
            "compression": round(dense / per_token, 2) if per_token else None}


def verify_token_cache(path: str | Path, verify: bool = True) -> CacheStatus:
    return verify_cache(path, verify, spec_type=TokenCacheSpec)
