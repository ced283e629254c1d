"""The per-token top-k teacher cache (raykd.teacher.token_topk) against numbers worked by hand."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from safetensors.torch import save_file

from raykd.teacher.token_topk import (TokenTopK, bytes_per_token, cat_token_topk,
                                      dense_bytes_per_token, encode_token_topk, index_dtype,
                                      load_token_topk, payload_bytes, save_token_topk,
                                      slice_rows, teacher_log_probs)

# Two positions of a V = 6 vocabulary, logits chosen as logs so the softmax is easy by hand:
#   row 0: e^z = [4, 2, 1, 1, 1, 1]      Z = 10: p = [.4, .2, .1, .1, .1, .1], a FLAT tail
#   row 1: e^z = [.5, 8, 2, 4, 1, .5]   Z = 16: p = [1/32, 1/2, 1/8, 1/4, 1/16, 1/32]
ROW0 = [4, 2, 1, 1, 1, 1]
ROW1 = [0.5, 8, 2, 4, 1, 0.5]
LOGITS = torch.tensor([[ROW0, ROW1]], dtype=torch.float64).log().float()  # [1, 2, 6]
# k = 2: row 0 keeps ids 0, 1 (p .4, .2; tail .4); row 1 keeps ids 1, 3 (p 1/2, 1/4; tail 1/4)
HAND_IDS = [[0, 1], [1, 3]]
HAND_TOP = [[0.4, 0.2], [0.5, 0.25]]
HAND_TAIL = [0.4, 0.25]
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # relative, on p


def test_encode_matches_the_hand_softmax():
    topk = encode_token_topk(LOGITS, 2, torch.float32)
    assert topk.ids.dtype == torch.uint8 and topk.values.dtype == torch.float32
    assert topk.tail_logmass.dtype == torch.float32 and topk.vocab_size == 6 and topk.k == 2
    assert topk.ids[0].tolist() == HAND_IDS
    for pos in range(2):
        for j in range(2):
            # values are log-probabilities at T = 1 (logits shifted by their logsumexp)
            assert topk.values[0, pos, j].item() == pytest.approx(math.log(HAND_TOP[pos][j]),
                                                                  abs=1e-6)
        assert topk.tail_logmass[0, pos].item() == pytest.approx(math.log(HAND_TAIL[pos]),
                                                                 abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_encode_leaves_the_callers_logits_alone(dtype):
    """The tail is computed on a float64 copy: a float64 input was once that copy itself, and
    its top-k positions came back overwritten with -inf (a second encode then differed)."""
    logits = LOGITS.to(dtype)
    before = logits.clone()
    first, second = (encode_token_topk(logits, 2, torch.float32) for _ in range(2))
    assert torch.equal(logits, before)
    for name in ("values", "ids", "tail_logmass"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.ids[0].tolist() == HAND_IDS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_through_a_memory_mapped_file_reproduces_the_hand_distribution(tmp_path,
                                                                                  dtype):
    path = tmp_path / "teacher.safetensors"
    save_token_topk(path, encode_token_topk(LOGITS, 2, dtype))
    loaded = load_token_topk(path)
    assert loaded.values.dtype == dtype and loaded.ids.dtype == torch.uint8
    assert loaded.vocab_size == 6 and loaded.ids[0].tolist() == HAND_IDS
    if sys.platform.startswith("linux"):  # the tensors are views of a mapping of the file
        assert any(str(path) in line for line in open("/proc/self/maps"))
    log_top, log_tail = teacher_log_probs(loaded, 1.0)
    assert log_top.dtype == torch.float32 and log_top.shape == (1, 2, 2)
    for pos in range(2):
        # the tail is stored in float32 whatever the cache dtype: exact
        assert log_tail[0, pos].exp().item() == pytest.approx(HAND_TAIL[pos], rel=1e-6)
        for j in range(2):
            assert log_top[0, pos, j].exp().item() == pytest.approx(HAND_TOP[pos][j],
                                                                    rel=TOL[dtype])
    total = log_top.exp().sum(-1) + log_tail.exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_the_tail_rule_at_other_temperatures_against_hand_numbers():
    topk = encode_token_topk(LOGITS, 2, torch.float32)
    # T = 2, row 0: weights p^(1/2) = [√.4, √.2] and a flat tail 4·√.1 — exact for a flat tail
    log_top, log_tail = teacher_log_probs(topk, 2.0)
    z = math.sqrt(0.4) + math.sqrt(0.2) + 4 * math.sqrt(0.1)
    assert log_top[0, 0].exp().tolist() == pytest.approx([math.sqrt(.4) / z, math.sqrt(.2) / z],
                                                         rel=1e-6)
    assert log_tail[0, 0].exp().item() == pytest.approx(4 * math.sqrt(0.1) / z, rel=1e-6)
    # row 1's tail [1/32, 1/8, 1/16, 1/32] is not flat: the rule puts n·(S/n)^(1/T) = 4·(1/16)^½
    # = 1 where the truth is Σ √p = √(1/32)·2 + √(1/8) + √(1/16) — overstated at T > 1 ...
    true_tail_t2 = 2 * math.sqrt(1 / 32) + math.sqrt(1 / 8) + math.sqrt(1 / 16)
    rule = 1.0 / (math.sqrt(.5) + math.sqrt(.25) + 1.0)
    truth = true_tail_t2 / (math.sqrt(.5) + math.sqrt(.25) + true_tail_t2)
    assert log_tail[0, 1].exp().item() == pytest.approx(rule, rel=1e-6)
    assert rule > truth
    # ... and understated at T < 1 (T = 1/2: squares), while the top-k RATIO stays exact
    log_top, log_tail = teacher_log_probs(topk, 0.5)
    rule = 4 * (1 / 16) ** 2 / (.5 ** 2 + .25 ** 2 + 4 * (1 / 16) ** 2)
    truth_tail = 2 * (1 / 32) ** 2 + (1 / 8) ** 2 + (1 / 16) ** 2
    truth = truth_tail / (.5 ** 2 + .25 ** 2 + truth_tail)
    assert log_tail[0, 1].exp().item() == pytest.approx(rule, rel=1e-6) and rule < truth
    assert (log_top[0, 1, 0] - log_top[0, 1, 1]).exp().item() == pytest.approx(4.0, rel=1e-6)


def test_k_equal_to_the_vocabulary_is_the_dense_distribution_at_any_temperature():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 3, 7, generator=g)
    topk = encode_token_topk(logits, 7, torch.float32)
    assert torch.isneginf(topk.tail_logmass).all()
    assert sorted(topk.ids[1, 2].tolist()) == list(range(7))
    for temp in (1.0, 2.0, 0.5):
        log_top, log_tail = teacher_log_probs(topk, temp)
        dense = torch.log_softmax(logits / temp, -1).gather(-1, topk.ids.long())
        assert torch.allclose(log_top, dense, atol=2e-6) and torch.isneginf(log_tail).all()
        assert not torch.isnan(log_top).any()


def test_a_tail_too_small_for_float32_exp_is_stored_finite():
    # tail = 3·e^-200 / (1 + 3·e^-200): exp(-200) underflows float32, not the float64 encoder
    logits = torch.tensor([[[0.0, -200.0, -200.0, -200.0]]])
    topk = encode_token_topk(logits, 1, torch.float16)
    assert topk.tail_logmass.item() == pytest.approx(math.log(3) - 200, rel=1e-6)
    assert teacher_log_probs(topk, 1.0)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_index_dtype_is_the_narrowest_that_holds_the_vocabulary():
    assert index_dtype(256) == torch.uint8 and index_dtype(257) == torch.uint16
    assert index_dtype(65536) == torch.uint16 and index_dtype(65537) == torch.int32


def test_uint16_ids_survive_the_file(tmp_path):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 300, generator=g)
    logits[0, 0, 299] = 50.0  # the largest id of the vocabulary comes first
    topk = encode_token_topk(logits, 5, torch.float16)
    save_token_topk(tmp_path / "c.safetensors", topk)
    loaded = load_token_topk(tmp_path / "c.safetensors")
    assert loaded.ids.dtype == torch.uint16 and loaded.ids[0, 0, 0].item() == 299
    assert torch.equal(loaded.ids.long(), torch.topk(logits, 5).indices)


@pytest.mark.parametrize("k, vocab, dtype, hand", [
    (2, 6, torch.float16, 2 * (2 + 1) + 4), (5, 300, torch.bfloat16, 5 * (2 + 2) + 4),
    (3, 70000, torch.float16, 3 * (2 + 4) + 4), (6, 6, torch.float32, 6 * (4 + 1) + 4)])
def test_bytes_per_token_is_the_file_payload_per_token(tmp_path, k, vocab, dtype, hand):
    assert bytes_per_token(k, vocab, dtype) == hand
    logits = torch.randn(2, 5, vocab, generator=torch.Generator().manual_seed(2))
    save_token_topk(tmp_path / "c.safetensors", encode_token_topk(logits, k, dtype))
    assert payload_bytes(tmp_path / "c.safetensors") == 2 * 5 * hand


def test_the_benchmark_ratio_at_a_bpe_vocabulary():
    # GPT-2's 50257 tokens, k = 64, float16: 64·(2 + 2) + 4 = 260 B vs 100514 B dense
    assert dense_bytes_per_token(50257) / bytes_per_token(64, 50257, torch.float16) \
        == pytest.approx(100514 / 260)


def test_slice_rows_selects_samples_and_keeps_the_dtypes(tmp_path):
    logits = torch.randn(4, 3, 9, generator=torch.Generator().manual_seed(3))
    save_token_topk(tmp_path / "c.safetensors", encode_token_topk(logits, 3, torch.bfloat16))
    full = load_token_topk(tmp_path / "c.safetensors")
    for rows, picked in (([3, 1], [3, 1]), (torch.tensor([2]), [2]), (slice(1, 3), [1, 2])):
        part = slice_rows(full, rows)
        assert part.shape == (len(picked), 3) and part.vocab_size == 9
        assert part.values.dtype == torch.bfloat16 and part.ids.dtype == torch.uint8
        assert torch.equal(part.values, full.values[picked])
        assert torch.equal(part.ids, full.ids[picked])
        assert torch.equal(part.tail_logmass, full.tail_logmass[picked])


@pytest.mark.parametrize("k, field", [(0, "k"), (7, "k"), (True, "k"), (2.0, "k")])
def test_bad_k_names_k(k, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        encode_token_topk(LOGITS, k, torch.float16)


def test_bad_logits_and_dtype_name_the_field():
    with pytest.raises(ValueError, match=r"^logits: .*\[batch, length, vocab\]"):
        encode_token_topk(LOGITS[0], 2, torch.float16)
    bad = LOGITS.clone()
    bad[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^logits: NaN"):
        encode_token_topk(bad, 2, torch.float16)
    with pytest.raises(ValueError, match=r"^dtype: "):
        encode_token_topk(LOGITS, 2, torch.int16)
    with pytest.raises(ValueError, match=r"^k: "):
        bytes_per_token(0, 6, torch.float16)


def test_inconsistent_rows_and_foreign_files_are_refused(tmp_path):
    topk = encode_token_topk(LOGITS, 2, torch.float16)
    with pytest.raises(ValueError, match=r"^TokenTopK.ids: "):
        TokenTopK(topk.values, topk.ids[..., :1], topk.tail_logmass, 6)
    with pytest.raises(ValueError, match=r"^TokenTopK.tail_logmass: "):
        TokenTopK(topk.values, topk.ids, topk.tail_logmass[0], 6)
    with pytest.raises(ValueError, match=r"^TokenTopK.k: "):
        TokenTopK(topk.values, topk.ids, topk.tail_logmass, 1)
    with pytest.raises(ValueError, match=r"^temperature: "):
        teacher_log_probs(topk, 0.0)
    save_file({"logits": torch.zeros(2, 6)}, str(tmp_path / "dense.safetensors"))
    with pytest.raises(ValueError, match="not a per-token top-k cache"):
        load_token_topk(tmp_path / "dense.safetensors")


def test_cat_joins_batches_as_one_encode_of_all_of_them():
    logits = torch.randn(5, 3, 300, generator=torch.Generator().manual_seed(4))
    whole = encode_token_topk(logits, 4, torch.float16)
    joined = cat_token_topk([encode_token_topk(logits[:2], 4, torch.float16),
                             encode_token_topk(logits[2:], 4, torch.float16)])
    assert joined.shape == (5, 3) and joined.ids.dtype == torch.uint16
    assert torch.equal(joined.ids, whole.ids) and torch.equal(joined.values, whole.values)
    assert torch.equal(joined.tail_logmass, whole.tail_logmass)
    with pytest.raises(ValueError, match=r"^parts: vocab_size differs"):
        cat_token_topk([whole, encode_token_topk(logits[..., :299], 4, torch.float16)])
