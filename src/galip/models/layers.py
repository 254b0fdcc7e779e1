"""Building blocks shared by the generator and the discriminator (reference §1.5).

Text conditioning is DF-GAN's deep fusion: every ``Affine`` predicts a per-channel scale and shift
from the condition vector ``[z; s]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(cond_dim: int, channels: int) -> nn.Sequential:
    from collections import OrderedDict

    return nn.Sequential(
        OrderedDict(
            linear1=nn.Linear(cond_dim, channels),
            relu1=nn.ReLU(inplace=True),
            linear2=nn.Linear(channels, channels),
        )
    )


class Affine(nn.Module):
    """x * gamma(y) + beta(y), channel-wise; identity at initialisation."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.fc_gamma = _mlp(cond_dim, channels)
        self.fc_beta = _mlp(cond_dim, channels)
        nn.init.zeros_(self.fc_gamma.linear2.weight)
        nn.init.ones_(self.fc_gamma.linear2.bias)
        nn.init.zeros_(self.fc_beta.linear2.weight)
        nn.init.zeros_(self.fc_beta.linear2.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gamma = self.fc_gamma(y)[:, :, None, None]
        beta = self.fc_beta(y)[:, :, None, None]
        return gamma * x + beta


class DFBlock(nn.Module):
    """Deep fusion: two text-conditioned affines, each followed by LeakyReLU(0.2)."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.affine0 = Affine(cond_dim, channels)
        self.affine1 = Affine(cond_dim, channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.affine0(x, y), 0.2)
        return F.leaky_relu(self.affine1(x, y), 0.2)


class FusionBlock(nn.Module):
    """Residual conv -> DF -> conv -> DF block of the bridge feature predictor (official ``M_Block``)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, cond_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, 1, 1)
        self.fuse1 = DFBlock(cond_dim, mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1)
        self.fuse2 = DFBlock(cond_dim, out_ch)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fuse1(self.conv1(x), y)
        h = self.fuse2(self.conv2(h), y)
        return self.shortcut(x) + h


class GBlock(nn.Module):
    """Decoder block: nearest upsample to ``size``, then a DF-fused residual pair of 3×3 convs."""

    def __init__(self, cond_dim: int, in_ch: int, out_ch: int, size: int):
        super().__init__()
        self.size = size
        self.c1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.c2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.fuse1 = DFBlock(cond_dim, in_ch)
        self.fuse2 = DFBlock(cond_dim, out_ch)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Legacy "nearest" (not nearest-exact) is architecture: 7->8 duplicates row/col 0, as trained.
        x = F.interpolate(x, size=(self.size, self.size), mode="nearest")
        h = self.c1(self.fuse1(x, y))
        h = self.c2(self.fuse2(h, y))
        return self.shortcut(x) + h


class DBlock(nn.Module):
    """Discriminator block on CLIP maps: x' + gamma·convs(x) [+ beta·next CLIP tap], gates start at 0."""

    def __init__(self, in_ch: int, out_ch: int, takes_clip_feature: bool):
        super().__init__()
        self.conv_r = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        )
        # The official code always builds conv_s but uses it only when in != out (1.18 M dead weights).
        self.conv_s = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.gamma = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.zeros(1)) if takes_clip_feature else None

    def forward(self, x: torch.Tensor, clip_feature: torch.Tensor | None = None) -> torch.Tensor:
        out = (x if self.conv_s is None else self.conv_s(x)) + self.gamma * self.conv_r(x)
        if self.beta is not None:
            out = out + self.beta * clip_feature
        return out
