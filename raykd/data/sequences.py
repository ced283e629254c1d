"""Sequence-level KD's dataset: a teacher's continuations of prompts, stored once per settings.

Layout ``<teacher.cache_dir>/sequences/<key>/``: ``sequences.safetensors`` (no pickle) with
``tokens`` [N, prompt + new] int64 — each row a prompt from the train split followed by the
teacher's continuation —, ``lengths`` [N] (real tokens of the row: a continuation that emitted
the end-of-text token stops after it) and ``prompt_rows`` [N] (the train block each prompt came
from); and ``manifest.json`` (the spec, the sha256 and size of the data file). The key hashes the
:class:`SequenceSpec` — the teacher's weights fingerprint, the corpus and tokenizer checksums, the
block size and every generation setting — so a changed setting lands in a new folder and a
repeated one finds its dataset. Written in a hidden sibling folder and renamed into place,
manifest last, as the teacher caches are.

:func:`sequence_blocks` turns the rows into what the train loop reads from a text split
(``TokenBlocks``: inputs, labels shifted by one, padding labelled -100 and masked), so the student
learns them through the ordinary ``fit`` path (``data.sequences``, raykd.data.text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from raykd.checksums import file_sha256

IGNORE = -100  # label of padding positions (torch's cross-entropy ignore_index)

KIND = "generated_sequences"
FORMAT_VERSION = 1
DATA_FILE = "sequences.safetensors"
MANIFEST = "manifest.json"
SUBDIR = "sequences"  # under the teacher cache folder


@dataclass(frozen=True, kw_only=True)
class SequenceSpec:
    """Everything the generated tokens depend on. Greedy decoding draws nothing, so its spec
    holds no temperature, top-k, seed or batch size: changing them there reuses the dataset."""

    teacher_fingerprint: str
    corpus_sha256: str
    tokenizer_sha256: str
    block_size: int
    prompts: int  # rows (prompts actually taken)
    prompt_tokens: int
    new_tokens: int
    decoding: str  # greedy | sample
    temperature: float | None = None
    top_k: int | None = None
    seed: int | None = None
    batch_size: int | None = None  # sampling: one draw stream per batch, so rows depend on it
    eos_token_id: int | None = None
    kind: str = KIND
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def sequence_spec(cfg, info, fingerprint: str, prompts: int) -> SequenceSpec:
    """The spec of ``cfg.sequence_kd`` for a teacher (``fingerprint``) and text data ``info``."""
    seq = cfg.sequence_kd
    sample = seq.decoding == "sample"
    return SequenceSpec(
        teacher_fingerprint=fingerprint, corpus_sha256=info.corpus_sha256,
        tokenizer_sha256=info.tokenizer_sha256, block_size=info.block_size, prompts=prompts,
        prompt_tokens=seq.prompt_tokens, new_tokens=seq.width(info.block_size) - seq.prompt_tokens,
        decoding=seq.decoding, temperature=seq.temperature if sample else None,
        top_k=seq.top_k if sample else None, seed=seq.seed if sample else None,
        batch_size=seq.batch_size if sample else None, eos_token_id=info.eos_token_id)


def root_of(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / SUBDIR


def check_sequences(folder: str | Path, spec: SequenceSpec | None = None,
                    verify: bool = True) -> tuple[bool, str]:
    """(fresh, why): the manifest matches ``spec`` (when given), the file has the recorded size
    and, with ``verify``, its sha256."""
    folder = Path(folder).expanduser()
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False, f"no generated dataset at {folder}"
    if manifest.get("kind") != KIND:
        return False, f"{folder} is not a generated-sequences dataset"
    if spec is not None and manifest.get("spec") != spec.to_dict():
        return False, f"{folder} was generated with other settings"
    data = folder / DATA_FILE
    if not data.is_file() or data.stat().st_size != manifest.get("data_bytes"):
        return False, f"{data} is missing or truncated"
    if verify and file_sha256(data) != manifest.get("sha256"):
        return False, f"{data} does not match its sha256 checksum"
    return True, f"{folder.name}: {manifest['rows']} sequences of {manifest['width']} tokens"


def write_sequences(root: str | Path, spec: SequenceSpec, tokens: torch.Tensor,
                    lengths: torch.Tensor, prompt_rows: torch.Tensor) -> Path:
    """Publish the dataset under ``root/<key>`` atomically; returns the folder."""
    from safetensors.torch import save_file

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    final = root / spec.key()
    tmp = root / f".tmp-{spec.key()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({"tokens": tokens.to(torch.int64).contiguous(),
                   "lengths": lengths.to(torch.int64).contiguous(),
                   "prompt_rows": prompt_rows.to(torch.int64).contiguous()}, str(tmp / DATA_FILE))
        manifest = {"kind": KIND, "format_version": FORMAT_VERSION, "key": spec.key(),
                    "spec": spec.to_dict(), "sha256": file_sha256(tmp / DATA_FILE),
                    "data_bytes": (tmp / DATA_FILE).stat().st_size,
                    "rows": int(tokens.shape[0]), "width": int(tokens.shape[1]),
                    "tokens": int(lengths.sum()),
                    "created": datetime.now(UTC).isoformat(timespec="seconds")}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if final.exists():
            if check_sequences(final, spec)[0]:  # a concurrent builder was first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            trash = root / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)  # damaged: set aside, then replaced
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_sequences(folder: str | Path, verify: bool = False
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(arrays, manifest) of a published dataset; a one-line ConfigError when it is not one."""
    from safetensors.torch import load_file

    from raykd.config import ConfigError

    folder = Path(folder).expanduser()
    fresh, why = check_sequences(folder, verify=verify)
    if not fresh:
        raise ConfigError(f"data.sequences: {why}; run raykd seq-kd to generate it")
    return load_file(str(folder / DATA_FILE)), json.loads((folder / MANIFEST).read_text())


def sequence_blocks(tokens: torch.Tensor, lengths: torch.Tensor, block_size: int, pad: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows as training blocks: inputs ``tokens[:, :-1]``, labels ``tokens[:, 1:]``, right-padded
    to ``block_size`` (inputs ``pad``, labels -100); labels past a row's length are -100 too."""
    n, width = tokens.shape
    if width - 1 > block_size:
        raise ValueError(f"sequences of {width} tokens do not fit blocks of {block_size}")
    inputs = torch.full((n, block_size), pad, dtype=torch.int64)
    labels = torch.full((n, block_size), IGNORE, dtype=torch.int64)
    inputs[:, :width - 1] = tokens[:, :-1]
    labels[:, :width - 1] = tokens[:, 1:]
    past_end = torch.arange(block_size)[None, :] >= (lengths[:, None] - 1)
    labels[past_end] = IGNORE  # inputs there are already the generator's padding
    return inputs, labels
