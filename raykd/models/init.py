"""Initialising a shallower student from its teacher's weights (DistilBERT, Sanh et al. 2019:
"we initialize the student from the teacher by taking one layer out of two").

Layer *i* of the student takes teacher layer ``i * stride`` with
``stride = teacher_layers // student_layers``: every other layer (``2*i``) when the teacher is
twice as deep, as in DistilBERT, and spread evenly over the teacher for other ratios. Weights are
copied module by module where all shapes match, so a student that is also narrower simply keeps
its random initialisation there.
"""

from __future__ import annotations

import torch
from torch import nn

from raykd.errors import ConfigError
from raykd.models.hf import block_list, describe_hf
from raykd.models.mlp import MLP
from raykd.models.transformer import TinyTransformer


def init_student_from_teacher(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy matching teacher weights into ``student`` in place; returns the copied parameter
    names (student names). ``ConfigError`` if nothing could be copied."""
    pairs: list[tuple[str, str]] = []  # (student prefix, teacher prefix)
    if _is_hf(student) and _is_hf(teacher):
        pairs = _hf_pairs(student, teacher)
    elif isinstance(student, TinyTransformer) and isinstance(teacher, TinyTransformer):
        pairs.append(("embeddings.", "embeddings."))
        pairs += _layer_pairs("encoder.layer.", len(student.encoder.layer),
                              len(teacher.encoder.layer))
        if student.lm_head == teacher.lm_head:  # a vocab head and a class head share nothing
            pairs.append(("head.", "head."))
    elif isinstance(student, MLP) and isinstance(teacher, MLP):
        pairs += _layer_pairs("layers.", len(student.layers), len(teacher.layers))
        pairs.append(("head.", "head."))
    copied = _copy_matching(student, teacher, pairs) if pairs else []
    if not copied:
        raise ConfigError(f"student.init_from_teacher: copying teacher layers needs the same "
                          f"family and matching widths; student {_describe(student)} vs teacher "
                          f"{_describe(teacher)}")
    return copied


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


def _hf_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """Hugging Face causal LMs of one model type: student block i ← teacher block i·stride,
    and every module outside the blocks (embeddings, final norm, output head) by its own
    path — DistilBERT's initialisation for any architecture."""
    if student.config.model_type != teacher.config.model_type:
        return []
    s_blocks, t_blocks = block_list(student), block_list(teacher)
    if s_blocks is None or t_blocks is None or s_blocks[0] != t_blocks[0]:
        return []
    prefix = f"{s_blocks[0]}."
    # The blocks first (_mapped_path takes the first matching prefix); blocks past the mapped
    # ones go to a path no teacher has (they keep their init); "" maps the rest to itself.
    return [*_layer_pairs(prefix, len(s_blocks[1]), len(t_blocks[1])), (prefix, "<unmapped>."),
            ("", "")]


def _layer_pairs(prefix: str, student_layers: int, teacher_layers: int) -> list[tuple[str, str]]:
    stride = max(1, teacher_layers // max(1, student_layers))
    return [(f"{prefix}{i}.", f"{prefix}{i * stride}.")
            for i in range(student_layers) if i * stride < teacher_layers]


def _copy_matching(student: nn.Module, teacher: nn.Module, pairs: list[tuple[str, str]]
                   ) -> list[str]:
    # Module by module, all-or-nothing: a head whose weight differs in shape must not get the
    # teacher's bias alone (that would be a meaningless half-copy).
    teacher_modules = dict(teacher.named_modules())
    copied = []
    with torch.no_grad():
        for path, module in student.named_modules():
            own = dict(module.named_parameters(recurse=False))
            target = _mapped_path(path, pairs)
            source = teacher_modules.get(target) if own and target is not None else None
            if source is None:
                continue
            theirs = dict(source.named_parameters(recurse=False))
            if own.keys() == theirs.keys() and all(p.shape == theirs[k].shape
                                                   for k, p in own.items()):
                for key, param in own.items():
                    param.copy_(theirs[key])
                    copied.append(f"{path}.{key}")
    return copied


def _mapped_path(path: str, pairs: list[tuple[str, str]]) -> str | None:
    """The teacher module path for a student module path, or None if it is not mapped."""
    for s_prefix, t_prefix in pairs:
        if f"{path}.".startswith(s_prefix):
            return (t_prefix + f"{path}.".removeprefix(s_prefix)).rstrip(".")
    return None


def _describe(model: nn.Module) -> str:
    if _is_hf(model):
        return describe_hf(model)
    describe = getattr(model, "describe", None)
    return describe() if callable(describe) else type(model).__name__


def repdistiller_init(model: nn.Module, zero_linear_bias: bool = False) -> None:
    """RepDistiller's initialisation of its CIFAR networks: Kaiming-normal convolutions (fan out),
    unit-scale zero-shift batch norms and, for the WRNs, zero linear biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and zero_linear_bias:
            nn.init.zeros_(m.bias)
