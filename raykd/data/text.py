"""``data.name: text``: a local corpus as blocks of token ids for causal language models.

The file (``data.path``) is read with Hugging Face ``datasets``: plain text (``.txt`` and any
other suffix, the whole file one document), JSON lines / JSON (``.jsonl``, ``.json``; the
documents are ``data.text_field``) or Parquet (``.parquet``; the same field). Documents are
tokenized (raykd.data.tokenizer), joined with the end-of-text token where the tokenizer has one,
and the token stream is split BY POSITION as nanoGPT does: the last 10% is the test split, the
``data.val_fraction`` before it validation, the rest training — no shuffling, so no block of a
held-out split shares text with training.

Each split is cut into blocks of ``data.block_size`` inputs; the labels are the inputs shifted by
one token (next-token prediction). The last block of a split is padded: padding inputs are the
end-of-text id (or 0) and their labels are -100, which the cross-entropy ignores and every
language loss masks (``mask = labels != -100``). A causal model never attends forward, so
right padding needs no attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset

from raykd.checksums import file_sha256
from raykd.config import ConfigError
from raykd.data.indexed import SPLITS, DatasetInfo, split_checksum
from raykd.data.sequences import IGNORE, read_sequences, sequence_blocks

if TYPE_CHECKING:
    from raykd.config import DataConfig

TEST_FRACTION = 0.1  # nanoGPT holds out the last 10% of the token stream


@dataclass(frozen=True)
class TextInfo(DatasetInfo):
    """DatasetInfo of token blocks: ``input_shape`` is ``(block_size,)``, ``num_classes`` the
    vocabulary size (what a language model predicts)."""

    vocab_size: int = 0
    block_size: int = 0
    tokenizer_file: str = ""
    tokenizer_sha256: str = ""
    corpus_sha256: str = ""
    eos_token_id: int | None = None
    tokens: dict[str, int] = field(default_factory=dict)  # real (unpadded) tokens per split


@dataclass(eq=False)
class TokenBlocks(Dataset):
    """One split as ``inputs`` / ``labels`` [N, block_size] int64; items are
    ``(index, ids [L], next ids [L])``, the interface of ``IndexedDataset``."""

    inputs: torch.Tensor
    labels: torch.Tensor
    info: TextInfo | None = None
    _checksum: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        i = int(i) % max(len(self), 1)
        return i, self.inputs[i].clone(), self.labels[i].clone()

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return idx, self.inputs[idx], self.labels[idx]

    def num_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def checksum(self) -> str:
        return split_checksum(self)

    def subset_indices(self, include: list[int] | None = None,
                       exclude: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        if include is not None or exclude:
            raise ConfigError("distill.include_classes: class filters do not apply to text "
                              "(every block holds many tokens); remove include_classes / "
                              "exclude_classes")
        return torch.arange(len(self))



def _reader(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix, "text")


def read_documents(cfg: DataConfig) -> list[str]:
    """The corpus's documents, read with ``datasets`` (nothing cached beside the user's file
    but Hugging Face's own dataset cache)."""
    import datasets

    path = Path(cfg.path).expanduser()
    kind = _reader(path)
    datasets.disable_progress_bars()
    kwargs = {"sample_by": "document"} if kind == "text" else {}
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train",
                                   keep_in_memory=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - decode, JSON and Arrow errors of many kinds
        cause = err.__cause__ or err.__context__ or err
        what = {"text": "UTF-8 text", "json": "JSON lines", "parquet": "Parquet"}[kind]
        reason = (str(cause).strip().splitlines() or [""])[0][:120]
        raise ConfigError(f"data.path: cannot read {path} as {what} ({type(cause).__name__}: "
                          f"{reason}); give a UTF-8 .txt file, a .jsonl file or a .parquet "
                          f"file") from None
    column = "text" if kind == "text" else cfg.text_field
    if column not in ds.column_names:
        raise ConfigError(f"data.text_field: {cfg.text_field!r} is not a field of {path}; its "
                          f"fields: {', '.join(ds.column_names) or 'none'}")
    docs = [d for d in ds[column] if isinstance(d, str) and d]
    if not docs:
        raise ConfigError(f"data.path: {path} holds no text in field {column!r}; give a "
                          f"non-empty corpus")
    return docs


def _tokenizer(cfg: DataConfig, docs: list[str], corpus_sha: str) -> Path:
    from raykd.data.tokenizer import tokenizer_file, train_bpe, trained_tokenizer_file

    if cfg.tokenizer:
        return tokenizer_file(cfg.tokenizer)
    from raykd.train.storage import default_root

    root = cfg.tokenizer_dir or str(default_root() / "cache" / "tokenizers")
    return train_bpe(docs, cfg.vocab_size, trained_tokenizer_file(root, corpus_sha, cfg.vocab_size))


def _blocks(stream: torch.Tensor, block_size: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping blocks of ``block_size`` inputs, labels shifted by one; the last block
    padded (inputs ``pad``, labels IGNORE)."""
    n = max(len(stream) - 1, 0)
    count = -(-n // block_size)
    inputs = torch.full((count * block_size,), pad, dtype=torch.int64)
    labels = torch.full((count * block_size,), IGNORE, dtype=torch.int64)
    inputs[:n], labels[:n] = stream[:-1], stream[1:]
    return inputs.view(count, block_size), labels.view(count, block_size)


def load_text(cfg: DataConfig) -> tuple[TextInfo, dict[str, TokenBlocks]]:
    from raykd.data.tokenizer import eos_id, load_tokenizer

    path = Path(cfg.path).expanduser()
    corpus_sha = file_sha256(path)
    docs = read_documents(cfg)
    tok_file = _tokenizer(cfg, docs, corpus_sha)
    tok = load_tokenizer(tok_file)
    eos = eos_id(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        if eos is not None:
            ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.int64)
    n = len(stream)
    n_test = int(n * TEST_FRACTION)
    n_val = int(n * cfg.val_fraction)
    bounds = {"train": (0, n - n_test - n_val), "val": (n - n_test - n_val, n - n_test),
              "test": (n - n_test, n)}
    L = cfg.block_size
    for split in ("train", "test"):
        lo, hi = bounds[split]
        if hi - lo < L + 1:
            raise ConfigError(f"data.block_size: {L} needs at least {L + 1} tokens in the "
                              f"{split} split, which has {hi - lo} ({n} tokens in all, the last "
                              f"{TEST_FRACTION:.0%} held out); lower data.block_size or give "
                              f"a longer corpus")
    pad = eos if eos is not None else 0
    splits, tokens = {}, {}
    for split in SPLITS:
        lo, hi = bounds[split]
        inputs, labels = _blocks(stream[lo:hi], L, pad)
        if cfg.limit is not None:
            inputs, labels = inputs[:cfg.limit], labels[:cfg.limit]
        splits[split] = TokenBlocks(inputs, labels)
        tokens[split] = splits[split].num_tokens()
    generated = ""
    if cfg.sequences:  # sequence-level KD's student: the teacher's sequences are its train split
        splits["train"], generated = _generated_train(cfg, splits["train"], pad)
        tokens["train"] = splits["train"].num_tokens()
    tok_sha = file_sha256(tok_file)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    identity = "|".join([
        "text", f"corpus_sha256={corpus_sha[:16]}", f"tokenizer_sha256={tok_sha[:16]}",
        f"block_size={L}", f"val_fraction={cfg.val_fraction}", f"limit={cfg.limit}",
        f"text_field={cfg.text_field if _reader(path) != 'text' else ''}"] + (
            [generated] if generated else []))
    info = TextInfo(name="text", input_shape=(L,), num_classes=vocab,
                    sizes={s: len(splits[s]) for s in SPLITS}, identity=identity,
                    preprocessing=f"tokens of {tok_file.name} ({vocab} ids), blocks of {L}, "
                                  f"labels shifted by one, padding label {IGNORE}",
                    vocab_size=vocab, block_size=L, tokenizer_file=str(tok_file),
                    tokenizer_sha256=tok_sha, corpus_sha256=corpus_sha, eos_token_id=eos,
                    tokens=tokens)
    for ds in splits.values():
        ds.info = info
    return info, splits


def _generated_train(cfg: DataConfig, train: TokenBlocks, pad: int) -> tuple[TokenBlocks, str]:
    """The generated sequences of ``data.sequences`` as train blocks (then the corpus's own
    train blocks with ``data.sequences_with_original``), and the identity part naming them."""
    from raykd.node_files import require

    require(cfg.sequences, "data.sequences", "folder")  # missing on a worker's node: says which
    arrays, manifest = read_sequences(cfg.sequences)
    if manifest["spec"]["block_size"] != cfg.block_size:
        raise ConfigError(f"data.sequences: {cfg.sequences} was generated for blocks of "
                          f"{manifest['spec']['block_size']} tokens, data.block_size is "
                          f"{cfg.block_size}; generate it again for this block size")
    inputs, labels = sequence_blocks(arrays["tokens"], arrays["lengths"], cfg.block_size, pad)
    if cfg.sequences_with_original:
        inputs, labels = torch.cat([inputs, train.inputs]), torch.cat([labels, train.labels])
    mixed = "+original" if cfg.sequences_with_original else ""
    return TokenBlocks(inputs, labels), f"sequences={manifest['sha256'][:16]}{mixed}"
