"""Preflight checks of language models against the text data and each other: one line each,
in the driver, before Ray starts (raykd.preflight)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from raykd.checksums import file_sha256
from raykd.config import URI_SCHEMES, ConfigError, RaykdConfig
from raykd.losses.registry import LOSSES, term_field
from raykd.models.hf import max_positions

ULD_HINT = ("use token_uld (Universal Logit Distillation: sorted probabilities, any two "
            "vocabularies) to distil across tokenizers")


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
                          roles: tuple[str, ...], teacher_info=None) -> None:
    """Both models emit one logit per token of their tokenizer's vocabulary and take blocks of
    ``data.block_size``; teacher and student share one vocabulary, unless every token term is
    ``token_uld``. ``teacher_info``: the teacher's own tokenizer's info (``teacher.tokenizer``,
    raykd.data.cross_tokens), None when it reads the student's tokens."""
    own = teacher_info is not None
    sides = [("teacher", teacher)] + ([("student", student)] if "student" in roles else [])
    for side, model in sides:
        side_info = teacher_info if own and side == "teacher" else info
        vocab = _vocab(model)
        if vocab is not None and vocab < side_info.vocab_size:
            hint = "teacher.tokenizer" if own and side == "teacher" else "data.tokenizer"
            raise ConfigError(f"{_vocab_field(cfg, side)}: the {side} has {vocab} token ids, the "
                              f"tokenizer {side_info.vocab_size} ({side_info.tokenizer_file}); "
                              f"give a tokenizer of the {side}'s vocabulary ({hint}) or a "
                              f"{side} built for this one")
        limit = _positions(model)
        if limit is not None and info.block_size > limit:
            raise ConfigError(f"data.block_size: {info.block_size} tokens exceed the {side}'s "
                              f"{limit} positions; set data.block_size <= {limit}")
    if own:
        _check_own_tokenizer(cfg)
    else:
        _check_checkpoint_tokenizer(cfg, info)
    if "student" in roles:
        t_vocab, s_vocab = _vocab(teacher), _vocab(student)
        if own or (t_vocab is not None and s_vocab is not None and t_vocab != s_vocab):
            _check_terms_across(cfg, t_vocab, s_vocab, own)


def _check_terms_across(cfg: RaykdConfig, t_vocab, s_vocab, own: bool) -> None:
    """Teacher ids are not the student's: only terms that need no common vocabulary apply."""
    for term in cfg.distill.terms():
        spec = LOSSES[term.name]
        if term.weight <= 0 or "logits" not in spec.needs \
                or getattr(spec.cls, "cross_vocabulary", False):
            continue
        field = term_field(term, cfg.distill)
        if own:
            raise ConfigError(f"{field}: {term.name} compares teacher and student probabilities "
                              f"token id by token id, but the teacher reads its own tokenizer "
                              f"(teacher.tokenizer, {t_vocab} ids) and the student another "
                              f"({s_vocab} ids); {ULD_HINT}")
        raise ConfigError(f"{_vocab_field(cfg, 'student')}: the student's vocabulary has "
                          f"{s_vocab} ids, the teacher's {t_vocab}; {term.name} ({field}) "
                          f"needs one vocabulary (leave the student's vocab_size unset to take "
                          f"the tokenizer's, or set it to {t_vocab}), or {ULD_HINT}")


def _check_own_tokenizer(cfg: RaykdConfig) -> None:
    """What a teacher with its own tokenizer cannot do: only the cache build re-tokenises."""
    if not (cfg.teacher.checkpoint or cfg.teacher.ensemble):
        raise ConfigError("teacher.tokenizer: a teacher trained by this job learns "
                          "data.tokenizer's tokens; give teacher.checkpoint (a teacher trained "
                          "with this tokenizer, e.g. `raykd train-teacher` with data.tokenizer "
                          "set to it) or unset teacher.tokenizer")
    if cfg.teacher.mode != "cached":
        raise ConfigError(f"teacher.mode: a teacher with its own tokenizer (teacher.tokenizer) "
                          f"reads each block's text in its own tokens while the cache is built; "
                          f"{cfg.teacher.mode} mode would give it the student's token ids; set "
                          f"teacher.mode=cached")
    if cfg.teacher.replicas > 1:  # the pool's replicas read the student's blocks
        raise ConfigError(f"teacher.replicas: a teacher with its own tokenizer "
                          f"(teacher.tokenizer) builds its cache in the teacher actor only; "
                          f"set teacher.replicas=1 (got {cfg.teacher.replicas})")
    if cfg.sequence_kd is not None or cfg.data.sequences:
        raise ConfigError("teacher.tokenizer: sequence-level KD writes the student's data with "
                          "the teacher's generate, which needs one tokenizer; unset "
                          "teacher.tokenizer")


def _check_checkpoint_tokenizer(cfg: RaykdConfig, info) -> None:
    """A teacher folder saved with another tokenizer than the data's, and no teacher.tokenizer:
    the teacher would read the student's ids as its own, and no text alignment exists."""
    source = cfg.teacher.checkpoint
    file = Path(source) / "tokenizer.json" if source and not source.startswith(URI_SCHEMES) \
        else None
    if file is None or not file.is_file() or file_sha256(file) == info.tokenizer_sha256:
        return
    raise ConfigError(f"teacher.tokenizer: the teacher's folder {source} holds its own "
                      f"tokenizer.json, not data.tokenizer's ({info.tokenizer_file}), so it "
                      f"would read the student's token ids as its own; set "
                      f"teacher.tokenizer={source} and distil with token_uld, or "
                      f"data.tokenizer={source}")
