"""Per-token teacher cache for language models: top-k log-probabilities, their token ids and the
log-mass of the tail, per position (issue 19). The classification cache is ``topk.py``.

Layout (one :class:`TokenTopK`, one safetensors file, no pickle; safetensors stores bfloat16
natively, so ``topk.py``'s bfloat16-as-uint16 bits, a numpy workaround, are not needed here):

- ``values``       [..., k]  the teacher's log-probabilities at T = 1 of its k most likely tokens,
  largest first, in the cache dtype (float16/bfloat16; float32 allowed for exact tests). They are
  the logits shifted by their row's logsumexp — the same softmax at every T — because then the
  likely tokens sit near 0, where float16/bfloat16 are finest, and no logit can overflow float16
  (a log-probability is ≤ 0; one below -65504 stores as -inf, probability 0, which it is).
- ``ids``          [..., k]  their token ids in the narrowest integer type holding the vocabulary:
  ``topk.index_dtype`` (uint8 ≤ 256, uint16 ≤ 65536, else int32) as a torch dtype. torch 2.15 and
  safetensors store uint16 natively but torch cannot index or gather with it, so readers call
  ``.long()`` (:func:`gather_ids`) first. Above 65536 ids: int32, not uint32 (torch's uint32
  supports even fewer ops, and int32 holds any real vocabulary).
- ``tail_logmass`` [...]     float32: log of the teacher's mass outside the top-k at T = 1,
  computed in float64 per row chunk (log Σ_tail e^z − log Σ e^z, each a logsumexp: no
  cancellation, no underflow, so a tail of 1e-40 is stored as about -92, not -inf); -inf when
  k == vocab (or when every tail logit is -inf).

Bytes per token: k·(value bytes + id bytes) + 4. At vocab 50257, float16, k = 64: 64·(2+2)+4 =
260 B against 100514 B dense (387×); the ratio ≥ 30 needs k ≤ (2V/30 − 4)/(value + id bytes). A
character vocabulary (V = 65) cannot reach 30× at any k: dense float16 is only 130 B.

Reading at temperature T (:func:`teacher_log_probs`) gives k + 1 buckets: the k ids and one tail
bucket. At T = 1 both are exact: the tail's mass to float32, the top-k up to the rounding of
their stored log-probabilities (half an ulp: a relative error in p of at most 2^-11·|log p| in
float16, 2^-8·|log p| in bfloat16; about 0.05 % and 0.4 % at p = 0.37). The top-k ratios
are exact at any T (a shared shift cancels). The tail is one number, so its mass at T ≠ 1 needs a
rule. We treat the n = V − k tail logits as equal to their log-mean-exp z̄ = log S − log n, with
S = Σ_tail e^z at T = 1, so the unnormalised tail at T is n·e^{z̄/T} = n^{1−1/T}·S^{1/T}. It is
exact at T = 1 and whenever the tail is flat. Otherwise, with a = 1/T and x_j = e^{z_j}, the true
Σ x_j^a against n·(mean x)^a is Jensen's inequality for the power a: for T > 1 (a < 1, concave)
the rule OVERSTATES the tail's mass at T, for T < 1 it UNDERSTATES it. Since
S^a ≤ Σ x_j^a ≤ n^{1−a}·S^a for a < 1 (reversed for a > 1), the rule is off by at most a factor
n^{|1−a|}, reached when one tail token holds all of S: at V = 50k, k = 64, T = 2 up to about 220×
too much tail mass (and correspondingly less on the top-k after normalisation). The error only
moves how much of the divergence the tail bucket carries; it is negligible when k leaves little
mass in the tail, and absent at T = 1, the usual setting for language-model distillation. The
classification cache (``topk.py``) stores the tail's MEAN logit instead, which understates the
tail at every T, T = 1 included; here T = 1 is exact.

k == vocab is the dense cache through the very same code: the ids are a permutation of the
vocabulary, the tail bucket is empty (-inf) and the losses equal the dense ones.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from raykd.teacher import topk as classification_topk

FORMAT = "raykd.token_topk/1"
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_TORCH_INDEX = {1: torch.uint8, 2: torch.uint16, 4: torch.int32}
# Rows per float64 encoding step are chosen so that one step holds about this many logits
# (128 MiB in float64): large enough for a GPU, small enough never to double a [B, L, V] batch.
_ENCODE_ELEMENTS = 1 << 24


@dataclass
class TokenTopK:
    """A batch (or a whole file) of per-token top-k rows; see the module docstring."""

    values: Tensor  # [..., k] teacher log-probabilities at T=1, cache dtype, largest first
    ids: Tensor  # [..., k] token ids, index_dtype(vocab_size)
    tail_logmass: Tensor  # [...] float32, log of the mass outside the top-k at T=1
    vocab_size: int

    def __post_init__(self) -> None:
        if self.values.shape != self.ids.shape or self.values.dim() < 1:
            raise ValueError(f"TokenTopK.ids: shape {tuple(self.ids.shape)} must equal values' "
                             f"{tuple(self.values.shape)} ([..., k])")
        if self.tail_logmass.shape != self.values.shape[:-1]:
            raise ValueError(f"TokenTopK.tail_logmass: shape {tuple(self.tail_logmass.shape)} "
                             f"must be values' without k, {tuple(self.values.shape[:-1])}")
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"TokenTopK.k: {self.k} must be in 1..vocab_size "
                             f"({self.vocab_size})")
        if self.ids.dtype.is_floating_point or self.ids.dtype == torch.bool:
            raise ValueError(f"TokenTopK.ids: must be integers, got {self.ids.dtype}")

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])

    @property
    def shape(self) -> torch.Size:
        """The positions' shape, e.g. [B, L]."""
        return self.tail_logmass.shape

    def to(self, device: torch.device | str) -> TokenTopK:
        """The same rows on ``device`` (e.g. a batch's rows onto the student's GPU)."""
        return TokenTopK(self.values.to(device), self.ids.to(device),
                         self.tail_logmass.to(device), self.vocab_size)


def index_dtype(vocab_size: int) -> torch.dtype:
    """Narrowest integer torch dtype holding every token id (the classification cache's rule)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size: must be >= 1, got {vocab_size}")
    return _TORCH_INDEX[classification_topk.index_dtype(vocab_size).itemsize]


def _value_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = VALUE_DTYPES.get(dtype, None)  # type: ignore[assignment]
    if dtype not in VALUE_DTYPES.values():
        raise ValueError(f"dtype: the cache dtype must be one of {', '.join(VALUE_DTYPES)}, "
                         f"got {dtype}")
    return dtype  # type: ignore[return-value]


def bytes_per_token(k: int, vocab_size: int, dtype: torch.dtype | str) -> float:
    """Payload bytes per position: k values, k ids and the float32 tail log-mass."""
    _check_k(k, vocab_size)
    value_bytes = torch.empty((), dtype=_value_dtype(dtype)).element_size()
    id_bytes = torch.empty((), dtype=index_dtype(vocab_size)).element_size()
    return float(k * (value_bytes + id_bytes) + 4)


def dense_bytes_per_token(vocab_size: int, dtype: torch.dtype | str = torch.float16) -> float:
    """What a dense cache costs per position: the whole vocabulary in the cache dtype."""
    return float(vocab_size * torch.empty((), dtype=_value_dtype(dtype)).element_size())


def _check_k(k: int, vocab_size: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(f"k: must be an integer in 1..vocab ({vocab_size}), got {k!r}")


def encode_token_topk(logits: Tensor, k: int, dtype: torch.dtype | str) -> TokenTopK:
    """Teacher logits [B, L, V] (any float dtype, any device) → :class:`TokenTopK` on the same
    device. The top-k is selected on the logits as given (before any rounding could reorder
    ties); log-probabilities and the tail log-mass are computed in float64, a row chunk at a
    time."""
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a float tensor [batch, length, vocab], got {shape}")
    vocab = int(logits.shape[-1])
    _check_k(k, vocab)
    value_dtype = _value_dtype(dtype)
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        raise ValueError("logits: NaN or +inf in the teacher's logits")
    rows = logits.detach().reshape(-1, vocab)
    values = torch.empty(rows.shape[0], k, dtype=value_dtype, device=rows.device)
    ids = torch.empty(rows.shape[0], k, dtype=index_dtype(vocab), device=rows.device)
    tail = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    step = max(1, _ENCODE_ELEMENTS // vocab)
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step]
        top, top_ids = torch.topk(chunk, k, dim=-1, largest=True, sorted=True)
        z = chunk.to(torch.float64, copy=True)  # a copy even for float64: z is written below
        log_total = torch.logsumexp(z, dim=-1, keepdim=True)
        values[start:start + step] = (top.double() - log_total).to(value_dtype)
        ids[start:start + step] = top_ids.to(ids.dtype)
        if k == vocab:
            tail[start:start + step] = float("-inf")
            continue
        z.scatter_(-1, top_ids, float("-inf"))  # only the tail remains
        tail[start:start + step] = (torch.logsumexp(z, dim=-1) - log_total[:, 0]).float()
    lead = logits.shape[:-1]
    return TokenTopK(values.reshape(*lead, k), ids.reshape(*lead, k), tail.reshape(lead), vocab)


def save_token_topk(path: str | os.PathLike, topk: TokenTopK) -> None:
    """One safetensors file (written to a temporary name, then renamed: never half a file)."""
    path = Path(path)
    tensors = {"values": topk.values, "ids": topk.ids, "tail_logmass": topk.tail_logmass}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = {"format": FORMAT, "vocab_size": str(int(topk.vocab_size))}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_token_topk(path: str | os.PathLike) -> TokenTopK:
    """The file's rows, memory-mapped: safetensors' ``safe_open`` (framework "pt", CPU) backs
    each tensor by a private mapping of the file, so nothing is read until used and
    :func:`slice_rows` copies only the rows it selects."""
    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a per-token top-k cache (format "
                             f"{meta.get('format')!r}, expected {FORMAT!r})")
        names = set(f.keys())
        if names != {"values", "ids", "tail_logmass"}:
            raise ValueError(f"{path}: arrays {sorted(names)}, expected ids, tail_logmass, "
                             f"values")
        return TokenTopK(f.get_tensor("values"), f.get_tensor("ids"),
                         f.get_tensor("tail_logmass"), int(meta["vocab_size"]))


def payload_bytes(path: str | os.PathLike) -> int:
    """Bytes of a safetensors file minus its header: what ``bytes_per_token`` predicts."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        json.loads(f.read(header_len))  # a header that does not parse is not a cache file
    return os.path.getsize(path) - 8 - header_len


def slice_rows(topk: TokenTopK, rows) -> TokenTopK:
    """Samples ``rows`` (a slice, a sequence of ints or an integer tensor) along dim 0: fancy
    indexing copies just those rows out of a memory-mapped file."""
    if isinstance(rows, slice):
        index = rows
    else:
        index = torch.as_tensor(rows, dtype=torch.long, device="cpu").reshape(-1)
        index = index.to(topk.values.device)
    return TokenTopK(topk.values[index], topk.ids[index], topk.tail_logmass[index],
                     topk.vocab_size)


def cat_token_topk(parts) -> TokenTopK:
    """Batches of rows (same k, vocabulary and trailing shape, e.g. [B_i, L]) joined along dim 0,
    as the teacher encodes batch by batch and saves once (or once per shard)."""
    parts = list(parts)
    if not parts:
        raise ValueError("parts: nothing to concatenate")
    vocabs = {p.vocab_size for p in parts}
    if len(vocabs) != 1:
        raise ValueError(f"parts: vocab_size differs between parts: {sorted(vocabs)}")
    return TokenTopK(torch.cat([p.values for p in parts]), torch.cat([p.ids for p in parts]),
                     torch.cat([p.tail_logmass for p in parts]), parts[0].vocab_size)


def gather_ids(topk: TokenTopK) -> Tensor:
    """The ids as int64, the only index type torch's gather/scatter accept with uint16 around."""
    return topk.ids.long()


def teacher_log_probs(topk: TokenTopK, temperature: float) -> tuple[Tensor, Tensor]:
    """(log p of the k ids [..., k], log p of the tail bucket [...]), float32, at ``temperature``,
    normalised over the k + 1 buckets; the tail rule for T ≠ 1 is in the module docstring."""
    temperature = float(temperature)
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature}")
    values = topk.values.float()
    ell = topk.tail_logmass.float()
    # log p_i at T=1 with the top-k renormalised to its exact mass 1 − e^ℓ: the stored values sum
    # to that mass only up to their rounding. -expm1 keeps 1 − e^ℓ accurate when ℓ is near 0.
    top_mass = torch.log(-torch.expm1(ell))
    log_p = values - torch.logsumexp(values, dim=-1, keepdim=True) + top_mass.unsqueeze(-1)
    n_tail = topk.vocab_size - topk.k
    if n_tail == 0:
        log_tail = torch.full_like(ell, float("-inf"))
    elif temperature == 1.0:
        log_tail = ell
    else:
        # the tail as n equal logits at their log-mean-exp: n·exp(z̄/T), z̄ = ℓ − log n (in the
        # units where the T=1 distribution sums to 1); ℓ = -inf stays -inf.
        log_n = torch.log(torch.tensor(float(n_tail)))
        log_tail = log_n + (ell - log_n) / temperature
    if temperature != 1.0:
        log_p = log_p / temperature
    norm = torch.logsumexp(torch.cat((log_p, log_tail.unsqueeze(-1)), dim=-1), dim=-1)
    return log_p - norm.unsqueeze(-1), log_tail - norm
