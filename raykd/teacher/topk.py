"""Rows of the teacher cache: how raw float32 logits are stored, and how stored rows are read back
(``encode_rows`` / ``decode_rows``, and ``lookup`` over :class:`CacheShard` s; files, manifest and
integrity live in ``cache.py``, which re-exports ``CacheShard`` and ``lookup``).

Dense rows are the logits cast to the cache dtype. numpy has no bfloat16, so bfloat16 rows are
stored as their raw uint16 bits and reinterpreted with ``Tensor.view(torch.bfloat16)`` on read.

Top-k rows keep, per (sample, view):

- ``topk_values`` [k]  the k largest logits, in the cache dtype, largest first;
- ``topk_indices`` [k] their classes, in the smallest unsigned integer that holds C
  (uint8 for C ≤ 256, uint16 for C ≤ 65536, else int32);
- ``tail`` []          the MEAN of the other C−k logits, in the cache dtype.

``reconstruct_topk`` rebuilds dense float32 logits: the top-k entries exact, every other class set
to the row's tail mean. Why this shape: softmax(z/T) at ANY temperature then gives exactly the
teacher's probability ratios among the top-k classes (a shared additive constant cancels), and
spreads the remaining mass uniformly over the C−k other classes at the level of an average tail
logit — so the cache stays temperature-free and Tune trials over T can share it.

It is an approximation of the tail mass. exp is convex, so by Jensen
``(C−k)·exp(mean/T) ≤ Σ_tail exp(z_j/T)``: the reconstruction never overstates the tail's
unnormalised mass, it understates it (equality only when all tail logits are equal), and the
top-k classes receive slightly more probability than the teacher gave them — more so at high T,
where the tail matters most. Choose k so the tail is genuinely negligible, or keep dense.

k ≥ C stores the dense layout (``effective_topk`` returns None).

Why these widths: at C=100 in float16, dense costs 200 B per sample per view; k=5 costs
5·2 + 5·1 + 2 = 17 B (11.8× smaller), k=4 costs 14 B (14.3×). int16 indices and a float32 tail
would cost 5·2 + 5·2 + 4 = 24 B (8.3×), which misses the 10× goal of the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

DTYPES = ("float16", "bfloat16", "float32")
# On-disk numpy dtype per cache dtype: bfloat16 travels as its uint16 bit pattern.
STORAGE = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}
_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DENSE_ARRAYS = ("logits",)
TOPK_ARRAYS = ("topk_values", "topk_indices", "tail")


def index_dtype(num_classes: int) -> np.dtype:
    """Smallest integer type that can hold every class index (unsigned: indices are ≥ 0)."""
    if num_classes <= 1 << 8:
        return np.dtype("u1")
    if num_classes <= 1 << 16:
        return np.dtype("<u2")
    return np.dtype("<i4")


def effective_topk(topk: int | None, num_classes: int) -> int | None:
    """None (dense) when no top-k is asked for or k ≥ C keeps every class anyway."""
    return None if topk is None or topk >= num_classes else int(topk)


def array_layout(num_samples: int, views: int, num_classes: int, dtype: str, topk: int | None
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{array name: (shape, on-disk dtype)}`` of a cache; the file is ``<name>.npy``."""
    k = effective_topk(topk, num_classes)
    store = STORAGE[dtype]
    if k is None:
        return {"logits": ((num_samples, views, num_classes), store)}
    return {"topk_values": ((num_samples, views, k), store),
            "topk_indices": ((num_samples, views, k), index_dtype(num_classes)),
            "tail": ((num_samples, views), store)}


def bytes_per_row(num_classes: int, dtype: str, topk: int | None) -> int:
    """Bytes on disk per sample per view (array payload only, headers excluded)."""
    layout = array_layout(1, 1, num_classes, dtype, topk)
    return sum(int(np.prod(shape)) * dt.itemsize for shape, dt in layout.values())


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 tensor → numpy array in the on-disk dtype. Raises ValueError on overflow, because
    an inf logit would silently turn every softmax over that row into NaN at read time."""
    cast = x.to(_TORCH[dtype])
    if not bool(torch.isfinite(cast).all()):
        peak = float(x.abs().max())
        raise ValueError(f"a logit of magnitude {peak:.4g} overflows {dtype}; use "
                         f"teacher.cache_dtype=bfloat16 or float32")
    if dtype == "bfloat16":
        return cast.view(torch.int16).numpy().view(np.uint16)
    return cast.numpy()


def from_storage(a: np.ndarray) -> torch.Tensor:
    """Stored values (any shape) → float32 tensor. uint16 means bfloat16 bits: values are never
    stored as integers otherwise, so the on-disk dtype alone identifies the cache dtype (a shard
    fetched from Ray's object store carries no manifest)."""
    if not a.flags.writeable:
        # torch.from_numpy warns on read-only memory; callers pass gathered rows (already
        # copies), so this copy only triggers for direct use on a memmap or object-store array.
        a = a.copy()
    if a.dtype == np.uint16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(a).float()


def encode_rows(logits: torch.Tensor, dtype: str, topk: int | None) -> dict[str, np.ndarray]:
    """Raw logits [B, C] → ``{array name: rows}`` in the on-disk dtypes (see module docstring)."""
    logits = logits.float()
    num_classes = logits.shape[-1]
    k = effective_topk(topk, num_classes)
    if k is None:
        return {"logits": to_storage(logits, dtype)}
    # Select the top-k on the full-precision logits, before any rounding could reorder ties.
    values, indices = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    # float64 sums: with a large vocabulary, total − top-k in float32 loses the tail's digits.
    rest = logits.double().sum(-1) - values.double().sum(-1)
    tail = (rest / (num_classes - k)).float()
    return {"topk_values": to_storage(values, dtype),
            "topk_indices": indices.numpy().astype(index_dtype(num_classes)),
            "tail": to_storage(tail, dtype)}


def reconstruct_topk(values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """Dense float32 logits [..., C] from top-k ``values``/``indices`` [..., k] and ``tail`` [...]:
    the top-k classes get their exact values, every other class the row's tail mean."""
    values = torch.as_tensor(values).float()
    indices = torch.as_tensor(indices).long()
    tail = torch.as_tensor(tail).float()
    if values.shape != indices.shape or values.shape[:-1] != tail.shape:
        raise ValueError(f"top-k shapes disagree: values {tuple(values.shape)}, indices "
                         f"{tuple(indices.shape)}, tail {tuple(tail.shape)}")
    out = tail.unsqueeze(-1).expand(*tail.shape, num_classes).clone()
    return out.scatter_(-1, indices, values)


def decode_rows(rows: dict[str, np.ndarray], num_classes: int) -> torch.Tensor:
    """Gathered rows (same names as ``encode_rows``) → float32 logits [B, C]."""
    if "logits" in rows:
        return from_storage(rows["logits"])
    return reconstruct_topk(from_storage(rows["topk_values"]),
                            torch.from_numpy(rows["topk_indices"].astype(np.int64)),
                            from_storage(rows["tail"]), num_classes)


# -- reading rows back from shards -----------------------------------------------------------
@dataclass(frozen=True)
class CacheShard:
    """Rows ``start:end`` of a cache. ``arrays`` maps array name → rows (``[end−start, V, ...]``)
    plus ``num_classes`` (int64, shape [1]) so a shard rebuilt from its arrays alone — e.g. after
    ``ray.get`` of the dict — can still reconstruct top-k rows without the spec."""

    start: int
    end: int
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return self.end - self.start


def lookup(shards: Sequence[CacheShard], idx: torch.Tensor,
           view: torch.Tensor | int = 0) -> torch.Tensor:
    """Raw float32 logits [B, C] of samples ``idx`` (LongTensor [B]) at ``view`` (int or [B]).
    Finds each index's shard by binary search on the starts, gathers its rows per shard (fancy
    indexing copies only those rows, so read-only memmaps or object-store arrays are fine),
    converts the dtype and reconstructs top-k rows."""
    if not shards:
        raise ValueError("lookup needs at least one shard")
    order = sorted(range(len(shards)), key=lambda i: shards[i].start)
    shards = [shards[i] for i in order]
    rows_idx = torch.as_tensor(idx).reshape(-1).to("cpu", torch.int64).numpy()
    starts = np.array([s.start for s in shards], dtype=np.int64)
    ends = np.array([s.end for s in shards], dtype=np.int64)
    which = np.searchsorted(starts, rows_idx, side="right") - 1
    outside = (which < 0) | (rows_idx >= ends[np.maximum(which, 0)])
    if outside.any():
        raise IndexError(f"sample index {int(rows_idx[outside][0])} is in none of the "
                         f"{len(shards)} shards ({int(starts[0])}..{int(ends.max())})")
    data0 = _data_arrays(shards[0])
    num_views = next(iter(data0.values())).shape[1]
    views = np.broadcast_to(torch.as_tensor(view).to("cpu", torch.int64).numpy(),
                            rows_idx.shape)
    if views.size and (views.min() < 0 or views.max() >= num_views):
        raise IndexError(f"view out of range: the cache holds {num_views} view(s)")
    if "num_classes" in shards[0].arrays:
        num_classes = int(shards[0].arrays["num_classes"][0])
    elif "logits" in data0:
        num_classes = data0["logits"].shape[-1]
    else:
        raise ValueError("a top-k shard needs its 'num_classes' array to reconstruct rows")
    used = np.unique(which)
    if len(used) == 1:  # the common case (batch within one shard): no scatter into `out`
        shard = shards[int(used[0])]
        rows = {name: a[rows_idx - shard.start, views] for name, a in _data_arrays(shard).items()}
        return decode_rows(rows, num_classes)
    out = torch.empty(len(rows_idx), num_classes, dtype=torch.float32)
    for s in used:
        sel = np.flatnonzero(which == s)
        local = rows_idx[sel] - shards[s].start
        rows = {name: a[local, views[sel]] for name, a in _data_arrays(shards[s]).items()}
        out[torch.from_numpy(sel)] = decode_rows(rows, num_classes)
    return out


def _data_arrays(shard: CacheShard) -> dict[str, np.ndarray]:
    return {k: v for k, v in shard.arrays.items() if k != "num_classes"}
