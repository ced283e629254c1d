"""Worker-side access to the teacher: no actor call on a cached step's critical path.

The driver hands every worker a :class:`TeacherHandoff`: object references to the cache shards
(cached/replay) or the actor handle (online). Cached shards are fetched with ``ray.get`` — zero-copy
from the node's object store — and indexed locally. When the cache is larger than the worker's
budget, shards are kept in a small LRU and the next shards are fetched ahead in a thread.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TeacherHandoff:
    mode: str  # cached | replay | online
    bounds: list[tuple[int, int]] = field(default_factory=list)  # shard index ranges
    refs: list[Any] = field(default_factory=list)  # ObjectRef per shard → dict of arrays
    spec: Any = None  # CacheSpec
    bytes_per_row: int = 0
    actor: Any = None  # online mode
    feature_shapes: dict[str, list[int]] = field(default_factory=dict)
    max_resident_bytes: int = 2 << 30


class CachedTeacher:
    def __init__(self, handoff: TeacherHandoff):
        import bisect

        self._bisect = bisect
        self.handoff = handoff
        self.starts = [b[0] for b in handoff.bounds]
        total = handoff.bounds[-1][1] * handoff.bytes_per_row if handoff.bounds else 0
        self.all_resident = total <= handoff.max_resident_bytes
        per_shard = max(1, (handoff.bounds[0][1] - handoff.bounds[0][0]) * handoff.bytes_per_row)
        self.capacity = len(handoff.bounds) if self.all_resident else max(
            2, handoff.max_resident_bytes // per_shard)
        self.resident: OrderedDict[int, Any] = OrderedDict()
        self.pending: dict[int, Future] = {}
        self.pool = None if self.all_resident else ThreadPoolExecutor(1, "cache-prefetch")
        if self.all_resident:
            self._fetch_now(list(range(len(handoff.bounds))))

    def _shard(self, i: int, arrays: dict):
        from raykd.teacher.cache import CacheShard

        start, end = self.handoff.bounds[i]
        return CacheShard(start=start, end=end, arrays=arrays)

    def _fetch_now(self, shard_ids: list[int]) -> None:
        import ray

        todo = [i for i in shard_ids if i not in self.resident]
        waiting = {i: self.pending.pop(i) for i in todo if i in self.pending}
        fresh = [i for i in todo if i not in waiting]
        arrays = ray.get([self.handoff.refs[i] for i in fresh]) if fresh else []
        for i, arr in zip(fresh, arrays, strict=True):
            self.resident[i] = self._shard(i, arr)
        for i, fut in waiting.items():
            self.resident[i] = self._shard(i, fut.result())
        for i in shard_ids:
            self.resident.move_to_end(i)
        while len(self.resident) > max(self.capacity, len(shard_ids)):
            self.resident.popitem(last=False)

    def shard_of(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(idx, torch.tensor(self.starts), right=True) - 1

    def prefetch(self, upcoming: torch.Tensor) -> None:
        """Start fetching the shards ``upcoming`` indices need (no-op when all are resident)."""
        if self.all_resident or upcoming.numel() == 0:
            return
        import ray

        for i in self.shard_of(upcoming).unique().tolist():
            if i not in self.resident and i not in self.pending:
                self.pending[i] = self.pool.submit(ray.get, self.handoff.refs[i])

    def logits(self, idx: torch.Tensor, view: torch.Tensor | int = 0) -> torch.Tensor:
        from raykd.teacher.cache import lookup

        needed = self.shard_of(idx).unique().tolist()
        self._fetch_now(needed)
        return lookup([self.resident[i] for i in sorted(needed)], idx, view)

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)


class OnlineTeacher:
    """Runs the teacher (in the actor) on the live batch, returning logits and hooked features."""

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
