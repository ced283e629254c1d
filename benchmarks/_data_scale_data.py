"""Synthetic inputs of benchmarks/data_scale.py: a JPEG image folder and a text corpus.

Both are seeded per item, so a size's files are the same on every run and machine, and both
carry a learnable signal (a model trained on them beats chance), since a benchmark of a
distillation that learns nothing would time a degenerate case.
"""

from __future__ import annotations

import io
import random
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path

import numpy as np

CLASSES = 10
IMAGE_PX = 256
SIZES = {"1x": 1, "10x": 10, "100x": 100}
IMAGES_1X = 4000
TEXT_1X_BYTES = 1 << 20  # 1 MiB of text at 1x

_GRID = np.mgrid[0:IMAGE_PX, 0:IMAGE_PX].astype(np.float32) / IMAGE_PX  # [2, H, W] in [0, 1)


@lru_cache(maxsize=None)
def _base(label: int, tilt: int, phase: int) -> np.ndarray:
    """uint8 [H, W, 3]: the class's stripes (angle and frequency set by the class; 4 tilts × 8
    phases per class) on a class-tinted background. Cached (at most 63 MB per process): the
    float work over 256² pixels was most of an image's cost."""
    y, x = _GRID
    angle = np.pi * label / CLASSES + 0.04 * (tilt - 1.5)
    stripes = np.sin(2 * np.pi * (6 + 2 * label) * (x * np.cos(angle) + y * np.sin(angle))
                     + np.pi * phase / 4)
    tint = 40 * np.array([np.cos(2 * np.pi * label / CLASSES),
                          np.sin(2 * np.pi * label / CLASSES), 0.0], dtype=np.float32)
    return np.clip((120 + 60 * stripes)[..., None] + tint, 0, 247).astype(np.uint8)


def render_image(index: int) -> tuple[int, bytes]:
    """Image ``index``: class ``index % 10``; the class's striped, tinted base (a random tilt and
    phase), a random blob of random colour and mild noise (all seeded by the index). Returns
    (class, JPEG bytes)."""
    from PIL import Image

    label = index % CLASSES
    rng = np.random.default_rng(index)
    img = _base(label, int(rng.integers(4)), int(rng.integers(8))).copy()
    r = int(rng.integers(12, 50))
    cy, cx = (int(v) for v in rng.integers(r, IMAGE_PX - r, 2))
    yy, xx = np.ogrid[-r:r, -r:r]
    inside = (yy * yy + xx * xx < r * r)[..., None]
    box = img[cy - r:cy + r, cx - r:cx + r].astype(np.int16)
    shifted = box + rng.integers(-50, 51, 3, dtype=np.int16)
    img[cy - r:cy + r, cx - r:cx + r] = np.where(inside, np.clip(shifted, 0, 247), box)
    img += rng.integers(0, 9, (IMAGE_PX, IMAGE_PX, 1), dtype=np.uint8)  # ≤ 247 + 8: no wrap
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, "JPEG", quality=85)
    return label, buf.getvalue()


def _write_chunk(job: tuple[str, int, int]) -> int:
    root, start, stop = job
    written = 0
    for i in range(start, stop):
        label, data = render_image(i)
        (Path(root) / f"c{label}" / f"{i:07d}.jpg").write_bytes(data)
        written += len(data)
    return written


def write_image_folder(root: Path, count: int, processes: int = 2, chunk: int = 500) -> dict:
    """``count`` JPEGs under ``root/c<k>/`` (torchvision ImageFolder layout), written by a Pool of
    ``processes``. Returns what was written (count, bytes on disk, decoded bytes)."""
    for k in range(CLASSES):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), s, min(s + chunk, count)) for s in range(0, count, chunk)]
    with Pool(processes) as pool:
        written = sum(pool.imap_unordered(_write_chunk, jobs))
    return {"images": count, "jpeg_bytes": written,
            "decoded_bytes": count * 3 * IMAGE_PX * IMAGE_PX, "px": IMAGE_PX}


# -- text: sentences from a small seeded grammar; the next word depends on the last, so an LM
# has something to learn beyond unigram frequencies ------------------------------------------
_SUBJECTS = ["the teacher", "a student", "the model", "every worker", "the cluster", "a replica",
             "the driver", "one shard", "the cache", "a batch"]
_VERBS = ["reads", "writes", "labels", "streams", "learns", "copies", "sends", "builds",
          "checks", "keeps"]
_OBJECTS = ["the data", "its logits", "a block", "the tokens", "every image", "the manifest",
            "one epoch", "the weights", "soft labels", "a file"]
_TAILS = ["quickly", "again", "on disk", "in memory", "by index", "per node", "at night",
          "with care", "in order", "once"]


def _sentence(rng: random.Random) -> str:
    s = rng.randrange(len(_SUBJECTS))
    v = (s + rng.choice([0, 0, 1])) % len(_VERBS)  # subject → verb mostly fixed: learnable
    o = (v * 3 + rng.choice([0, 1])) % len(_OBJECTS)
    words = [_SUBJECTS[s], _VERBS[v], _OBJECTS[o]]
    if rng.random() < 0.5:
        words.append(_TAILS[(o + s) % len(_TAILS)])
    return " ".join(words).capitalize() + "."


def write_corpus(path: Path, size_bytes: int, seed: int = 0) -> dict:
    """A .txt corpus of about ``size_bytes`` bytes, one paragraph of 1-8 sentences a line."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = lines = 0
    with path.open("w") as f:
        while written < size_bytes:
            line = " ".join(_sentence(rng) for _ in range(rng.randint(1, 8))) + "\n"
            f.write(line)
            written += len(line)
            lines += 1
    return {"bytes": written, "lines": lines}
