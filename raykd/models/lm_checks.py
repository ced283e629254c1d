"""Preflight checks of language models against the text data and each other: one line each,
in the driver, before Ray starts (raykd.preflight)."""

from __future__ import annotations

from torch import nn

from raykd.config import ConfigError, RaykdConfig
from raykd.models.hf import max_positions


def _vocab(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None:
        return int(config.vocab_size)
    return getattr(model, "vocab_size", None)


def _positions(model: nn.Module) -> int | None:
    if getattr(model, "config", None) is not None:
        return max_positions(model)
    return getattr(model, "max_len", None)


def _vocab_field(cfg: RaykdConfig, side: str) -> str:
    section = getattr(cfg, side)
    if side == "teacher" and (cfg.teacher.checkpoint or cfg.teacher.ensemble):
        return "teacher.checkpoint"
    return f"{side}.args.config.vocab_size" if section.name == "hf_causal_lm" else \
        f"{side}.args.vocab_size"


def check_language_models(cfg: RaykdConfig, info, teacher: nn.Module, student: nn.Module,
                          roles: tuple[str, ...]) -> None:
    """Both models emit one logit per token of the tokenizer's vocabulary, take blocks of
    ``data.block_size`` and share one vocabulary (token ids mean the same to both)."""
    sides = [("teacher", teacher)] + ([("student", student)] if "student" in roles else [])
    for side, model in sides:
        vocab = _vocab(model)
        if vocab is not None and vocab < info.vocab_size:
            raise ConfigError(f"{_vocab_field(cfg, side)}: the {side} has {vocab} token ids, the "
                              f"tokenizer {info.vocab_size} ({info.tokenizer_file}); give a "
                              f"tokenizer of the {side}'s vocabulary (data.tokenizer) or a "
                              f"{side} built for this one")
        limit = _positions(model)
        if limit is not None and info.block_size > limit:
            raise ConfigError(f"data.block_size: {info.block_size} tokens exceed the {side}'s "
                              f"{limit} positions; set data.block_size <= {limit}")
    if "student" in roles:
        t_vocab, s_vocab = _vocab(teacher), _vocab(student)
        if t_vocab is not None and s_vocab is not None and t_vocab != s_vocab:
            raise ConfigError(f"{_vocab_field(cfg, 'student')}: the student's vocabulary has "
                              f"{s_vocab} ids, the teacher's {t_vocab}; teacher and student must "
                              f"share one vocabulary (leave the student's vocab_size unset to "
                              f"take the tokenizer's, or set it to {t_vocab})")
