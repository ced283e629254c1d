"""Live mode at scale: the teacher actor serves concurrent calls from all workers in one pass.

Every Ray Train worker of a live-mode fit asks the teacher for its batch at about the same time
(DDP keeps the ranks in step). Served one call at a time, N workers wait for N teacher passes in
a row each step. :class:`LiveBatcher` runs in the threaded teacher actor: the first call to
arrive leads; it waits up to ``window_s`` for the calls it expects (``expect``: the fit's
workers) — no wait at all when they are already there, or with one worker — concatenates the
inputs of every waiting call that asks for the same feature paths, runs the teacher once and
hands each caller its own rows. Calls that arrive while a pass runs are served together by the
next one, so a slow caller never serialises the others.

Exactness: the teacher is in eval mode, where each row's output depends on that row alone; a
concatenated pass gives each caller the same logits and features as its own pass would, up to
the float rounding of a matrix product over more rows (tests/test_live_batching.py measures it).
A feature whose first dimension is not the batch cannot be split per caller, and a pass that
fails may have failed for one caller's input: such batches are served call by call, so each
caller gets its own result or error.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Result = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class _Call:
    x: torch.Tensor
    paths: tuple[str, ...]
    done: bool = False
    result: Result | None = None
    error: BaseException | None = None
    arrived: float = field(default_factory=time.monotonic)


class LiveBatcher:
    """Coalesces concurrent ``submit(x, paths)`` calls into passes of ``run(x, paths)``.

    ``run`` returns ``(logits [B, C], {path: feature [B, ...]})`` for inputs ``x [B, ...]``.
    ``max_rows`` caps a pass (one larger call still runs alone)."""

    def __init__(self, run: Callable[[torch.Tensor, list[str]], Result], *, window_s: float,
                 expect: int, max_rows: int):
        self._run = run
        self.window_s, self.expect, self.max_rows = float(window_s), int(expect), int(max_rows)
        self._cond = threading.Condition()
        self._waiting: list[_Call] = []
        self._busy = False
        self.calls = 0  # calls served
        self.passes = 0  # teacher passes run for them
        self.max_calls_per_pass = 0

    def submit(self, x: torch.Tensor, paths: list[str] | None = None) -> Result:
        call = _Call(x, tuple(paths or ()))
        with self._cond:
            self._waiting.append(call)
            self._cond.notify_all()  # a leader waiting out its window may now have enough
        while True:
            with self._cond:
                while not call.done and self._busy:
                    self._cond.wait()
                if call.done:
                    break
                self._busy = True  # this thread leads the next pass
                batch = self._gather()
            try:
                self._serve(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if call.error is not None:
            raise call.error
        return call.result

    def _gather(self) -> list[_Call]:
        """(Lock held.) Wait out the window for the expected callers, then take the oldest call
        and every waiting call with the same paths, in arrival order, up to ``max_rows``."""
        deadline = self._waiting[0].arrived + self.window_s
        while len(self._waiting) < self.expect:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        first = self._waiting[0]
        batch, rows = [], 0
        for call in self._waiting:
            if call.paths != first.paths:
                continue
            if batch and rows + len(call.x) > self.max_rows:
                break
            batch.append(call)
            rows += len(call.x)
        taken = {id(c) for c in batch}
        self._waiting = [c for c in self._waiting if id(c) not in taken]
        return batch

    def _serve(self, batch: list[_Call]) -> None:
        results = None
        if len(batch) > 1:
            try:
                results = self._split(batch)
            except Exception:  # noqa: BLE001 - one bad call must not fail the others
                results = None  # served call by call below: each caller gets its own outcome
        if results is None:  # one call, a failed pass, or features that cannot be split
            for call in batch:
                try:
                    call.result = self._pass(call.x, list(call.paths))
                except BaseException as err:  # noqa: BLE001 - raised in the caller's thread
                    call.error = err
            self.max_calls_per_pass = max(self.max_calls_per_pass, 1)
        else:
            for call, result in zip(batch, results, strict=True):
                call.result = result
        with self._cond:
            self.calls += len(batch)
            for call in batch:
                call.done = True

    def _pass(self, x: torch.Tensor, paths: list[str]) -> Result:
        self.passes += 1  # only the leader runs passes: one thread at a time
        return self._run(x, paths)

    def _split(self, batch: list[_Call]) -> list[Result] | None:
        sizes = [len(c.x) for c in batch]
        logits, feats = self._pass(torch.cat([c.x for c in batch]), list(batch[0].paths))
        total = sum(sizes)
        if logits.shape[0] != total or any(f.shape[0] != total for f in feats.values()):
            return None
        self.max_calls_per_pass = max(self.max_calls_per_pass, len(batch))
        # Clones, not views: a view would carry the whole pass's storage to every caller.
        logit_parts = logits.split(sizes)
        feat_parts = {p: f.split(sizes) for p, f in feats.items()}
        return [(logit_parts[i].clone(), {p: parts[i].clone() for p, parts in feat_parts.items()})
                for i in range(len(batch))]

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"live_calls": self.calls, "live_passes": self.passes,
                    "live_max_calls_per_pass": self.max_calls_per_pass}
