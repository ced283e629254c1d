"""Preparing a row store (``store.py``) once per fingerprint: decode, write shards, publish.

The driver prepares in its preflight, before any Train worker starts; any process that finds no
store prepares it the same way (under a lock on ``data.store_dir``, so one writes and the others
wait and then read). A source's :class:`~raykd.data.sources.Plan` is cut into shards of
``shard_rows`` items per split; each shard is decoded and written by :func:`write_shard` — in
this process when every split fits one shard (digits, small sets: no Ray start for README
command 1), otherwise by Ray Data (``map_batches`` over the shard list with :class:`ShardWriter`
actors, one CPU each, on any node: ``data.store_dir`` must then be shared storage).

Resumable and atomic like the teacher cache (``raykd.teacher.files``): shards are written under
``<store_dir>/.partial-<fingerprint>/`` beside ``build.json``; a shard file is renamed into place
whole, then its marker ``done/<split>-<k>.json`` (rows, sha256, files left out) is written. A
restarted prepare keeps every marked shard whose file still has its sha256 and writes the rest;
the manifest is written last and the folder renamed into place. A published store that fails
verification (the driver re-hashes every shard when it opens it) goes back to the partial name
with its markers, so only damaged shards are written again; it is never served as it is.

Unreadable source files (``data.on_bad_file``): ``error`` stops the prepare with one line naming
the file, and removes the partial folder (the fix changes the fingerprint anyway); ``skip`` leaves
them out: each shard records its rows and the files it left out, rows are numbered on across
shards, and the manifest counts the skipped files.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from raykd.checksums import file_sha256
from raykd.data.indexed import SPLITS
from raykd.data.sources import Plan
from raykd.data.store import (FORMAT_VERSION, MANIFEST, files_complete, labels_name,
                              read_manifest, shard_name)
from raykd.errors import ConfigError
from raykd.teacher.files import (build_lock, fsync_dir, publish_folder, write_bytes_durable,
                                 write_json_durable)
from raykd.teacher.shards import shard_bounds

SHARD_BYTES = 64 << 20  # a shard's decoded size: what one writer holds in memory at a time
BUILD, DONE = "build.json", "done"
STORE_HINT = "give a folder you can write (on a cluster: shared storage every node reads)"


def shard_rows(plan: Plan) -> int:
    row = int(np.prod(plan.row_shape)) * np.dtype(plan.dtype).itemsize
    rows = max(1, SHARD_BYTES // row)
    return min(rows, plan.max_shard_rows) if plan.max_shard_rows else rows


# -- writing one shard (this process or a Ray Data worker) --------------------------------------

def write_shard(folder: str, split: str, k: int, items, labels: np.ndarray, decoder,
                dtype: str, on_bad_file: str) -> dict[str, Any]:
    """Decode ``items`` and write their rows as shard ``k`` of ``split`` in ``folder`` (whole:
    through a temporary name, fsync, rename). Nothing is written when a file is unreadable and
    ``on_bad_file`` is error."""
    rows, bad = decoder(split, items, np.asarray(labels, dtype=np.int64))
    result = {"split": split, "shard": k, "bad": [list(b) for b in bad]}
    if bad and on_bad_file == "error":
        return {**result, "rows": 0, "sha256": ""}
    data = np.ascontiguousarray(rows, dtype=np.dtype(dtype)).reshape(-1).view(np.uint8)
    write_bytes_durable(Path(folder) / shard_name(split, k), memoryview(data))
    return {**result, "rows": int(rows.shape[0]), "sha256": hashlib.sha256(data).hexdigest()}


class ShardWriter:
    """Ray Data's callable class: writes the shards named by its batch's task rows."""

    def __init__(self, decoder, folder: str, dtype: str, on_bad_file: str):
        self.decoder, self.folder, self.dtype, self.on_bad_file = (decoder, folder, dtype,
                                                                   on_bad_file)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for payload in batch["task"]:
            t = json.loads(str(payload))
            out.append(json.dumps(write_shard(self.folder, t["split"], t["shard"], t["items"],
                                              t["labels"], self.decoder, self.dtype,
                                              self.on_bad_file)))
        return {"result": np.array(out, dtype=object)}


# -- the driver's side ------------------------------------------------------------------------

class Preparer:
    """One store's prepare: partial folder, finished shards, the shards' writing, publishing."""

    def __init__(self, cfg, final: Path, plan: Plan):
        self.cfg, self.final, self.plan = cfg, final, plan
        self.partial = final.parent / f".partial-{final.name}"
        self.size = shard_rows(plan)
        self.bounds = {s: shard_bounds(len(plan.splits[s].labels), self.size) for s in SPLITS}
        self.meta = {"format_version": FORMAT_VERSION, "fingerprint": final.name,
                     "shard_rows": self.size,
                     "items": {s: len(plan.splits[s].labels) for s in SPLITS}}
        self.done: dict[tuple[str, int], dict[str, Any]] = {}

    # -- resuming / repairing ---------------------------------------------------------------
    def adopt(self, manifest: dict[str, Any]) -> None:
        """A published store that failed its checks becomes the partial build: its shards get
        markers, and the resume keeps those whose bytes still match."""
        if manifest.get("build") != self.meta:
            return  # another sharding: written anew
        shutil.rmtree(self.partial, ignore_errors=True)
        self.final.rename(self.partial)
        for name in [MANIFEST, *(labels_name(s) for s in SPLITS)]:
            (self.partial / name).unlink(missing_ok=True)
        (self.partial / DONE).mkdir(exist_ok=True)
        write_json_durable(self.partial / BUILD, self.meta)
        for split in SPLITS:
            for k, shard in enumerate(manifest["splits"][split]["shards"]):
                marker = {"split": split, "shard": k, "rows": shard["end"] - shard["start"],
                          "sha256": shard["sha256"], "bad": shard.get("skipped", [])}
                write_json_durable(self.partial / DONE / f"{split}-{k}.json", marker)

    def resume(self) -> None:
        try:
            resumable = json.loads((self.partial / BUILD).read_text()) == self.meta
        except (OSError, ValueError):
            resumable = False
        if not resumable:
            shutil.rmtree(self.partial, ignore_errors=True)
            (self.partial / DONE).mkdir(parents=True)
            write_json_durable(self.partial / BUILD, self.meta)
            return
        for marker in sorted((self.partial / DONE).glob("*.json")):
            try:
                m = json.loads(marker.read_text())
                file = self.partial / shard_name(m["split"], m["shard"])
                intact = (0 <= m["shard"] < len(self.bounds[m["split"]])
                          and file_sha256(file) == m["sha256"])
            except (OSError, ValueError, KeyError, TypeError):
                intact = False
            if intact:
                self.done[(m["split"], m["shard"])] = m
            else:  # damaged, missing or not ours: the shard is written again
                marker.unlink(missing_ok=True)

    # -- writing ----------------------------------------------------------------------------
    def todo(self) -> list[tuple[str, int]]:
        return [(s, k) for s in SPLITS for k in range(len(self.bounds[s]))
                if (s, k) not in self.done]

    def _task(self, split: str, k: int) -> tuple[Any, np.ndarray]:
        start, end = self.bounds[split][k]
        part = self.plan.splits[split]
        return part.items[start:end], part.labels[start:end]

    def run(self, use_ray: bool | None = None, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        todo = self.todo()
        if not todo:
            return
        if use_ray is None:
            use_ray = any(len(b) > 1 for b in self.bounds.values()) and not _in_ray_actor()
        rows = sum(self.bounds[s][k][1] - self.bounds[s][k][0] for s, k in todo)
        with tqdm(total=rows, unit="row", desc=f"data store {self.final.name}",
                  disable=not (progress and use_ray), mininterval=5.0) as bar:
            results = self._on_ray(todo) if use_ray else self._here(todo)
            for result in results:
                self._finished(result)
                start, end = self.bounds[result["split"]][result["shard"]]
                bar.update(end - start)

    def _here(self, todo: list[tuple[str, int]]) -> Iterator[dict[str, Any]]:
        for split, k in todo:
            items, labels = self._task(split, k)
            yield write_shard(str(self.partial), split, k, items, labels, self.plan.decoder,
                              self.plan.dtype, self.cfg.on_bad_file)

    def _on_ray(self, todo: list[tuple[str, int]]) -> Iterator[dict[str, Any]]:
        import ray

        if not ray.is_initialized():
            from raykd.train.ray_runtime import ensure_ray

            ensure_ray()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the tqdm line above says it once
        context.print_on_execution_start = False
        tasks = []
        for split, k in todo:
            items, labels = self._task(split, k)
            items = items.tolist() if isinstance(items, np.ndarray) else list(items)
            tasks.append({"task": json.dumps({"split": split, "shard": k, "items": items,
                                              "labels": labels.tolist()})})
        workers = max(1, min(len(tasks), int(ray.cluster_resources().get("CPU", 1))))
        written = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
            ShardWriter, batch_size=1, batch_format="numpy", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
            fn_constructor_args=(
                self.plan.decoder, str(self.partial), self.plan.dtype, self.cfg.on_bad_file))
        for batch in written.iter_batches(batch_size=None, batch_format="numpy"):
            for result in batch["result"]:
                yield json.loads(str(result))

    def _finished(self, result: dict[str, Any]) -> None:
        if result["bad"] and self.cfg.on_bad_file == "error":
            shutil.rmtree(self.partial, ignore_errors=True)  # nothing half-written stays
            _, path, reason = result["bad"][0]
            raise ConfigError(f"data.on_bad_file: cannot read {path} ({reason}); remove or "
                              f"replace it, or set data.on_bad_file=skip to leave unreadable "
                              f"files out")
        write_json_durable(self.partial / DONE / f"{result['split']}-{result['shard']}.json",
                           result)  # after the shard file: a marker names finished bytes
        self.done[(result["split"], result["shard"])] = result

    # -- publishing -------------------------------------------------------------------------
    def publish(self) -> None:
        missing = self.todo()
        if missing:
            raise RuntimeError(f"data store {self.final.name}: {len(missing)} shard(s) were "
                               f"never written")
        splits, content, skipped = {}, hashlib.sha256(), []
        for split in SPLITS:
            splits[split] = self._publish_split(split, content, skipped)
        manifest = {
            "format_version": FORMAT_VERSION, "fingerprint": self.final.name, "build": self.meta,
            "name": self.cfg.name, "row_shape": list(self.plan.row_shape),
            "dtype": self.plan.dtype, "scale": self.plan.scale,
            "num_classes": self.plan.num_classes, "preprocessing": self.plan.preprocessing,
            "identity": self._identity(content.hexdigest()), "skipped_files": len(skipped),
            "skipped": skipped[:100], "splits": splits,
            "created": datetime.now(UTC).isoformat(timespec="seconds")}
        write_json_durable(self.partial / MANIFEST, manifest)  # last: without it, no store
        shutil.rmtree(self.partial / DONE)
        (self.partial / BUILD).unlink()
        fsync_dir(self.partial)
        publish_folder(self.partial, self.final, lambda: read_manifest(self.final) is not None)

    def _publish_split(self, split: str, content, skipped: list[str]) -> dict[str, Any]:
        shards, labels, row = [], [], 0
        for k, (start, end) in enumerate(self.bounds[split]):
            m = self.done[(split, k)]
            keep = np.ones(end - start, dtype=bool)
            keep[[int(b[0]) for b in m["bad"]]] = False
            labels.append(self.plan.splits[split].labels[start:end][keep])
            skipped += [str(b[1]) for b in m["bad"]]
            shards.append({"file": shard_name(split, k), "start": row, "end": row + m["rows"],
                           "items": [start, end], "sha256": m["sha256"], "skipped": m["bad"]})
            row += m["rows"]
            content.update(f"{split}:{m['sha256']}".encode())
        y = np.concatenate(labels).astype(np.int64) if labels else np.empty(0, np.int64)
        if len(y) != row:
            raise RuntimeError(f"data store {self.final.name}: {split} has {row} rows and "
                               f"{len(y)} labels")
        npy = io.BytesIO()  # labels: 8 bytes a row, small enough to hold as one .npy
        np.save(npy, y, allow_pickle=False)
        write_bytes_durable(self.partial / labels_name(split), npy.getbuffer())
        content.update(f"{split}-labels:{hashlib.sha256(y.tobytes()).hexdigest()}".encode())
        return {"rows": row, "labels": labels_name(split), "shards": shards,
                "labels_sha256": file_sha256(self.partial / labels_name(split))}

    def _identity(self, content: str) -> str:
        # data.root and data.download are deliberately absent (the same data elsewhere is the
        # same); the row bytes and labels are in ``content``.
        c = self.cfg
        parts = [c.name, f"split_seed={c.split_seed}", f"val_fraction={c.val_fraction}",
                 f"limit={c.limit}", *([self.plan.identity_params]
                                       if self.plan.identity_params else [])]
        return "|".join([*parts, f"sha256={content[:16]}"])


def _in_ray_actor() -> bool:
    """Inside a Train worker or an actor: write here (its CPUs are already taken by it; a pool
    of Ray Data actors beside a full worker group could wait forever)."""
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - no Ray: not an actor
        return False


def verified(folder: Path, manifest: dict[str, Any]) -> bool:
    """Every shard and label file has the sha256 the manifest records (reads the whole store)."""
    if not files_complete(folder, manifest):
        return False
    for split in SPLITS:
        entry = manifest["splits"][split]
        if file_sha256(folder / entry["labels"]) != entry["labels_sha256"]:
            return False
        if any(file_sha256(folder / s["file"]) != s["sha256"] for s in entry["shards"]):
            return False
    return True


def prepare(cfg, final: Path, make_plan: Callable[[], Plan], verify: bool = False,
            use_ray: bool | None = None, progress: bool = True) -> None:
    """Make the store ``final`` ready: nothing to do when it is published (and, with
    ``verify``, every checksum matches); otherwise prepare, resume or repair it."""
    def ready(manifest: dict[str, Any] | None) -> bool:
        return manifest is not None and files_complete(final, manifest) and (
            not verify or verified(final, manifest))

    if ready(read_manifest(final)):
        return
    from raykd.train.storage import check_writable

    check_writable(str(final.parent), "data.store_dir", STORE_HINT)
    plan = make_plan()  # a bad data.root or image_size: one line before anything is written
    try:
        with build_lock(final.parent):
            manifest = read_manifest(final)  # another process may have finished it meanwhile
            if ready(manifest):
                return
            job = Preparer(cfg, final, plan)
            if manifest is not None:
                job.adopt(manifest)
            job.resume()
            job.run(use_ray, progress)
            job.publish()
    except PermissionError as err:
        raise ConfigError(f"data.store_dir: cannot write to {final.parent} "
                          f"({err.strerror or err}); {STORE_HINT}") from None
