"""benchmarks/data_scale.py's parts that need no Ray (a few seconds): the synthetic images are
seeded and carry their class, the image folder has torchvision's layout, the corpus has the
asked size, process titles map to the kinds the JSON reports, the memory probe sees a child's
allocation, and the headline ratio refuses to compare a size with itself."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _data_scale_data import render_image, write_corpus, write_image_folder  # noqa: E402
from _data_scale_probe import MemoryProbe, classify  # noqa: E402
from data_scale import _rss_ratio  # noqa: E402


def _pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def test_images_are_seeded_and_classes_differ():
    label, data = render_image(13)
    assert label == 3 and render_image(13) == (label, data)
    assert _pixels(data).shape == (256, 256, 3)
    # class 3's tint vs class 8's: their mean colours differ far beyond the noise
    means = [_pixels(render_image(i)[1]).mean(axis=(0, 1)) for i in (3, 8)]
    assert np.abs(means[0] - means[1]).max() > 20


def test_folder_layout_and_corpus_size(tmp_path):
    written = write_image_folder(tmp_path / "img", 30, processes=2, chunk=10)
    files = sorted((tmp_path / "img").glob("c*/*.jpg"))
    assert len(files) == 30 and written["images"] == 30
    assert {f.parent.name for f in files} == {f"c{k}" for k in range(10)}
    corpus = write_corpus(tmp_path / "t.txt", 20_000)
    size = (tmp_path / "t.txt").stat().st_size
    assert size == corpus["bytes"] and 20_000 <= size < 21_000  # overshoots by < 1 line
    assert corpus["lines"] > 10


def test_titles_map_to_kinds():
    assert classify("anything", is_driver=True) == "driver"
    assert classify("ray::RayTrainWorker.train_fn", False) == "train_worker"
    assert classify("ray::TeacherActor.ensure_cache", False) == "teacher"
    assert classify("ray::MapWorker(MapBatches(TeacherReplica))", False) == "teacher"
    assert classify("ray::ReadParquet->MapBatches(decode)", False) == "ray_data"
    assert classify("ray::SplitCoordinator.start_epoch", False) == "ray_data"
    assert classify("ray::IDLE", False) == "ray_other"
    assert classify("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet",
                    False) == "ray_other"


def test_probe_sees_a_childs_memory():
    code = "import time; a = bytearray(150 << 20); time.sleep(1.0)"
    proc = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; "
                             f"subprocess.run([sys.executable, '-c', {code!r}])"])
    with MemoryProbe(proc.pid, interval=0.05) as probe:
        proc.wait()
    result = probe.result()
    assert result["samples"] > 5
    assert result["peak_rss_largest_mib"]["ray_other"] >= 150  # the grandchild, not the driver
    assert result["peak_rss_largest_mib"]["driver"] < 150


def test_rss_ratio_needs_two_sizes():
    row = {"peak_rss_largest_mib": {"train_worker": 1000.0}}
    assert _rss_ratio([{**row, "size": "1x"}])[0] is None
    big = {"size": "10x", "peak_rss_largest_mib": {"train_worker": 1500.0}}
    assert _rss_ratio([{**row, "size": "1x"}, big]) == (1.5, "10x / 1x")
