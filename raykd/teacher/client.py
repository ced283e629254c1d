"""Worker-side access to the teacher: no actor call on a cached step's critical path.

The driver hands every worker a :class:`TeacherHandoff`: object references to the cache shards
(cached/replay) or the actor handle (live). Cached shards are fetched with ``ray.get`` — zero-copy
from the node's object store, so the workers of one node share one copy — and indexed locally;
the actor is not contacted at all while a cached fit runs (it may die and restart meanwhile).
When the cache is larger than the worker's budget (``TeacherHandoff.max_resident_bytes``), shards
are kept in a small LRU, each epoch's order is regrouped shard by shard
(:func:`shard_local_order`) and the next batch's shards are fetched ahead in a thread.

Replay mode: :func:`replay_view` picks which of the V cached views each sample is shown in an
epoch, :func:`replay_inputs` renders that view; the teacher actor renders the cache's views with
the same :func:`replay_inputs`, so the student sees exactly the image whose labels it gets.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from raykd.teacher.topk import reconstruct_topk

DEFAULT_RESIDENT_BYTES = 2 << 30


def _resident_budget() -> int:
    return int(os.environ.get("RAYKD_CACHE_RESIDENT_BYTES", DEFAULT_RESIDENT_BYTES))


@dataclass
class TeacherHandoff:
    mode: str  # cached | replay | live
    bounds: list[tuple[int, int]] = field(default_factory=list)  # shard index ranges
    refs: list[Any] = field(default_factory=list)  # ObjectRef per shard → dict of arrays
    spec: Any = None  # CacheSpec
    bytes_per_row: int = 0  # bytes per sample, all views
    actor: Any = None  # live mode
    feature_shapes: dict[str, list[int]] = field(default_factory=dict)
    max_resident_bytes: int = field(default_factory=_resident_budget)
    per_token: bool = False  # language models: shards of TokenTopK (raykd.teacher.token_cache)


# -- replay ----------------------------------------------------------------------------------
def replay_view(idx: torch.Tensor, epoch: int, views: int, seed: int) -> torch.Tensor:
    """The cached view (0..views−1) each sample of ``idx`` is shown in ``epoch``: a function of
    (seed, sample, epoch) only, so it does not depend on the batch, the rank or the world size."""
    from raykd.data.augment import view_seeds

    idx = torch.as_tensor(idx, dtype=torch.int64)
    if views == 1:
        return torch.zeros_like(idx)
    # A stream of its own (negative "views"): never the seed that renders a view's augmentation.
    return view_seeds(idx, -1 - int(epoch), seed) % views


def replay_inputs(x: torch.Tensor, idx: torch.Tensor, view: torch.Tensor | int, seed: int,
                  jitter: int, flip: bool) -> torch.Tensor:
    """View ``view`` of samples ``idx``: the augmentation drawn from the seed of (sample, view).
    The teacher actor caches the logits of exactly these images."""
    from raykd.data.augment import augment, view_seeds

    return augment(x, view_seeds(idx, view, seed), jitter, flip)


def cache_view(x: torch.Tensor, idx: torch.Tensor, view: int, spec, train) -> torch.Tensor:
    """The inputs a cache labels as ``view``: a replay cache's view rendered by
    :func:`replay_inputs` (as the student will see it), other caches' inputs as they are."""
    if not getattr(spec, "augment", ""):
        return x
    return replay_inputs(x, idx, view, train.seed, train.jitter, train.flip)


# -- cached ----------------------------------------------------------------------------------
class ShardTable:
    """One cache shard as torch tensors over the SAME memory as its arrays (zero-copy: for a shard
    fetched from Ray's object store, the node's shared copy), read with a handful of torch ops
    per step. Decodes exactly as :func:`raykd.teacher.cache.lookup` (tested against it): dense
    rows cast to float32; top-k rows rebuilt as the tail mean with the k values scattered in."""

    def __init__(self, start: int, end: int, arrays: dict):
        import warnings

        import numpy as np

        self.start, self.end = start, end
        self.num_classes = int(arrays["num_classes"][0])
        with warnings.catch_warnings():  # object-store arrays are read-only; we only gather
            warnings.simplefilter("ignore", UserWarning)
            self.t = {name: self._tensor(a, np) for name, a in arrays.items()
                      if name != "num_classes"}
        self.dense = "logits" in self.t
        self.views = next(iter(self.t.values())).shape[1]

    @staticmethod
    def _tensor(a, np) -> torch.Tensor:
        if a.dtype == np.uint16:
            # bfloat16 bits (values, tail) or class indices (top-k with C > 256): kept as raw
            # 16 bits (int16), told apart by the array's name when read.
            return torch.from_numpy(a.view(np.int16))
        return torch.from_numpy(a)

    def logits(self, rows: torch.Tensor, view: torch.Tensor | int) -> torch.Tensor:
        """float32 [B, C] for shard-local ``rows`` at ``view``."""
        if self.dense:
            return self._values(self.t["logits"][rows, view])
        indices = self.t["topk_indices"][rows, view]
        indices = (indices.to(torch.int64) & 0xFFFF) if indices.dtype == torch.int16 \
            else indices.to(torch.int64)
        return reconstruct_topk(self._values(self.t["topk_values"][rows, view]), indices,
                                self._values(self.t["tail"][rows, view]), self.num_classes)

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.int16:  # bfloat16 bits (numpy has no bfloat16)
            return x.view(torch.bfloat16).float()
        return x.float()


class CachedTeacher:
    """Cached soft labels, indexed locally. All shards resident (the cache fits the worker's
    budget): fetched once, at construction. Otherwise an LRU of ``capacity`` shards, fetched on
    demand or ahead by :meth:`prefetch` in a thread."""

    def __init__(self, handoff: TeacherHandoff):
        self.handoff = handoff
        self.starts = [b[0] for b in handoff.bounds]
        self._starts_t = torch.tensor(self.starts, dtype=torch.int64)
        total = handoff.bounds[-1][1] * handoff.bytes_per_row if handoff.bounds else 0
        self.all_resident = total <= handoff.max_resident_bytes
        per_shard = max(1, (handoff.bounds[0][1] - handoff.bounds[0][0]) * handoff.bytes_per_row)
        self.capacity = len(handoff.bounds) if self.all_resident else max(
            2, handoff.max_resident_bytes // per_shard)
        self.resident: OrderedDict[int, ShardTable] = OrderedDict()
        self.pending: dict[int, Future] = {}
        self.fetches = 0  # shard fetches (ray.get) so far, prefetches included
        self.pool = None if self.all_resident else ThreadPoolExecutor(1, "cache-prefetch")
        self._tables: list[ShardTable] = []
        if self.all_resident:
            self._fetch_now(list(range(len(handoff.bounds))))
            self._tables = [self.resident[i] for i in range(len(handoff.bounds))]

    def _table(self, i: int, arrays: dict) -> ShardTable:
        start, end = self.handoff.bounds[i]
        return ShardTable(start, end, arrays)

    def _get(self, i: int) -> dict:
        import ray

        return ray.get(self.handoff.refs[i])

    def _fetch_now(self, shard_ids: list[int]) -> None:
        import ray

        todo = [i for i in shard_ids if i not in self.resident]
        waiting = {i: self.pending.pop(i) for i in todo if i in self.pending}
        fresh = [i for i in todo if i not in waiting]
        if fresh:
            self.fetches += len(fresh)
            arrays = ray.get([self.handoff.refs[i] for i in fresh])
            for i, arr in zip(fresh, arrays, strict=True):
                self.resident[i] = self._table(i, arr)
        for i, fut in waiting.items():
            self.resident[i] = self._table(i, fut.result())
        for i in shard_ids:
            self.resident.move_to_end(i)
        while len(self.resident) > max(self.capacity, len(shard_ids)):
            self.resident.popitem(last=False)

    def shard_of(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(torch.as_tensor(idx, dtype=torch.int64), self._starts_t,
                               right=True) - 1

    def prefetch(self, upcoming: torch.Tensor) -> None:
        """Start fetching the shards ``upcoming`` indices need (no-op when all are resident)."""
        if self.all_resident or upcoming.numel() == 0:
            return
        for i in self.shard_of(upcoming).unique().tolist():
            if i not in self.resident and i not in self.pending:
                self.fetches += 1
                self.pending[i] = self.pool.submit(self._get, i)

    def logits(self, idx: torch.Tensor, view: torch.Tensor | int = 0) -> torch.Tensor:
        """Raw float32 teacher logits [B, C] of samples ``idx`` at ``view`` (local indexing;
        the actor is not involved)."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        if len(self._tables) == 1:  # the common case: one resident shard, no search at all
            return self._tables[0].logits(idx, view)
        if idx.numel() == 0:
            return torch.empty(0, self.handoff.spec.num_classes, dtype=torch.float32)
        which = self.shard_of(idx)
        lo, hi = int(which.min()), int(which.max())
        if lo < 0 or hi >= len(self.starts):
            raise IndexError(f"sample index outside the cache's {len(self.starts)} shards")
        if not self.all_resident:
            self._fetch_now(which.unique().tolist())
        tables = self._tables or [None] * len(self.starts)
        if lo == hi:
            table = tables[lo] or self.resident[lo]
            return table.logits(idx - table.start, view)
        out = None
        for s in which.unique().tolist():
            table = tables[s] or self.resident[s]
            sel = (which == s).nonzero().squeeze(1)
            v = view[sel] if isinstance(view, torch.Tensor) and view.dim() else view
            part = table.logits(idx[sel] - table.start, v)
            if out is None:
                out = torch.empty(len(idx), part.shape[-1], dtype=torch.float32)
            out[sel] = part
        return out

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)


class TokenCachedTeacher:
    """The per-token top-k cache of a language-model teacher, every shard fetched once (zero-copy
    from the node's object store) and indexed locally: ``topk(idx)`` gives the rows of a batch
    as a ``TokenTopK`` [B, L, k]. The whole cache is resident (no LRU as for image caches: a
    corpus that outgrows the workers' memory is not supported yet)."""

    all_resident = True  # shard_local_order leaves the epoch's order alone

    def __init__(self, handoff: TeacherHandoff):
        import ray

        from raykd.teacher.token_cache import topk_from_shards

        self.handoff = handoff
        self.table = topk_from_shards(ray.get(list(handoff.refs)))
        self.fetches = len(handoff.refs)

    def topk(self, idx: torch.Tensor):
        from raykd.teacher.token_topk import slice_rows

        return slice_rows(self.table, torch.as_tensor(idx, dtype=torch.int64))

    def prefetch(self, upcoming: torch.Tensor) -> None:
        return None

    def close(self) -> None:
        return None


# -- live ------------------------------------------------------------------------------------
class LiveTeacher:
    """Runs the teacher (in the actor) on the live batch, returning logits and hooked features.
    One actor call per step for the whole batch; retried on the restarted actor if it dies.
    The actor runs the concurrent calls of all workers as one teacher pass
    (raykd.teacher.batching)."""

    def __init__(self, handoff: TeacherHandoff, feature_paths: list[str]):
        self.actor = handoff.actor
        self.paths = list(feature_paths)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import ray

        return ray.get(self.actor.forward.remote(x.detach().cpu(), self.paths))


def shard_local_order(order: torch.Tensor, teacher: CachedTeacher, generator: torch.Generator
                      ) -> torch.Tensor:
    """Regroup a shuffled order shard by shard (shards in random order, samples shuffled within),
    so a worker whose cache does not fit in memory touches each shard once per epoch."""
    if teacher.all_resident:
        return order
    shard = teacher.shard_of(order)
    rank = torch.randperm(len(teacher.starts), generator=generator)[shard]
    return order[torch.argsort(rank, stable=True)]
