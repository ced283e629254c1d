"""Hugging Face ``transformers`` causal language models as raykd models (``hf_causal_lm``).

Three sources, one builder:

- ``pretrained: FOLDER`` — a ``save_pretrained`` folder (a hub id only with
  ``allow_download: true``; otherwise nothing is fetched, ``local_files_only=True``);
- ``model_type: gpt2`` + ``config: {n_layer: 2, ...}`` — a fresh model built from a config dict
  (``AutoConfig.for_model`` + ``AutoModelForCausalLM.from_config``), for training from scratch;
  ``vocab_size`` defaults to the tokenizer's (``info.vocab_size``);
- a teacher's ``teacher.checkpoint`` naming such a folder (or a ``runs:/``/``models:/`` URI of
  one): :func:`load_hf_folder`, reached through ``raykd.train.checkpoint.load_model``.

Every model returned here answers ``model(ids [B, L]) -> logits [B, L, V]`` like the other
registry models: a forward hook (:func:`logits_only`) replaces Hugging Face's output object by its
``.logits``. The model itself stays the library's class, so module paths are Hugging Face's
(``transformer.h.3``, ``model.layers.3``), state dicts and ``save_pretrained`` are unchanged, and
:func:`plain_forward` lifts the hook for ``generate`` (sequence-level KD, sampling).
Attention is ``eager`` by default, the implementation that can return attention weights.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Literal

from torch import nn

from raykd.models.args import BadArgs

HF_MODEL = "hf_causal_lm"
_HOOK = "_raykd_logits_hook"


def is_hf_folder(path: str | Path) -> bool:
    """A ``save_pretrained`` folder: a directory holding ``config.json``."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


def hf_folder_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a ``save_pretrained`` folder, read without importing transformers."""
    return json.loads((Path(path).expanduser() / "config.json").read_text())


def _logits_of(module: nn.Module, args: tuple, output: Any) -> Any:
    return getattr(output, "logits", output)


def logits_only(model: nn.Module) -> nn.Module:
    """Make ``model(ids)`` return the logits tensor (idempotent); caching of past keys is off,
    training and teacher passes see whole blocks."""
    if getattr(model, _HOOK, None) is None:
        setattr(model, _HOOK, model.register_forward_hook(_logits_of))
    model.config.use_cache = False
    model.takes_tokens = True  # registry.example_input builds token ids, not images
    model.max_len = int(getattr(model.config, "max_position_embeddings", 0)
                        or getattr(model.config, "n_positions", 0) or 128)
    return model


@contextlib.contextmanager
def plain_forward(model: nn.Module):
    """Hugging Face's own output objects while inside (what ``generate`` needs)."""
    handle = getattr(model, _HOOK, None)
    if handle is not None:
        handle.remove()
        setattr(model, _HOOK, None)
    try:
        yield model
    finally:
        if handle is not None:
            logits_only(model)


def max_positions(model_or_config) -> int | None:
    """The longest sequence the model's position embeddings allow (None: no such limit)."""
    config = getattr(model_or_config, "config", model_or_config)
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(get(key), int):
            return int(get(key))
    return None


def vocab_of(model_or_config) -> int | None:
    config = getattr(model_or_config, "config", model_or_config)
    value = config.get("vocab_size") if isinstance(config, dict) else getattr(config, "vocab_size",
                                                                              None)
    return int(value) if isinstance(value, int) else None


def load_hf_folder(path: str | Path, allow_download: bool = False,
                   attn_implementation: str = "eager") -> nn.Module:
    """A causal LM from a ``save_pretrained`` folder (or, with ``allow_download``, a hub id)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load in every worker's log otherwise
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=not allow_download,
            attn_implementation=attn_implementation)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise BadArgs(f"cannot load a causal LM from {str(path)!r} ({first[:160]}); give a "
                      f"save_pretrained folder with config.json and weights"
                      + ("" if allow_download else " (hub downloads need allow_download: true)")
                      ) from None
    return logits_only(model)


def _special_ids(info) -> dict[str, int]:
    # Token ids the config would otherwise take from its model type (GPT-2's 50256), which a
    # small trained vocabulary does not have.
    eos = getattr(info, "eos_token_id", None)
    return {} if eos is None else {"bos_token_id": eos, "eos_token_id": eos}


def build_hf_causal_lm(info, *, model_type: str | None = None,
                       config: dict[str, Any] | None = None, pretrained: str | None = None,
                       allow_download: bool = False,
                       attn_implementation: Literal["eager", "sdpa"] = "eager") -> nn.Module:
    """A causal LM: ``pretrained`` (a folder) or ``model_type`` + ``config`` (from scratch)."""
    if (pretrained is None) == (model_type is None):
        raise BadArgs("give exactly one of pretrained (a save_pretrained folder) or model_type "
                      "(with config: {...}) for model hf_causal_lm")
    if pretrained is not None:
        if not allow_download and not is_hf_folder(pretrained):
            raise BadArgs(f"pretrained={pretrained!r} is not a save_pretrained folder (no "
                          f"config.json there); give the folder, or set allow_download: true "
                          f"for a hub id")
        return load_hf_folder(pretrained, allow_download, attn_implementation)
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**_special_ids(info), **dict(config or {})}
    kwargs.setdefault("vocab_size", getattr(info, "vocab_size", None) or info.num_classes)
    try:
        hf_config = AutoConfig.for_model(model_type, **kwargs)
        model = AutoModelForCausalLM.from_config(hf_config,
                                                 attn_implementation=attn_implementation)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise BadArgs(f"model_type={model_type!r} with config {config} cannot build a causal "
                      f"LM ({first[:160]}); give a transformers model_type such as gpt2, llama "
                      f"and its config keys") from None
    return logits_only(model)


def describe_hf(model: nn.Module) -> str:
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", "?")
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", "?")
    return f"{c.model_type}(layers={layers}, hidden={hidden}, vocab_size={c.vocab_size})"


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The module path and list of the model's transformer blocks: the ModuleList whose length
    is the config's layer count (``transformer.h``, ``model.layers``, ...)."""
    layers = getattr(model.config, "num_hidden_layers", None)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers:
            return path, module
    return None


def find_hf_folder(path: str | Path) -> Path | None:
    """``path`` itself when it is a ``save_pretrained`` folder, else the shallowest folder under
    it that is one (an MLflow artifact keeps the model a level or two down); None otherwise."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    if is_hf_folder(p):
        return p
    found = sorted((c.parent for c in p.rglob("config.json") if is_hf_folder(c.parent)),
                   key=lambda f: (len(f.parts), str(f)))
    return found[0] if found else None
