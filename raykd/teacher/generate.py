"""Sequence-level KD's generation (Kim & Rush 2016, arXiv 1606.07947): the teacher continues
prompts from the train split, and its sequences become the student's training data.

The prompts are the first ``sequence_kd.prompt_tokens`` tokens of ``sequence_kd.prompts`` train
blocks, spread evenly over the split (blocks whose prompt would reach into padding are skipped).
Every prompt has the same length, so batches need no padding or attention mask. The teacher runs
Hugging Face's ``generate`` (key/value cache on): greedy — the argmax token at every step, Kim &
Rush's beam of one — or sampling with ``temperature`` and ``top_k``; the draws of the batch that
starts at row ``r`` come from a generator seeded with (``seed``, ``r``), so a run repeats
exactly for the same settings and batch size. A continuation that emits the end-of-text token
ends there (the rest of its row is padding, masked in training).

:func:`ensure_sequences` (called by the teacher actor) reuses the dataset of identical settings
(raykd.data.sequences: fingerprinted, checksummed) or generates and publishes it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raykd.config import ConfigError
from raykd.data.text import IGNORE


def prompt_rows(labels: torch.Tensor, prompts: int | None, prompt_tokens: int) -> torch.Tensor:
    """Indices of the train blocks that give prompts: every block whose first ``prompt_tokens``
    tokens are real (``prompts`` None), or that many spread evenly over them."""
    usable = torch.nonzero((labels[:, :prompt_tokens] != IGNORE).all(1)).flatten()
    if prompts is None:
        return usable
    if prompts > len(usable):
        raise ConfigError(f"sequence_kd.prompts: {prompts} prompts asked, the train split has "
                          f"{len(usable)} blocks with {prompt_tokens} real tokens; give at most "
                          f"{len(usable)} or leave it unset (one per block)")
    return usable[torch.linspace(0, len(usable) - 1, prompts).round().long()]


def _generate_kwargs(spec, pad: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": spec.new_tokens, "num_beams": 1,
                              "use_cache": True, "pad_token_id": pad,
                              "do_sample": spec.decoding == "sample"}
    if spec.eos_token_id is not None:
        kwargs["eos_token_id"] = spec.eos_token_id
    if spec.decoding == "sample":
        # top_k 0 turns Hugging Face's default top-50 off: None means the whole vocabulary
        kwargs.update(temperature=spec.temperature, top_k=spec.top_k or 0, top_p=1.0)
    return kwargs


@torch.inference_mode()
def generate_continuations(model: nn.Module, prompts: torch.Tensor, spec, batch_size: int,
                           device: torch.device | str = "cpu", progress: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N, prompt + new] int64, lengths [N]): each prompt and the teacher's
    continuation; a row that emitted end-of-text is padded after it and counted up to it."""
    from tqdm.auto import tqdm

    from raykd.models.hf import plain_forward

    width = spec.prompt_tokens + spec.new_tokens
    pad = spec.eos_token_id if spec.eos_token_id is not None else 0
    kwargs = _generate_kwargs(spec, pad)
    model.eval()
    rows, lengths = [], []
    devices = [device] if torch.device(device).type == "cuda" else []
    with plain_forward(model), tqdm(total=len(prompts), unit="sequence", desc="generating",
                                    mininterval=0.1 if sys.stderr.isatty() else 10.0,
                                    disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size].to(device)
            with torch.random.fork_rng(devices=devices):  # the caller's RNG stays as it was
                if spec.decoding == "sample":
                    torch.manual_seed(spec.seed * 1_000_003 + start)
                out = model.generate(batch, attention_mask=torch.ones_like(batch), **kwargs)
            out = out[:, :width].cpu()
            if out.shape[1] < width:  # every row of the batch ended early
                out = torch.cat([out, out.new_full((len(out), width - out.shape[1]), pad)], 1)
            rows.append(out)
            lengths.append(_lengths(out, spec.prompt_tokens, spec.eos_token_id))
            bar.update(len(batch))
    return torch.cat(rows), torch.cat(lengths)


def _lengths(tokens: torch.Tensor, prompt_tokens: int, eos: int | None) -> torch.Tensor:
    """Real tokens per row: up to and including the first end-of-text of the continuation."""
    width = tokens.shape[1]
    if eos is None:
        return torch.full((len(tokens),), width, dtype=torch.int64)
    is_eos = tokens[:, prompt_tokens:] == eos
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), width - prompt_tokens)
    return torch.clamp(prompt_tokens + first + 1, max=width)


def decoded_samples(tokenizer_file: str, tokens: torch.Tensor, lengths: torch.Tensor,
                    prompt_tokens: int, count: int) -> list[dict[str, str]]:
    """The first ``count`` rows as text: the prompt and the teacher's continuation."""
    if count <= 0:
        return []
    from raykd.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    out = []
    for row, n in zip(tokens[:count].tolist(), lengths[:count].tolist(), strict=True):
        out.append({"prompt": tok.decode(row[:prompt_tokens]),
                    "continuation": tok.decode(row[prompt_tokens:n])})
    return out


def ensure_sequences(cfg, model: nn.Module, train, fingerprint: str, cache_dir: str | Path,
                     device: torch.device | str = "cpu") -> dict[str, Any]:
    """The generated dataset of ``cfg.sequence_kd`` for this teacher and train split: reused
    when one with the same fingerprint is on disk and verifies, else generated and published.
    Returns what the summary reports (status, key, path, rows, tokens, seconds, samples)."""
    from raykd.data.sequences import (check_sequences, read_sequences, root_of, sequence_spec,
                                      write_sequences)

    seq, info = cfg.sequence_kd, train.info
    rows = prompt_rows(train.labels, seq.prompts, seq.prompt_tokens)
    spec = sequence_spec(cfg, info, fingerprint, len(rows))
    root = root_of(cache_dir)
    folder = root / spec.key()
    fresh, why = check_sequences(folder, spec, verify=True)
    started = time.perf_counter()
    if fresh:
        event: dict[str, Any] = {"status": "reused", "reason": f"fingerprint matches; {why}"}
    else:  # a damaged folder under this key is replaced: "rebuilt", with the reason
        existed = folder.exists()
        tokens, lengths = generate_continuations(
            model, train.inputs[rows, :seq.prompt_tokens], spec, seq.batch_size, device)
        write_sequences(root, spec, tokens, lengths, rows)
        event = {"status": "rebuilt" if existed else "built", "reason": why}
    arrays, manifest = read_sequences(folder)
    seconds = time.perf_counter() - started
    event.update(key=spec.key(), path=str(folder), rows=manifest["rows"],
                 width=manifest["width"], tokens=manifest["tokens"], sha256=manifest["sha256"],
                 spec=spec.to_dict(), seconds=round(seconds, 3),
                 samples=decoded_samples(info.tokenizer_file, arrays["tokens"],
                                         arrays["lengths"], seq.prompt_tokens, seq.log_samples))
    if event["status"] != "reused":
        event["tokens_per_s"] = round(len(rows) * spec.new_tokens / max(seconds, 1e-9), 1)
    return event
