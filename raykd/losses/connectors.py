"""Learned maps from student features into the teacher's feature space.

FitNets' regressor, AB's connector, DistilBERT's projection and TinyBERT's W all do one job: make
the student's width equal the teacher's so a distance can be taken. They are built from the probed
shapes, so their parameters exist before the optimiser does and train with the student.
"""

from __future__ import annotations

from torch import Tensor, nn

from raykd.losses.base import BuildContext, spatial_match


def feature_width(shape) -> int:
    """Channels of a conv map [B, C, H, W]; the last (hidden) dim of [B, H] and [B, L, H]."""
    return int(shape[1]) if len(shape) == 4 else int(shape[-1])


class LastDimLinear(nn.Linear):
    """``nn.Linear`` over the hidden dim of [B, H] or [B, L, H] (TinyBERT's W_h, W_e)."""


def make_connector(ctx: BuildContext, i: int, mode: str, batch_norm: bool = False) -> nn.Module:
    """The map for layer pair ``i``: identity, a 1×1 conv (4-D) or a linear layer (2-D/3-D).

    ``batch_norm`` adds BN after the map, as AB's connector does (arXiv 1811.03233, §3.3).
    Raises ConfigError when the two layers cannot be compared even after the map.
    """
    s_shape, t_shape = ctx.student_shapes[i], ctx.teacher_shapes[i]
    if len(s_shape) != len(t_shape):
        raise ctx.error(f"needs features of the same rank on both sides; {ctx.describe_pair(i)}")
    if len(s_shape) == 3 and s_shape[1] != t_shape[1]:
        raise ctx.error(f"needs the same sequence length on both sides; {ctx.describe_pair(i)}")
    c_s, c_t = feature_width(s_shape), feature_width(t_shape)
    if mode == "identity" or (mode == "auto" and c_s == c_t):
        if c_s != c_t:
            raise ctx.error(f"needs matching channel counts or a connector (params.connector: "
                            f"auto or learned); {ctx.describe_pair(i)}")
        return nn.Identity()
    if len(s_shape) == 4:
        layers: list[nn.Module] = [nn.Conv2d(c_s, c_t, kernel_size=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_t))
    elif len(s_shape) == 2:
        layers = [nn.Linear(c_s, c_t, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(c_t))
    elif len(s_shape) == 3:
        layers = [LastDimLinear(c_s, c_t)]  # BN over tokens is not meaningful; plain linear
    else:
        raise ctx.error(f"supports features of shape [C, H, W], [L, H] or [H]; "
                        f"{ctx.describe_pair(i)}")
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def connect(connector: nn.Module, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Map the student feature, then pool 4-D maps to the common (smaller) H×W."""
    return spatial_match(connector(s), t)


def _conv_bn_act(c_in: int, c_out: int, transpose: bool = False) -> list[nn.Module]:
    conv = (nn.ConvTranspose2d if transpose else nn.Conv2d)(c_in, c_out, 3, padding=1)
    return [conv, nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """FT's teacher-side conv autoencoder (arXiv 1802.04977, §3.1): C → m·… → factor → C.

    Three stride-1 3×3 convs in, three transposed convs out, BN and leaky ReLU between, as the
    authors' code; ``factor_channels`` = round(rate · C) (paper's paraphrase rate k, 0.5).
    """

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        self.encoder = nn.Sequential(*_conv_bn_act(channels, channels),
                                     *_conv_bn_act(channels, factor_channels),
                                     *_conv_bn_act(factor_channels, factor_channels))
        self.decoder = nn.Sequential(*_conv_bn_act(factor_channels, factor_channels, True),
                                     *_conv_bn_act(factor_channels, channels, True),
                                     nn.ConvTranspose2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Sequential):
    """FT's student-side encoder into the paraphraser's factor space (same shape of network)."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__(*_conv_bn_act(channels, channels),
                         *_conv_bn_act(channels, factor_channels),
                         *_conv_bn_act(factor_channels, factor_channels))
