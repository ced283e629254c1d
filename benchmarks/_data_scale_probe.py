"""Peak memory per process kind of one ``raykd`` CLI run, sampled from /proc in a thread.

Only the CLI process and its descendants are sampled: a local Ray cluster started by the CLI
(``ray.init`` without an address) has its GCS, raylet, dashboard and every worker below the
driver, so other jobs' Ray processes on the same machine are never counted. Linux only (reads
/proc directly: psutil is not a dependency of the project's venv, and /proc is what it reads).

Kinds, from the process title Ray sets (``ray::Class.method`` for actors, ``ray::Op->Op`` for
Ray Data tasks, ``ray::IDLE`` for pooled workers): ``driver`` (the CLI process), ``train_worker``
(``RayTrainWorker``), ``teacher`` (``TeacherActor``/``TeacherReplica``), ``ray_data`` (Ray Data
operators: Read*/Map*/MapBatches/Split*/… and its internal actors), ``ray_other`` (raylet,
gcs_server, dashboard, log monitor, Train controller, idle workers). A worker process that
changes kind (an idle worker picking up a Ray Data task) counts in each kind while it is one.

Object store: the plasma store is a file in /dev/shm (or Ray's fallback folder) that the raylet
maps and has deleted; its allocated size (``st_blocks`` through ``/proc/<raylet>/fd/N``) is the
store's resident use. Plasma's allocator keeps pages once touched, so the last reading is the
high-water mark of the run. ``/dev/shm``'s used bytes (a change from the start of the run) are
recorded too, but other jobs on the machine move that figure.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
KINDS = ("driver", "train_worker", "teacher", "ray_data", "ray_other")
_DATA_MARKERS = ("MapBatches", "MapWorker", "Read", "Map(", "FlatMap", "Filter", "Split",
                 "StreamSplit", "Dataset", "_StatsActor", "Write", "Repartition", "Shuffle",
                 "Limit", "Project", "Sort", "Aggregate")


def classify(cmdline: str, is_driver: bool) -> str:
    if is_driver:
        return "driver"
    if "RayTrainWorker" in cmdline:
        return "train_worker"
    if "TeacherActor" in cmdline or "TeacherReplica" in cmdline:
        return "teacher"
    if cmdline.startswith("ray::") and any(m in cmdline for m in _DATA_MARKERS):
        return "ray_data"
    return "ray_other"


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # comm may hold spaces
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(root: int) -> list[int]:
    kids, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def read_process(pid: int) -> tuple[str, int] | None:
    """(cmdline, RSS bytes) of ``pid``, or None when it has gone."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None
    return cmd, resident


def plasma_bytes(pids_cmds: dict[int, str]) -> int | None:
    """Allocated bytes of the plasma file(s) the raylet holds open; None without a raylet."""
    total, seen = None, False
    for pid, cmd in pids_cmds.items():
        if "raylet" not in cmd.split(" ")[0]:
            continue
        seen = True
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if "plasma" in target or target.startswith("/dev/shm/"):
                    total = (total or 0) + os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
            except OSError:
                continue
    return total if seen else None


class MemoryProbe:
    """``with MemoryProbe(pid) as probe: ...``; then ``probe.result()``."""

    def __init__(self, root_pid: int, interval: float = 0.2):
        self.root, self.interval = root_pid, interval
        self.peak_single = dict.fromkeys(KINDS, 0)  # the largest process of the kind
        self.peak_sum = dict.fromkeys(KINDS, 0)  # the kind's summed RSS at one instant
        self.count = dict.fromkeys(KINDS, 0)  # most processes of the kind at one instant
        self.peak_total = 0
        self.titles: dict[str, set[str]] = {k: set() for k in KINDS}
        self.plasma_peak: int | None = None
        self.shm_start = shutil.disk_usage("/dev/shm").used
        self.shm_peak_delta = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        sums, counts, cmds = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0), {}
        for pid in descendants(self.root):
            got = read_process(pid)
            if got is None:
                continue
            cmd, rss = got
            cmds[pid] = cmd
            kind = classify(cmd, pid == self.root)
            sums[kind] += rss
            counts[kind] += 1
            self.peak_single[kind] = max(self.peak_single[kind], rss)
            if len(self.titles[kind]) < 40:
                self.titles[kind].add(cmd[:60])
        for kind in KINDS:
            self.peak_sum[kind] = max(self.peak_sum[kind], sums[kind])
            self.count[kind] = max(self.count[kind], counts[kind])
        self.peak_total = max(self.peak_total, sum(sums.values()))
        plasma = plasma_bytes(cmds)
        if plasma is not None:
            self.plasma_peak = max(self.plasma_peak or 0, plasma)
        self.shm_peak_delta = max(self.shm_peak_delta,
                                  shutil.disk_usage("/dev/shm").used - self.shm_start)
        self.samples += 1

    def result(self) -> dict:
        mib = 1 << 20
        return {
            "peak_rss_largest_mib": {k: round(v / mib, 1) for k, v in self.peak_single.items()},
            "peak_rss_sum_mib": {k: round(v / mib, 1) for k, v in self.peak_sum.items()},
            "max_processes": self.count,
            "peak_rss_all_mib": round(self.peak_total / mib, 1),
            "object_store_peak_mib": None if self.plasma_peak is None
            else round(self.plasma_peak / mib, 1),
            "dev_shm_peak_delta_mib": round(self.shm_peak_delta / mib, 1),
            "samples": self.samples,
            "titles": {k: sorted(v) for k, v in self.titles.items()},
        }
