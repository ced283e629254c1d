"""The teacher actor: one per job, owns the teacher, builds/verifies the cache, serves it.

Why shards are *task returns* (``actor.shard.remote(i)``): a return value is owned by the caller
(the job driver), so the object-store copies outlive this actor. Killing or restarting the actor
never invalidates the references the workers hold; a restarted actor reopens the cache from disk
(``__init__`` finds it fresh) and recomputes nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raykd.config import RaykdConfig, validate

ACTOR_NAMESPACE = "raykd"


def default_cache_dir(cfg: RaykdConfig) -> Path:
    return Path(cfg.teacher.cache_dir or Path.cwd() / ".raykd" / "cache").expanduser().resolve()


def augment_description(cfg: RaykdConfig) -> str:
    if cfg.teacher.mode != "replay":
        return ""
    return f"replay:jitter={cfg.train.jitter},flip={cfg.train.flip},seed={cfg.train.seed}"


def teacher_views(cfg: RaykdConfig) -> int:
    return cfg.teacher.views if cfg.teacher.mode == "replay" else 1


class TeacherActor:
    """Load the (ensemble) teacher, build or reuse its soft-label cache, serve shards and online
    forwards. Created through :func:`start_teacher_actor` as a named, restartable Ray actor."""

    def __init__(self, config: dict[str, Any], sources: list[str], tracking_uri: str):
        from raykd.data import build_dataset
        from raykd.teacher.cache import CacheSpec, TeacherCache, check_cache, teacher_fingerprint
        from raykd.teacher.loading import load_teacher_models

        self.cfg = validate(config)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dataset = build_dataset(self.cfg.data, "train")
        self.models = [m.to(self.device).eval() for m in
                       load_teacher_models(sources, self.cfg, self.dataset.info, tracking_uri)]
        self.fingerprint = teacher_fingerprint([m.state_dict() for m in self.models])
        self.forward_samples = 0  # every sample the teacher saw since this process started
        self.cache = None
        self.cache_event: dict[str, Any] = {"status": "none"}
        if self.cfg.teacher.mode == "online":
            return
        self.root = default_cache_dir(self.cfg)
        info = self.dataset.info
        self.spec = CacheSpec(
            teacher_fingerprint=self.fingerprint, dataset_identity=info.identity, split="train",
            preprocessing=info.preprocessing, views=teacher_views(self.cfg),
            dtype=self.cfg.teacher.cache_dtype, topk=self.cfg.teacher.topk,
            augment=augment_description(self.cfg), num_samples=len(self.dataset),
            num_classes=info.num_classes)
        status = check_cache(self.root, self.spec)
        if status.state == "fresh":
            self.cache = TeacherCache.open(self.root, self.spec)
            self.cache_event = {"status": "reused", "reason": "fingerprint matches"}
        else:
            self.cache_event = {"status": "pending", "reason": f"{status.state}: {status.reason}"}

    # -- cache -------------------------------------------------------------------------------
    def ensure_cache(self) -> dict[str, Any]:
        """Open a fresh cache or (re)build it; never serve a stale or corrupt one."""
        from raykd.teacher.cache import TeacherCache, build_cache, check_cache

        if self.cfg.teacher.mode == "online":
            return {"status": "online", "forward_samples": self.forward_samples}
        if self.cache is None:
            before = check_cache(self.root, self.spec)
            start = time.perf_counter()
            build_cache(self.root, self.spec, self._produce, self.cfg.teacher.batch_size,
                        progress=True)
            seconds = time.perf_counter() - start
            self.cache = TeacherCache.open(self.root, self.spec)
            rows = self.spec.num_samples * self.spec.views
            self.cache_event = {
                "status": "built" if before.state == "missing" else "rebuilt",
                "reason": f"{before.state}: {before.reason}", "seconds": round(seconds, 3),
                "samples_per_s": round(rows / max(seconds, 1e-9), 1)}
        return {**self.cache_event, **self.describe()}

    def describe(self) -> dict[str, Any]:
        out = {"fingerprint": self.fingerprint, "forward_samples": self.forward_samples,
               "pid": os.getpid(), "mode": self.cfg.teacher.mode,
               "reconstructed": _was_reconstructed(), "num_models": len(self.models)}
        if self.cache is not None:
            out.update(path=str(self.cache.path), bytes_per_sample=self.cache.bytes_per_sample,
                       num_samples=self.cache.num_samples, topk=self.spec.topk,
                       views=self.spec.views, dtype=self.spec.dtype)
        return out

    def cache_spec(self):
        return self.spec

    def shard_bounds(self) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.cache.shards(self.cfg.teacher.shard_size)]

    def shard(self, i: int) -> dict[str, np.ndarray]:
        """One shard's arrays, returned (not ray.put) so the caller owns the object-store copy."""
        shard = self.cache.shards(self.cfg.teacher.shard_size)[i]
        return {name: np.ascontiguousarray(arr) for name, arr in shard.arrays.items()}

    def _produce(self, start: int, end: int, view: int) -> torch.Tensor:
        from raykd.data.augment import augment, view_seeds

        idx = torch.arange(start, end)
        _, x, _ = self.dataset.get_batch(idx)
        if self.spec.views > 1 or self.spec.augment:
            seeds = view_seeds(idx, view, self.cfg.train.seed)
            x = augment(x, seeds, self.cfg.train.jitter, self.cfg.train.flip)
        return self._logits(x)

    # -- online ------------------------------------------------------------------------------
    @torch.inference_mode()
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        # Ensembles average raw logits: stays consistent under any read-time temperature.
        logits = torch.stack([m(x) for m in self.models]).mean(0)
        self.forward_samples += len(x)
        return logits.float().cpu()

    def forward(self, x: torch.Tensor, paths: list[str] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher logits (and hooked features of the first model) for a live batch."""
        if not paths:
            return self._logits(x), {}
        from raykd.models.hooks import FeatureHooks

        with torch.inference_mode(), FeatureHooks(self.models[0], list(paths), "teacher") as hooks:
            x = x.to(self.device)
            logits = torch.stack([m(x) for m in self.models]).mean(0)
            feats = {p: t.detach().float().cpu() for p, t in hooks.features.items()}
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


def _was_reconstructed() -> bool:
    import ray

    try:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:
        return False


def actor_name(cfg: RaykdConfig, sources: list[str]) -> str:
    import hashlib

    key = hashlib.sha256(repr((sorted(sources), cfg.data.model_dump(), cfg.teacher.mode,
                               cfg.teacher.topk, cfg.teacher.cache_dtype)).encode()).hexdigest()
    return f"teacher-{key[:12]}"


def start_teacher_actor(cfg: RaykdConfig, sources: list[str], tracking_uri: str):
    """A named, restartable actor (a GPU fraction when the cluster has GPUs)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    remote = ray.remote(TeacherActor).options(
        name=actor_name(cfg, sources), namespace=ACTOR_NAMESPACE, get_if_exists=True,
        max_restarts=cfg.teacher.max_restarts, max_task_retries=-1, num_cpus=0,
        num_gpus=0.25 if (cfg.train.use_gpu and gpus) else 0, lifetime=None)
    return remote.remote(cfg.to_dict(), list(sources), tracking_uri)
