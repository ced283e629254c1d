"""`raykd cache build|inspect|verify`.

- ``build``   starts the teacher actor for ``--config``/``--set`` and makes sure its cache is fresh
  under ``teacher.cache_dir`` (``PATH``, when given, is that directory): prints the actor's report
  (``status`` reused | built | rebuilt, with the reason) as JSON.
- ``inspect`` prints a cache folder's manifest summary as JSON (shapes checked, no checksums).
- ``verify``  checks every array against the manifest's sha256; exit code 0 when every cache is
  fresh, 1 otherwise. ``PATH`` may be one cache folder or ``teacher.cache_dir`` (all of them);
  without it, the config's ``teacher.cache_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raykd.config import ConfigError, RaykdConfig


def _cache_folders(path: str) -> list[Path]:
    root = Path(path).expanduser()
    if (root / "manifest.json").is_file():
        return [root]
    found = sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()
                   and not p.name.startswith(".")) if root.is_dir() else []
    if not found:
        raise ConfigError(f"path: {path} is not a raykd cache (no manifest.json in it or in its "
                          f"subfolders); give a folder under teacher.cache_dir")
    return found


def cache_command(action: str, path: str, cfg: RaykdConfig) -> dict[str, Any]:
    """``path``: a cache folder or the directory of them (inspect / verify; the CLI gives the
    config's ``teacher.cache_dir`` when the user gave none); ``cfg``: what ``build`` builds."""
    from raykd.teacher.cache import verify_cache

    if action == "build":
        return build(cfg)
    folders = _cache_folders(path)
    from raykd.teacher.token_cache import (inspect_token_cache, is_token_cache,
                                           verify_token_cache)

    if action == "inspect":
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


def build(cfg: RaykdConfig) -> dict[str, Any]:
    from raykd import tracking
    from raykd.preflight import preflight
    from raykd.schemes.offline import teacher_sources
    from raykd.teacher.actor import actor_name
    from raykd.teacher.service import TeacherService, ensure_teacher, stop_teacher
    from raykd.train.fit import ensure_ray

    sources = teacher_sources(cfg)
    if not sources:
        raise ConfigError("teacher.checkpoint: raykd cache build needs a trained teacher; set "
                          "teacher.checkpoint (or teacher.ensemble), e.g. from raykd train-teacher")
    if cfg.teacher.mode == "live":
        raise ConfigError("teacher.mode: live mode keeps no cache; use cached or replay")
    preflight(cfg, roles=("teacher",))
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    ensure_ray()
    # Building needs the actor only: no handoff for workers.
    actor, out = ensure_teacher(cfg, sources, uri)
    stop_teacher(TeacherService(actor, None, out, actor_name(cfg, sources)))
    print(json.dumps(out, indent=2, default=str))
    return {"cache": out}


def inspect_cache(path: str | Path) -> dict[str, Any]:
    """Summary of one cache folder for ``raykd cache inspect`` (no checksumming)."""
    from raykd.teacher.cache import CacheError, read_manifest
    from raykd.teacher.topk import STORAGE

    path = Path(path).expanduser()
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as err:
        raise CacheError(f"{path} is not a teacher cache ({err})") from None
    spec = manifest["spec"]
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    per_sample = int(manifest.get("bytes_per_sample", 0))
    dense = int(spec.get("num_classes", 0)) * STORAGE.get(spec.get("dtype"), STORAGE["float32"]
                                                          ).itemsize
    return {"path": str(path), "key": path.name, "format_version": manifest.get("format_version"),
            "encoding": manifest.get("encoding"), "dtype": manifest.get("dtype"), "spec": spec,
            "arrays": manifest.get("arrays", {}), "created": manifest.get("created"),
            "files": files, "total_bytes": sum(files.values()),
            "bytes_per_sample": per_sample, "dense_bytes_per_sample": dense,
            "compression": round(dense / per_sample, 2) if per_sample else None}
