"""Worker-side access to the teacher: no actor call on a cached step's critical path.

The driver hands every worker a :class:`TeacherHandoff`: the cache's table (cached/replay: its
folder under ``teacher.cache_dir``, arrays, shard bounds and per-shard checksums, as the teacher
actor read them from the manifest) or the actor handle (live). A cached teacher reads the rows of
each batch from the cache's files (``reader.py``: each shard checksummed once on first use, a
damaged one refused, never served) and decodes them locally; the next batch's rows are read
ahead in a thread. Nothing is held in Ray's object store; a worker holds a small cache (up to
``RAYKD_CACHE_RESIDENT_BYTES``, 64 MiB) in memory once read, and of a larger one a batch or two
of rows, whatever its size. The actor is not contacted at all while a cached fit runs (it may
die and restart meanwhile).

Replay mode: :func:`replay_view` picks which of the V cached views each sample is shown in an
epoch, :func:`replay_inputs` renders that view; the teacher actor renders the cache's views with
the same :func:`replay_inputs`, so the student sees exactly the image whose labels it gets.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raykd.teacher.topk import decode_rows


@dataclass
class TeacherHandoff:
    mode: str  # cached | replay | live
    table: Any = None  # reader.CacheTable: where the cache's files are, shards and checksums
    spec: Any = None  # CacheSpec (TokenCacheSpec for a language model's per-token cache)
    bytes_per_row: int = 0  # bytes per sample, all views
    actor: Any = None  # live mode
    feature_shapes: dict[str, list[int]] = field(default_factory=dict)
    per_token: bool = False  # language models: rows of TokenTopK (raykd.teacher.token_cache)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """The cache's shards as row ranges (empty in live mode)."""
        return list(self.table.bounds) if self.table is not None else []
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
class CachedTeacher:
    """Cached soft labels, read per batch from the cache's files (see the module docstring)."""

    def __init__(self, handoff: TeacherHandoff):
        from raykd.teacher.reader import CacheReader

        self.handoff = handoff
        self.reader = CacheReader(handoff.table)
        self.num_classes = int(handoff.spec.num_classes)
        self.views = int(handoff.spec.views)
        self.pool = ThreadPoolExecutor(1, "cache-prefetch")
        self._ahead: tuple[torch.Tensor, Future] | None = None  # the prefetched batch's rows

    def rows(self, idx: torch.Tensor) -> dict[str, np.ndarray]:
        """The stored rows (every view) of samples ``idx``: the prefetched read when it was for
        exactly these indices, else read now."""
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and torch.equal(ahead[0], idx):
            return ahead[1].result()
        return self.reader.rows(idx.numpy())

    def prefetch(self, upcoming: torch.Tensor) -> None:
        """Start reading the rows of ``upcoming`` (the next batch's indices) in a thread."""
        if self.reader.keep:  # a small cache, held in memory: nothing to read ahead
            return
        upcoming = torch.as_tensor(upcoming, dtype=torch.int64).reshape(-1).clone()
        if upcoming.numel():
            self._ahead = (upcoming, self.pool.submit(self.reader.rows, upcoming.numpy()))

    def logits(self, idx: torch.Tensor, view: torch.Tensor | int = 0) -> torch.Tensor:
        """Raw float32 teacher logits [B, C] of samples ``idx`` at ``view``, decoded exactly as
        :func:`raykd.teacher.cache.lookup` (the same ``decode_rows``)."""
        rows = self.rows(idx)
        n = len(next(iter(rows.values())))
        views = np.broadcast_to(torch.as_tensor(view).to("cpu", torch.int64).numpy(), (n,))
        if n and (views.min() < 0 or views.max() >= self.views):
            raise IndexError(f"view out of range: the cache holds {self.views} view(s)")
        if n == 0:
            return torch.empty(0, self.num_classes, dtype=torch.float32)
        at = np.arange(n)
        return decode_rows({name: a[at, views] for name, a in rows.items()}, self.num_classes)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()


class TokenCachedTeacher(CachedTeacher):
    """The per-token top-k cache of a language-model teacher, read like the image cache:
    ``topk(idx)`` gives the rows of a batch as a ``TokenTopK`` [B, L, k], read from the files
    (never the whole cache in memory)."""

    def topk(self, idx: torch.Tensor):
        from raykd.teacher.token_cache import topk_from_rows

        return topk_from_rows(self.rows(idx), self.num_classes)


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
