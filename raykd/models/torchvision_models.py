"""``torchvision:NAME`` — any torchvision classification model, randomly initialised.

torchvision is imported lazily: it takes seconds to import and most runs never need it.
Weights are never requested (``weights=None``): raykd runs offline and teachers are trained or
loaded from checkpoints, not downloaded.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from raykd.models.args import BadArgs

PREFIX = "torchvision:"
# Set by raykd from the dataset, never by the user.
RESERVED_ARGS = ("weights", "weights_backbone", "num_classes", "progress")


def torchvision_names() -> list[str]:
    import torchvision.models

    # module= restricts the list to classifiers (no detection/segmentation/video/quantized models)
    return torchvision.models.list_models(module=torchvision.models)


def is_torchvision_model(name: str) -> bool:
    return name.startswith(PREFIX) and name.removeprefix(PREFIX) in torchvision_names()


def build_torchvision(name: str, info, args: dict[str, Any]) -> nn.Module:
    """``torchvision:NAME`` for ``info``'s classes and channels; ``args`` go to the builder."""
    import torchvision.models

    arch = name.removeprefix(PREFIX)
    for key in RESERVED_ARGS:
        if key in args:
            raise BadArgs(f"{key!r} cannot be set for {name} (raykd never downloads weights and "
                          f"takes num_classes from the dataset); allowed: other keyword arguments "
                          f"of torchvision.models.{arch}")
    kwargs = dict(args)
    if arch in ("googlenet", "inception_v3"):
        # Without pretrained weights these default to auxiliary heads, whose training-mode output
        # is a namedtuple rather than a logits tensor; init_weights=True silences a warning.
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=info.num_classes,
                                             **kwargs)
    except TypeError as err:  # an unknown keyword for this architecture
        raise BadArgs(f"{name} rejected the arguments ({err}); allowed: keyword arguments of "
                      f"torchvision.models.{arch}") from None
    in_channels = info.input_shape[0]
    if in_channels != 3:
        _replace_stem_conv(model, in_channels, name)
    return model


def _replace_stem_conv(model: nn.Module, in_channels: int, name: str) -> None:
    """Swap the first RGB convolution for one taking ``in_channels`` (e.g. 1 for MNIST).

    torchvision's architectures hard-code 3 input channels in their stem. Replicating a grey image
    to 3 channels would also work but triples the data moved per batch and hides the mismatch;
    since the weights are random anyway, a stem of the right width loses nothing. Stride, padding
    and kernel are kept so the rest of the network sees the same feature-map sizes.
    """
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            stem = nn.Conv2d(in_channels, module.out_channels, module.kernel_size,
                             stride=module.stride, padding=module.padding,
                             dilation=module.dilation, bias=module.bias is not None,
                             padding_mode=module.padding_mode)
            model.set_submodule(path, stem)
            return
    raise BadArgs(f"{name} has no 3-channel first convolution to adapt to {in_channels} input "
                  f"channels; allowed: a torchvision model with a convolutional stem")
