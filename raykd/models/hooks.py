"""Capturing intermediate features by module path, without touching model code.

A path is what ``model.named_modules()`` lists (``layer2``, ``layers.0.linear``,
``encoder.layer.3``); ``""`` is the model itself. A trailing ``:input`` takes the module's first
input instead of its output — e.g. ``layer1.0.relu2:input`` is a pre-activation feature for
Activation Boundaries. A trailing ``:attention`` takes the attention probabilities
``[B, heads, L, L]`` that a Hugging Face attention module returns as its second output under
eager attention (``transformer.h.3.attn:attention``, ``model.layers.3.self_attn:attention``):
TinyBERT's attention loss on transformers models. A module that runs several times in one
forward (a shared ReLU) keeps the value of its last call.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from raykd.errors import ConfigError

INPUT_SUFFIX = ":input"
ATTENTION_SUFFIX = ":attention"


def split_path(path: str, field: str) -> tuple[str, bool]:
    """``"a.b:input"`` → ``("a.b", True)``; ``"a.b"`` (or ``"a.b:attention"``) →
    ``("a.b", False)``."""
    module_path, sep, suffix = path.partition(":")
    if sep and f":{suffix}" not in (INPUT_SUFFIX, ATTENTION_SUFFIX):
        raise ConfigError(f"{field}: module path {path!r} has an unknown suffix ':{suffix}'; "
                          f"allowed: a module path, optionally ending in {INPUT_SUFFIX} or "
                          f"{ATTENTION_SUFFIX}")
    return module_path, suffix == INPUT_SUFFIX[1:]


def resolve_module(model: nn.Module, path: str, field: str) -> nn.Module:
    """The submodule at ``path`` (a trailing ``:input`` is ignored here), or a ``ConfigError``
    listing the closest existing paths."""
    module_path, _ = split_path(path, field)
    try:
        return model.get_submodule(module_path)
    except AttributeError:
        nearby = ", ".join(_nearby_paths(model, module_path))
        raise ConfigError(f"{field}: module path {path!r} not found in {type(model).__name__}; "
                          f"nearby paths: {nearby}") from None


def _nearby_paths(model: nn.Module, path: str, limit: int = 6) -> list[str]:
    names = [name for name, _ in model.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=limit, cutoff=0.6)
    if close:
        return close
    # Nothing spelled alike (e.g. "layer7.0"): list the children of the deepest part that exists.
    parts = path.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:depth])
        try:
            parent = model.get_submodule(prefix)
        except AttributeError:
            continue
        children = [f"{prefix}.{name}" if prefix else name for name, _ in parent.named_children()]
        if children:
            return children[:limit]
    return names[:limit] or ["(the model has no submodules)"]


def _first_tensor(value: Any) -> Any:
    # Modules such as nn.MultiheadAttention or nn.LSTM return tuples; the first item is the output.
    while isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value


def _keep(value: Any) -> Any:
    # A clone, not the tensor itself: later inplace ops (torchvision's `out += identity`,
    # ReLU(inplace=True)) would otherwise rewrite the captured value after the hook returned.
    # clone() is differentiable, so gradients still flow back into the model.
    return value.clone() if isinstance(value, torch.Tensor) else value


class FeatureHooks:
    """Context manager: while open, every forward of ``model`` fills ``.features[path]``.

    Paths are checked when the object is created (bad paths fail before any forward). Captured
    values keep their autograd graph (no detach), so a feature loss trains the student through
    them; wrap teacher forwards in ``torch.no_grad()`` as usual. Hooks are removed on exit;
    ``.features`` keeps the last forward's values.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], field: str):
        self.model = model
        self.field = field
        self.paths = list(dict.fromkeys(paths))  # de-duplicated, order kept
        self.features: dict[str, Any] = {}
        self._targets = [(path, resolve_module(model, path, field), split_path(path, field)[1])
                         for path in self.paths]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureHooks:
        for path, module, wants_input in self._targets:
            if wants_input:
                # A pre-hook sees the input before the module runs (an inplace module would
                # overwrite it); kwargs too, since some modules are called as f(src=x).
                handle = module.register_forward_pre_hook(self._input_hook(path), with_kwargs=True)
            elif path.endswith(ATTENTION_SUFFIX):
                handle = module.register_forward_hook(self._attention_hook(path))
            else:
                handle = module.register_forward_hook(self._output_hook(path))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _output_hook(self, path: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.features[path] = _keep(_first_tensor(output))
        return hook

    def _attention_hook(self, path: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 \
                else None
            # None (e.g. sdpa attention, which never forms the probabilities) fails in
            # probe_shapes with the path named.
            self.features[path] = _keep(weights) if isinstance(weights, torch.Tensor) else None
        return hook

    def _input_hook(self, path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            first = args[0] if args else next(iter(kwargs.values()), None)
            self.features[path] = _keep(_first_tensor(first))
        return hook


def probe_shapes(model: nn.Module, paths: Iterable[str], example_x: torch.Tensor, field: str
                 ) -> dict[str, torch.Size]:
    """Shapes of the features at ``paths`` for one batch ``example_x`` (batch dim included).

    Runs one no-grad forward in eval mode (so BatchNorm statistics and dropout are untouched)
    and restores each submodule's own training flag afterwards — not just the top-level one, so
    a deliberately frozen submodule (e.g. BN kept in eval) stays as it was.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FeatureHooks(model, paths, field) as hooks:
            model(example_x)
    finally:
        for module, training in modes.items():
            module.training = training
    shapes = {}
    for path in hooks.paths:
        value = hooks.features.get(path)
        if value is None and path in hooks.features and path.endswith(ATTENTION_SUFFIX):
            raise ConfigError(f"{field}: module path {path!r} returned no attention "
                              f"probabilities; allowed: an attention module of a transformers "
                              f"model built with args.attn_implementation: eager")
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"{field}: module path {path!r} "
                              + ("did not run during a forward pass" if value is None
                                 else f"gives a {type(value).__name__}, not a tensor")
                              + f" of {type(model).__name__}; allowed: a module on the forward "
                                f"path that outputs a tensor")
        shapes[path] = value.shape
    return shapes
