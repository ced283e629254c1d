"""Child process of test_teacher_actor's memory test (run as a script, never imported by pytest):

    python cache_rss_probe.py write ROOT N C     a synthetic float16 cache, written by the cache
                                                 writer directly (no teacher), 16384-row shards
    python cache_rss_probe.py read ROOT N C      every row read through the workers' reader in
                                                 random batches with prefetch; prints JSON with
                                                 the peak RSS (ru_maxrss) once imported, after
                                                 the first batch and at the end
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np
import torch

from raykd.teacher.cache import CacheSpec, TeacherCache, fill_cache
from raykd.teacher.client import CachedTeacher, TeacherHandoff


def spec_of(n: int, c: int) -> CacheSpec:
    return CacheSpec(teacher_fingerprint="r" * 64, dataset_identity="synthetic:rss", split="train",
                     preprocessing="none", num_samples=n, num_classes=c, dtype="float16")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write(root: str, n: int, c: int) -> None:
    def compute(todo):
        for first, last in todo:
            for start in range(first, last, 4096):
                end = min(start + 4096, last)
                rows = (np.arange(start, end)[:, None] + np.arange(c)[None]) % 251
                yield np.arange(start, end), {"logits": rows.astype(np.float16)[:, None, :]}

    fill_cache(root, spec_of(n, c), 16384, compute, progress=False)


def read(root: str, n: int, c: int) -> None:
    spec = spec_of(n, c)
    base = peak_mb()  # imports done, nothing read
    cache = TeacherCache.open(root, spec, verify=False)
    teacher = CachedTeacher(TeacherHandoff(mode="cached", table=cache.table(), spec=spec))
    del cache
    batches = torch.randperm(n, generator=torch.Generator().manual_seed(0)).split(1024)
    first = teacher.logits(batches[0])
    expect = ((batches[0][:, None] + torch.arange(c)[None]) % 251).float()
    assert torch.equal(first, expect)
    before = peak_mb()
    checked = 0
    for i, idx in enumerate(batches):
        logits = teacher.logits(idx)
        if i + 1 < len(batches):
            teacher.prefetch(batches[i + 1])
        if i % 37 == 0:  # spot checks: the rows are the ones written
            assert torch.equal(logits, ((idx[:, None] + torch.arange(c)[None]) % 251).float())
            checked += 1
    teacher.close()
    print(json.dumps({"base_mb": base, "before_mb": before, "after_mb": peak_mb(),
                      "checked": checked, "verified_bytes": teacher.reader.verified_bytes}))


if __name__ == "__main__":
    mode, root, n, c = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    (write if mode == "write" else read)(root, n, c)
