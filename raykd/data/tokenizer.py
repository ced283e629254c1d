"""The tokenizer of a text dataset: one saved with the teacher, or a byte-level BPE trained on
the corpus.

A trained tokenizer is a pure function of (corpus checksum, vocabulary size, this format), so
its folder is named by their hash under ``data.tokenizer_dir`` (default ``<teacher.cache_dir>/
tokenizers``, beside the teacher cache, resolved by the driver): the driver trains it once in
its preflight; workers and the teacher actor load the same file. It is written to a hidden
sibling and renamed into place, so a reader never sees half a file.

Both kinds are read through the ``tokenizers`` library's ``tokenizer.json`` (what a fast
Hugging Face tokenizer saves); :func:`hf_tokenizer` wraps it for ``transformers`` (generation,
MLflow logging).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

from raykd.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
EOS = "<|endoftext|>"  # GPT-2's document separator; the trained tokenizer's one special token
FORMAT = "bytelevel-bpe-v1"


def tokenizer_file(path: str | Path, field: str = "data.tokenizer") -> Path:
    """``tokenizer.json`` in ``path`` (a folder, e.g. the teacher's save_pretrained folder) or
    ``path`` itself; a one-line ConfigError when there is none."""
    p = Path(path).expanduser()
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"{field}: no {TOKENIZER_FILE} at {str(path)!r}; give the folder a "
                          f"fast tokenizer was saved to (save_pretrained), or leave "
                          f"{field} unset to train a byte-level BPE on the corpus")
    return file


def load_tokenizer(file: str | Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # noqa: BLE001 - the library raises a bare Exception
        raise ConfigError(f"data.tokenizer: {file} is not a tokenizers JSON file ({err}); give "
                          f"a folder written by save_pretrained of a fast tokenizer") from None


def trained_tokenizer_file(root: str | Path, corpus_sha256: str, vocab_size: int) -> Path:
    key = hashlib.sha256(f"{FORMAT}|{corpus_sha256}|{vocab_size}".encode()).hexdigest()[:20]
    return Path(root).expanduser() / key / TOKENIZER_FILE


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path) -> Path:
    """Train a byte-level BPE (GPT-2's scheme: every byte is a token, so any text encodes) and
    publish it at ``out``; returns ``out``. An existing file is reused."""
    if out.is_file():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tok.save(str(tmp))
    os.replace(tmp, out)  # atomic: concurrent trainers publish identical files
    return out


def eos_id(tok) -> int | None:
    return tok.token_to_id(EOS)


def hf_tokenizer(file: str | Path):
    """A ``transformers`` fast tokenizer over ``file`` (for generation and MLflow)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(file))
    eos = tok.convert_tokens_to_ids(EOS) if EOS in tok.get_vocab() else None
    if eos is not None:
        tok.eos_token = EOS
        tok.pad_token = EOS
    return tok
