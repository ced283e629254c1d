"""The teacher's own tokens for the student's blocks, when the two tokenizers differ
(``teacher.tokenizer``): cross-tokenizer distillation with ``token_uld`` (arXiv 2402.12030).

Token ids of two tokenizers name different strings, so the teacher must read the same TEXT in
its own tokens. Each student block's real tokens are decoded to text with the student's
tokenizer (special tokens kept, so an end-of-text becomes the teacher's end-of-text when its
tokenizer has one) and encoded with the teacher's; the result is aligned with the student's
block BY POSITION, as ULD does, truncated to the block size and padded after it. ``lengths``
says how many teacher positions are real: the cache marks the rest as "no teacher token", and
the loss drops them, so each block is compared over the shorter of the two tokenizations.

Byte-level BPE decodes any token sequence to its exact bytes, except where a block boundary cuts
a multi-byte UTF-8 character: that character decodes as U+FFFD on both of its sides (rare; the
teacher then sees one replacement character instead of the original one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from raykd.checksums import file_sha256
from raykd.data.sequences import IGNORE

if TYPE_CHECKING:
    from raykd.config import DataConfig, RaykdConfig
    from raykd.data.text import TextInfo, TokenBlocks


@dataclass(frozen=True)
class TeacherTokens:
    """The teacher's side of cross-tokenizer data: its tokenizer's DatasetInfo (vocabulary,
    tokenizer file and sha256; the model is built for it) and, per student block, its inputs
    [N, L] and real length [N]."""

    info: TextInfo
    inputs: torch.Tensor
    lengths: torch.Tensor


def teacher_tokenizer_file(cfg: RaykdConfig, info: TextInfo) -> Path | None:
    """The teacher's tokenizer.json when ``teacher.tokenizer`` names one that is not the data's
    (by content: the same file under two paths is one tokenizer); None otherwise."""
    from raykd.data.tokenizer import tokenizer_file

    if not cfg.teacher.tokenizer:
        return None
    file = tokenizer_file(cfg.teacher.tokenizer, "teacher.tokenizer")
    return None if file_sha256(file) == info.tokenizer_sha256 else file


def teacher_data_config(cfg: RaykdConfig, file: Path) -> DataConfig:
    """``cfg.data`` read with the teacher's tokenizer: the teacher's own token blocks of the same
    corpus and splits (its test-split perplexity is measured on them)."""
    return cfg.data.model_copy(update={"tokenizer": str(file), "sequences": None})


def teacher_info(info: TextInfo, file: Path) -> TextInfo:
    """``info`` as the teacher sees it: its tokenizer's vocabulary, file and sha256."""
    from raykd.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(file).get_vocab_size(with_added_tokens=True)
    return dataclasses.replace(info, vocab_size=vocab, num_classes=vocab,
                               tokenizer_file=str(file), tokenizer_sha256=file_sha256(file))


def teacher_tokens(cfg: RaykdConfig, blocks: TokenBlocks) -> TeacherTokens | None:
    """The teacher's tokens for ``blocks`` (module docstring), or None when the teacher reads
    the student's tokens (no ``teacher.tokenizer``, or the same tokenizer)."""
    from raykd.data.tokenizer import eos_id, load_tokenizer

    info = blocks.info
    file = teacher_tokenizer_file(cfg, info)
    if file is None:
        return None
    student, teacher = load_tokenizer(info.tokenizer_file), load_tokenizer(file)
    length = blocks.inputs.shape[1]
    real = (blocks.labels != IGNORE).sum(1).tolist()
    texts = student.decode_batch([row[:n] for row, n in zip(blocks.inputs.tolist(), real)],
                                 skip_special_tokens=False)
    encoded = teacher.encode_batch(texts, add_special_tokens=False)
    pad = eos_id(teacher)
    inputs = torch.full((len(texts), length), 0 if pad is None else pad, dtype=torch.int64)
    lengths = torch.zeros(len(texts), dtype=torch.int64)
    for i, enc in enumerate(encoded):
        ids = enc.ids[:length]
        inputs[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        lengths[i] = len(ids)
    return TeacherTokens(teacher_info(info, file), inputs, lengths)
