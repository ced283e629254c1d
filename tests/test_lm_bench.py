"""``benchmarks/lm_distill.py --quick`` on a corpus the test writes: the script runs end to end
(teacher fit, top-k and dense caches, student and baseline, live teacher) and its JSON has every
key issue #19 asks for, with sane types. The numbers of a tiny smoke run are not checked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOATS = ("teacher_val_loss", "baseline_val_loss", "student_val_loss", "gap_closed",
          "cache_bytes_per_token", "topk_loss_cost", "cached_over_plain", "online_over_plain",
          "wall_seconds")
INTS = ("topk", "vocab_size", "dense_bytes_per_token")


def test_quick_run_writes_every_key(ray_session, tmp_path):
    from lm_corpus import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "lm.json"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "lm_distill.py"), "--quick",
         "--data", str(corpus), "--json", str(out), "--work", str(tmp_path / "work"),
         "--topk-sweep", "32"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    for key in FLOATS:
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    for key in INTS:
        assert isinstance(result[key], int) and result[key] > 0, key
    assert result["topk"] < result["vocab_size"]
    assert result["cache_bytes_per_token"] == result["topk"] * 4 + 4  # fp16, int16 ids, tail
    assert result["dense_bytes_per_token"] == 2 * result["vocab_size"]
    assert result["cached_over_plain"] > 0 and result["online_over_plain"] > 0
    assert [row["seed"] for row in result["seeds"]] == [0]
    rates = result["throughput_interleaved"]["tokens_per_s"]  # one round in --quick
    assert {k: len(v) for k, v in rates.items()} == {"plain": 1, "cached": 1, "live": 1}
    assert result["cached_over_plain"] == result["throughput_interleaved"]["cached_over_plain"]
    assert result["teacher_trained_this_run"] is True
    for name, part in result["parts"].items():
        assert len(part["load_before"]) == 3 and len(part["load_after"]) == 3, name
    curve = result["topk_curve"]  # the main k, the swept one, the dense cache
    assert [row["topk"] for row in curve] == [16, 32, result["vocab_size"]]
    assert curve[0]["loss_cost"] == result["topk_loss_cost"] and curve[-1]["loss_cost"] == 0.0
    assert curve[0]["tail_mass"]["mean"] > curve[1]["tail_mass"]["mean"] > 0
    assert curve[1]["bytes_per_token"] == 32 * 4 + 4
    chars = result["nats_per_char"]["val"]
    assert chars["student"] < result["student_val_loss"]  # a BPE token spans several chars
    assert set(result["goals"]) == {
        "student_below_baseline_each_seed", "gap_closed_ge_0.25", "dense_over_cache_ge_30",
        "topk_loss_cost_le_0.01", "cached_over_plain_ge_0.95"}
