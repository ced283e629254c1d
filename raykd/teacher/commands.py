"""`raykd cache build|inspect|verify`."""

from __future__ import annotations

import json
from typing import Any

from raykd.config import ConfigError


def cache_command(args) -> dict[str, Any]:
    from raykd.teacher.cache import inspect_cache, verify_cache

    if args.action in ("inspect", "verify"):
        if not args.path:
            raise ConfigError(f"path: raykd cache {args.action} needs a cache folder, e.g. "
                              f".raykd/cache/<key>")
        from pathlib import Path

        if not (Path(args.path) / "manifest.json").is_file():
            raise ConfigError(f"path: {args.path} is not a raykd cache (no manifest.json); "
                              f"give a folder under teacher.cache_dir")
        if args.action == "inspect":
            out = inspect_cache(args.path)
            print(json.dumps(out, indent=2, default=str))
            return out
        status = verify_cache(args.path)
        print(f"{args.path}: {status.state}" + (f" ({status.reason})" if status.reason else ""))
        if status.state != "fresh":
            raise SystemExit(1)
        return {"state": status.state, "reason": status.reason}
    return build(args)


def build(args) -> dict[str, Any]:
    import ray

    from raykd import tracking
    from raykd.config import load_config
    from raykd.preflight import preflight
    from raykd.schemes.offline import teacher_sources
    from raykd.teacher.service import serve_teacher
    from raykd.train.fit import ensure_ray

    cfg = load_config(args.config, args.overrides)
    sources = teacher_sources(cfg)
    if not sources:
        raise ConfigError("teacher.checkpoint: raykd cache build needs a trained teacher; set "
                          "teacher.checkpoint (or teacher.ensemble), e.g. from raykd train-teacher")
    if cfg.teacher.mode == "online":
        raise ConfigError("teacher.mode: online mode keeps no cache; use cached or replay")
    preflight(cfg, roles=("teacher",))
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    ensure_ray()
    service = serve_teacher(cfg, sources, uri)
    try:
        out = ray.get(service.actor.stats.remote())
    finally:
        ray.kill(service.actor)
    print(json.dumps(out, indent=2, default=str))
    return {"cache": out}
