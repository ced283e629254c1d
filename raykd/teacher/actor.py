"""The teacher actor: one per job, owns the teacher, builds/verifies the cache, describes it.

Serving a cache is describing it: :meth:`TeacherActor.cache_table` gives the folder, the arrays
and the per-shard checksums from the manifest, and the workers read the rows they need from the
files themselves (``reader.py``); no shard passes through this actor or Ray's object store.
Killing or restarting the actor therefore never disturbs a cached fit; a restarted actor reopens
the cache from disk (``__init__`` finds it fresh) and recomputes nothing.

Cache outcomes (``ensure_cache()["status"]``, also in the run summary under ``teacher.cache``):

- ``reused``  a fresh cache for exactly this teacher, data, split, preprocessing and format was
  found and verified (sha256); the teacher ran no forward pass at all;
- ``built``   no cache for this data existed under ``teacher.cache_dir``;
- ``rebuilt`` a cache existed but could not be served. ``previous`` says why: ``corrupt`` /
  ``truncated`` / ``stale`` (the folder under this key was damaged or mislabelled and has been
  replaced), or ``changed`` (the nearest cache for the same data was built for another teacher
  or other settings — ``changed_fields`` lists them, e.g. ``teacher_fingerprint`` after a new
  checkpoint). A changed teacher's old cache is left in place under its own key: other runs and
  Tune trials may still use that teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from raykd.config import URI_SCHEMES, RaykdConfig, validate
from raykd.teacher.cache import nearest_cache
from raykd.teacher.pool import (GPU_FRACTION, actor_gpus, check_pool_fits,  # noqa: F401
                                teacher_device)

ACTOR_NAMESPACE = "raykd"
# Calls served at once by the (threaded) actor: every worker's live forward, plus the driver's.
MAX_CONCURRENCY = 64


def default_cache_dir(cfg: RaykdConfig) -> Path:
    from raykd.train.storage import cache_dir  # resolved by the driver (load_config)

    return cache_dir(cfg)


def augment_description(cfg: RaykdConfig) -> str:
    if cfg.teacher.mode != "replay":
        return ""
    return f"replay:jitter={cfg.train.jitter},flip={cfg.train.flip},seed={cfg.train.seed}"


def teacher_views(cfg: RaykdConfig) -> int:
    return cfg.teacher.views if cfg.teacher.mode == "replay" else 1


class TeacherActor:
    """Load the (ensemble) teacher, build or reuse its soft-label cache, serve shards and live
    forwards. Created through :func:`start_teacher_actor` as a named, restartable Ray actor; it is
    a plain class, so benchmarks and tests can also instantiate it in-process."""

    def __init__(self, config: dict[str, Any], sources: list[str], tracking_uri: str):
        from raykd.data import build_dataset
        from raykd.teacher.cache import CacheSpec, teacher_fingerprint
        from raykd.teacher.loading import load_teacher_models

        started = time.perf_counter()
        self.cfg = validate(config)  # files: checked by the driver, read below
        self.sources, self.tracking_uri = list(sources), tracking_uri
        self.device = teacher_device()
        self.dataset = build_dataset(self.cfg.data, "train")
        # teacher.tokenizer (text): the teacher's own tokens of each block's text, and its
        # vocabulary for the model (raykd.data.cross_tokens); None when it reads the student's
        self.own_tokens = None
        if getattr(self.dataset.info, "vocab_size", None) is not None:
            from raykd.data.cross_tokens import teacher_tokens

            self.own_tokens = teacher_tokens(self.cfg, self.dataset)
        model_info = self.own_tokens.info if self.own_tokens else self.dataset.info
        self.models = [m.to(self.device).eval() for m in
                       load_teacher_models(sources, self.cfg, model_info, tracking_uri)]
        self.fingerprint = teacher_fingerprint([m.state_dict() for m in self.models])
        self.forward_samples = 0  # every sample the teacher saw since this process started
        self.cache = None
        self.spec = None
        self.cache_event: dict[str, Any] = {"status": "live"}
        self._lock = threading.RLock()  # the actor is threaded: one cache build, one counter
        self.batcher = self._live_batcher()
        # Token blocks (data.name: text): the per-token top-k cache (raykd.teacher.token_cache)
        self.per_token = getattr(self.dataset.info, "vocab_size", None) is not None
        if self.cfg.teacher.mode != "live":
            self.root = default_cache_dir(self.cfg)
            info = self.dataset.info
            if self.per_token:
                from raykd.teacher.token_cache import token_spec

                self.spec = token_spec(self.cfg, info, self.fingerprint, len(self.dataset),
                                       self.own_tokens.info if self.own_tokens else None)
            else:
                self.spec = CacheSpec(
                    teacher_fingerprint=self.fingerprint, dataset_identity=info.identity,
                    split="train", preprocessing=info.preprocessing,
                    views=teacher_views(self.cfg), dtype=self.cfg.teacher.cache_dtype,
                    topk=self.cfg.teacher.topk, augment=augment_description(self.cfg),
                    num_samples=len(self.dataset), num_classes=info.num_classes)
            # One full verification (sha256 of every array) per start, restarts included: a
            # restarted actor serves what is on disk only after re-checking it.
            status = self._check(verify=True)
            if status.state == "fresh":
                self.cache = self._open()
                self.cache_event = {"status": "reused", "reason": "fingerprint matches; "
                                    + status.reason}
            else:
                self.cache_event = {"status": "pending", "reason": str(status)}
        self.start_seconds = round(time.perf_counter() - started, 3)

    # -- cache -------------------------------------------------------------------------------
    def ensure_cache(self) -> dict[str, Any]:
        """Open a fresh cache or (re)build it; never serve a stale, truncated or corrupt one."""
        with self._lock:  # concurrent callers (Tune trials' drivers) wait for one build
            return self._ensure_cache()

    def _check(self, verify: bool):
        from raykd.teacher.cache import check_cache

        return check_cache(self.root, self.spec, verify=verify)  # either spec: same checks

    def _open(self):
        from raykd.teacher.cache import TeacherCache
        from raykd.teacher.token_cache import TokenCache

        return (TokenCache if self.per_token else TeacherCache).open(self.root, self.spec,
                                                                     verify=False)

    def _build(self) -> dict[str, Any]:
        """Build (or finish) the cache, shard by shard, in this actor or on the pool of replicas;
        the same path for the per-token cache of language models (its spec encodes the rows).
        Returns what the run summary says about the build."""
        from raykd.teacher.cache import fill_cache, produced_rows
        from raykd.teacher.pool import build_with_pool

        if self.cfg.teacher.replicas > 1:
            result = build_with_pool(self.cfg, self.sources, self.tracking_uri, self.dataset,
                                     self.spec, self.root)
            with self._lock:  # the replicas' passes count as this teacher's forwards
                self.forward_samples += result.computed_samples * self.spec.views
        else:  # one replica: this actor is it. A pool actor would ask Ray for a slot that the
            # job's waiting worker group may hold (README command 1 hung so on 2 cores).
            result = fill_cache(self.root, self.spec, self.cfg.teacher.shard_size,
                                produced_rows(self._produce, self.spec,
                                              self.cfg.teacher.batch_size))
        return {"replicas": self.cfg.teacher.replicas, "kept_shards": result.kept_shards,
                "shards": result.shards, "first_rows_s": result.first_rows_s}

    def _ensure_cache(self) -> dict[str, Any]:
        if self.cfg.teacher.mode == "live":
            return self.stats()
        if self.cache is None:
            before = self._check(verify=True)
            if before.fresh:  # another process published it meanwhile
                self.cache = self._open()
                self.cache_event = {"status": "reused", "reason": str(before)}
                return self.stats()
            prior = nearest_cache(self.root, self.spec, same_data=True) \
                if before.state == "missing" else None
            start = time.perf_counter()
            built = self._build()
            seconds = time.perf_counter() - start
            self.cache = self._open()
            rows = self.spec.num_samples * self.spec.views
            event: dict[str, Any] = {"reason": str(before), "seconds": round(seconds, 3),
                                     "samples_per_s": round(rows / max(seconds, 1e-9), 1),
                                     **built}
            if before.state != "missing":
                event.update(status="rebuilt", previous=before.state)
            elif prior is not None:
                event.update(status="rebuilt", previous="changed", previous_key=prior[0],
                             changed_fields=prior[1],
                             reason=f"cache {prior[0]} for the same data was built for a "
                                    f"different {', '.join(prior[1])}; built {self.spec.key()}")
            else:
                event.update(status="built")
            self.cache_event = event
        return self.stats()

    def _require_cache(self):
        if self.cache is None:  # e.g. restarted while the first build was running
            self.ensure_cache()
        return self.cache

    def describe(self) -> dict[str, Any]:
        out = {"fingerprint": self.fingerprint, "forward_samples": self.forward_samples,
               "pid": os.getpid(), "mode": self.cfg.teacher.mode, "device": str(self.device),
               "reconstructed": _was_reconstructed(), "num_models": len(self.models),
               "start_seconds": self.start_seconds}
        if self.batcher is not None:
            out.update(self.batcher.stats())
        if self.cache is not None:
            out.update(path=str(self.cache.path), key=self.spec.key(),
                       bytes_per_sample=self.cache.bytes_per_sample,
                       num_samples=self.cache.num_samples, num_classes=self.spec.num_classes,
                       topk=self.spec.topk, views=self.spec.views, dtype=self.spec.dtype,
                       per_token=self.per_token,
                       # the size the cache was built and is checked with (the manifest's)
                       shard_size=(self.cache.manifest.get("shards") or {}).get(
                           "size", self.spec.num_samples))
            if self.per_token:
                out["bytes_per_token"] = self.cache.manifest["bytes_per_token"]
        return out

    def cache_spec(self):
        self._require_cache()
        return self.spec

    def cache_table(self):
        """The folder, arrays, shard bounds and per-shard checksums the workers read the cache
        by (``reader.CacheTable``), from the manifest of the cache this actor verified."""
        return self._require_cache().table()

    def _produce(self, start: int, end: int, view: int) -> torch.Tensor:
        from raykd.teacher.client import cache_view

        if self.own_tokens is not None:  # the same text in the teacher's tokens: positions
            # past its own tokens are NaN rows, "no teacher token" (TokenCacheSpec.encode)
            logits = self._logits(self.own_tokens.inputs[start:end])
            past = torch.arange(logits.shape[1]) >= self.own_tokens.lengths[start:end, None]
            return logits.masked_fill(past[..., None].to(logits.device), float("nan"))
        idx = torch.arange(start, end)
        _, x, _ = self.dataset.get_batch(idx)
        return self._logits(cache_view(x, idx, view, self.spec, self.cfg.train))

    # -- live --------------------------------------------------------------------------------
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        from raykd.teacher.loading import ensemble_logits

        logits = ensemble_logits(self.models, x.to(self.device, non_blocking=True))
        with self._lock:
            self.forward_samples += len(x)
        return logits

    def _live_batcher(self):
        """Live mode: concurrent calls from the workers share teacher passes
        (raykd.teacher.batching); ``teacher.live_batch_window_ms: null`` serves one call at a
        time, as before batching existed."""
        window_ms = self.cfg.teacher.live_batch_window_ms
        if self.cfg.teacher.mode != "live" or window_ms is None:
            return None
        from raykd.teacher.batching import LiveBatcher

        return LiveBatcher(self._forward, window_s=window_ms / 1000,
                           expect=self.cfg.train.num_workers,
                           max_rows=max(self.cfg.teacher.batch_size,
                                        self.cfg.train.batch_size * self.cfg.train.num_workers))

    def forward(self, x: torch.Tensor, paths: list[str] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher logits (and hooked features of the first model) for a live batch; in live
        mode, batched with the other workers' concurrent calls."""
        if self.batcher is not None:
            return self.batcher.submit(x, list(paths or []))
        with self._lock:  # unbatched: one call at a time
            return self._forward(x, list(paths or []))

    def _forward(self, x: torch.Tensor, paths: list[str]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not paths:
            return self._logits(x), {}
        from raykd.models.hooks import FeatureHooks

        with torch.inference_mode(), FeatureHooks(self.models[0], list(paths), "teacher") as hooks:
            x = x.to(self.device)
            logits = torch.stack([m(x) for m in self.models]).mean(0)
            feats = {p: t.detach().float().cpu() for p, t in hooks.features.items()}
        with self._lock:
            self.forward_samples += len(x)
        return logits.float().cpu(), feats

    def feature_shapes(self, paths: list[str]) -> dict[str, list[int]]:
        from raykd.models.hooks import probe_shapes

        _, x, _ = self.dataset.get_batch(torch.arange(min(2, len(self.dataset))))
        # A shape probe is not a teaching pass: forward_samples stays as it is.
        shapes = probe_shapes(self.models[0], list(paths), x.to(self.device), "teacher")
        return {p: list(s) for p, s in shapes.items()}

    def stats(self) -> dict[str, Any]:
        return {**self.cache_event, **self.describe()}

    def generate_sequences(self) -> dict[str, Any]:
        """Sequence-level KD: the teacher's continuations of train prompts as a fingerprinted
        dataset beside the cache, reused when one of the same settings exists
        (raykd.teacher.generate). The first model generates: an ensemble has no one sequence."""
        from raykd.teacher.generate import ensure_sequences

        with self._lock:
            return ensure_sequences(self.cfg, self.models[0], self.dataset, self.fingerprint,
                                    default_cache_dir(self.cfg), self.device)


def _was_reconstructed() -> bool:
    import ray

    if not ray.is_initialized():  # in-process (benchmarks, tests): get_runtime_context would
        return False  # start a Ray instance just to answer
    try:
        with warnings.catch_warnings():  # the property reads a deprecated attribute internally
            warnings.simplefilter("ignore")
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:
        return False


def _source_signature(source: str) -> str:
    """A local checkpoint by path, size and mtime (overwriting it gives a new actor, whose
    fingerprint then finds the cache changed); MLflow URIs by their text."""
    if source.startswith(URI_SCHEMES):
        return source
    try:
        st = Path(source).stat()
    except OSError:
        return source
    return f"{Path(source).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def actor_name(cfg: RaykdConfig, sources: list[str]) -> str:
    """Same teacher sources, data, teacher settings and replayed augmentation ⇒ same actor: the
    job's Ray Train workers and Tune trials (which differ in student/loss settings) share it."""
    teacher = cfg.teacher.model_dump(mode="json", exclude={"checkpoint", "ensemble", "epochs",
                                                           "lr", "jitter", "max_restarts"})
    blob = json.dumps([[_source_signature(s) for s in sources], cfg.data.model_dump(mode="json"),
                       teacher, augment_description(cfg)], sort_keys=True, default=str)
    return f"teacher-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def start_teacher_actor(cfg: RaykdConfig, sources: list[str], tracking_uri: str):
    """The job's named, restartable teacher actor (found again if it already runs). Its methods
    are retried across restarts (``max_task_retries=-1``), so a live forward in flight when
    the actor dies completes on the restarted one."""
    import ray

    check_pool_fits(cfg, ray.cluster_resources())  # before anything is built: one line
    remote = ray.remote(TeacherActor).options(
        name=actor_name(cfg, sources), namespace=ACTOR_NAMESPACE, get_if_exists=True,
        max_restarts=cfg.teacher.max_restarts, max_task_retries=-1, num_cpus=0,
        max_concurrency=MAX_CONCURRENCY,
        num_gpus=actor_gpus(cfg, ray.cluster_resources().get("GPU", 0)), lifetime=None)
    # The actor's working directory is Ray's, not the user's: resolve the cache folder here.
    config = cfg.to_dict()
    config["teacher"]["cache_dir"] = str(default_cache_dir(cfg))
    return remote.remote(config, list(sources), tracking_uri)
