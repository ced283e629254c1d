"""`raykd cache build|inspect|verify`.

- ``build``   starts the teacher actor for ``--config``/``--set`` and makes sure its cache is fresh:
  prints the actor's report (``status`` reused | built | rebuilt, with the reason) as JSON.
- ``inspect`` prints a cache folder's manifest summary as JSON (shapes checked, no checksums).
- ``verify``  checks every array against the manifest's sha256; exit code 0 when every cache is
  fresh, 1 otherwise. ``PATH`` may be one cache folder or ``teacher.cache_dir`` (all of them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raykd.config import ConfigError


def _cache_folders(path: str | None, action: str) -> list[Path]:
    if not path:
        raise ConfigError(f"path: raykd cache {action} needs a cache folder, e.g. "
                          f".raykd/cache/<key> (or the cache directory itself)")
    root = Path(path).expanduser()
    if (root / "manifest.json").is_file():
        return [root]
    found = sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()
                   and not p.name.startswith(".")) if root.is_dir() else []
    if not found:
        raise ConfigError(f"path: {path} is not a raykd cache (no manifest.json in it or in its "
                          f"subfolders); give a folder under teacher.cache_dir")
    return found


def cache_command(args) -> dict[str, Any]:
    from raykd.teacher.cache import inspect_cache, verify_cache

    if args.action == "build":
        return build(args)
    folders = _cache_folders(args.path, args.action)
    from raykd.teacher.token_cache import (inspect_token_cache, is_token_cache,
                                           verify_token_cache)

    if args.action == "inspect":
        out = []
        for folder in folders:
            if is_token_cache(folder):  # a language model's per-token top-k cache
                info = inspect_token_cache(folder)
                info["state"] = str(verify_token_cache(folder, verify=False))
            else:
                info = inspect_cache(folder)
                info["state"] = str(verify_cache(folder, verify=False))
            out.append(info)
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2, default=str))
        return {"caches": out}
    results = []
    for folder in folders:
        status = verify_token_cache(folder) if is_token_cache(folder) else verify_cache(folder)
        print(f"{folder}: {status.state}" + (f" ({status.reason})" if status.reason else ""))
        results.append({"path": str(folder), "state": status.state, "reason": status.reason})
    bad = [r for r in results if r["state"] != "fresh"]
    return {"caches": results, "exit_code": 1 if bad else 0}


def build(args) -> dict[str, Any]:
    from raykd import tracking
    from raykd.config import load_config
    from raykd.preflight import preflight
    from raykd.schemes.offline import teacher_sources
    from raykd.teacher.actor import actor_name
    from raykd.teacher.service import TeacherService, ensure_teacher, stop_teacher
    from raykd.train.fit import ensure_ray

    cfg = load_config(args.config, args.overrides)
    sources = teacher_sources(cfg)
    if not sources:
        raise ConfigError("teacher.checkpoint: raykd cache build needs a trained teacher; set "
                          "teacher.checkpoint (or teacher.ensemble), e.g. from raykd train-teacher")
    if cfg.teacher.mode == "live":
        raise ConfigError("teacher.mode: live mode keeps no cache; use cached or replay")
    preflight(cfg, roles=("teacher",))
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    ensure_ray()
    # No shard references: building needs the actor only, not the object-store copies.
    actor, out = ensure_teacher(cfg, sources, uri)
    stop_teacher(TeacherService(actor, None, out, actor_name(cfg, sources)))
    print(json.dumps(out, indent=2, default=str))
    return {"cache": out}
