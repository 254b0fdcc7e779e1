"""Building blocks shared by the generator and the discriminator (docs/official_code.md#building-blocks).

Text conditioning is DF-GAN's deep fusion: every ``Affine`` predicts a per-channel scale and shift
from the condition vector ``[z; s]``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

LEAKY_SLOPE = 0.2


def _mlp(cond_dim: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            linear1=nn.Linear(cond_dim, channels),
            relu1=nn.ReLU(inplace=True),
            linear2=nn.Linear(channels, channels),
        )
    )


# ---------------------------------------------------------------------------------------------
# Text-conditioned affines
# ---------------------------------------------------------------------------------------------


class Affine(nn.Module):
    """x * gamma(y) + beta(y), channel-wise; identity at initialisation.

    ``y`` is the condition vector [B, cond_dim], or a `Conditioning` that already holds this Affine's
    gamma and beta (computed together with all the other Affines of the network).
    """

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.fc_gamma = _mlp(cond_dim, channels)
        self.fc_beta = _mlp(cond_dim, channels)
        nn.init.zeros_(self.fc_gamma.linear2.weight)
        nn.init.ones_(self.fc_gamma.linear2.bias)
        nn.init.zeros_(self.fc_beta.linear2.weight)
        nn.init.zeros_(self.fc_beta.linear2.bias)

    def scale_shift(self, y: torch.Tensor | Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma, beta), each [B, C, 1, 1]."""
        if isinstance(y, Conditioning):
            return y.scale_shift(self)
        return self.fc_gamma(y)[:, :, None, None], self.fc_beta(y)[:, :, None, None]

    def forward(self, x: torch.Tensor, y: torch.Tensor | Conditioning) -> torch.Tensor:
        gamma, beta = self.scale_shift(y)
        return gamma * x + beta


class Conditioning:
    """The condition vector ``[z; s]`` and the (gamma, beta) of every Affine of a network, computed at once.

    Every Affine MLP reads the same vector, so instead of two small Linear pairs per Affine (160 Linears in
    the paper's G) the first layers run as one matmul and the second layers as one batched matmul per
    channel count. Same maths as the per-Affine MLPs up to float summation order; the parameters (and
    their state-dict keys) stay the Affines' own.
    """

    def __init__(self, affines: Sequence[Affine], cond: torch.Tensor):
        self.cond = cond
        mlps = [mlp for affine in affines for mlp in (affine.fc_gamma, affine.fc_beta)]
        w1 = torch.cat([m.linear1.weight for m in mlps])
        b1 = torch.cat([m.linear1.bias for m in mlps])
        hidden = F.relu(F.linear(cond, w1, b1)).split([m.linear1.out_features for m in mlps], dim=1)
        out: list[torch.Tensor] = [cond] * len(mlps)
        for idx in _indices_by_width(mlps):
            w2 = torch.stack([mlps[i].linear2.weight for i in idx])  # [n, C, C]
            b2 = torch.stack([mlps[i].linear2.bias for i in idx])[:, None]  # [n, 1, C]
            y = torch.baddbmm(b2, torch.stack([hidden[i] for i in idx]), w2.transpose(1, 2))
            for j, i in enumerate(idx):
                out[i] = y[j][:, :, None, None]
        self._params = {id(a): (out[2 * k], out[2 * k + 1]) for k, a in enumerate(affines)}

    def scale_shift(self, affine: Affine) -> tuple[torch.Tensor, torch.Tensor]:
        return self._params[id(affine)]


def _indices_by_width(mlps: Sequence[nn.Module]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, mlp in enumerate(mlps):
        groups.setdefault(mlp.linear2.out_features, []).append(i)
    return list(groups.values())


def condition(network: nn.Module, cond: torch.Tensor, batched: bool) -> torch.Tensor | Conditioning:
    """What a network's blocks receive as ``y``: ``cond`` itself, or all its Affines' outputs at once."""
    affines = [m for m in network.modules() if isinstance(m, Affine)] if batched else []
    return Conditioning(affines, cond) if affines else cond


# ---------------------------------------------------------------------------------------------
# Deep fusion
# ---------------------------------------------------------------------------------------------


class _DeepFusion(torch.autograd.Function):
    """leaky(γ1 · leaky(γ0 · x + β0) + β1) in two in-place passes, saving three maps instead of four.

    The plain form allocates a fresh map for each of its six elementwise ops (on a CPU a new 100 MB map
    costs more in page faults than in arithmetic); this allocates two in the forward, four in the backward.
    """

    @staticmethod
    def forward(ctx, x, g0, b0, g1, b1):
        a0 = F.leaky_relu_(torch.addcmul(b0, g0, x), LEAKY_SLOPE)
        y = F.leaky_relu_(torch.addcmul(b1, g1, a0), LEAKY_SLOPE)
        ctx.save_for_backward(x, a0, y, g0, g1)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, a0, y, g0, g1 = ctx.saved_tensors
        # A LeakyReLU with a positive slope keeps the sign, so its output tells where its input was > 0.
        grad_h1 = torch.ops.aten.leaky_relu_backward(grad_y, y, LEAKY_SLOPE, True)
        scratch = grad_h1 * a0
        grad_g1, grad_b1 = _channel_sums(scratch, grad_h1)
        grad_h0 = torch.ops.aten.leaky_relu_backward(grad_h1.mul_(g1), a0, LEAKY_SLOPE, True)
        del grad_h1
        grad_g0, grad_b0 = _channel_sums(torch.mul(grad_h0, x, out=scratch), grad_h0)
        return grad_h0.mul_(g0), grad_g0, grad_b0, grad_g1, grad_b1


def _channel_sums(*maps: torch.Tensor) -> list[torch.Tensor]:
    return [m.sum((2, 3), keepdim=True) for m in maps]


class DFBlock(nn.Module):
    """Deep fusion: two text-conditioned affines, each followed by LeakyReLU(0.2).

    ``fused`` (the default) runs the four elementwise steps as one autograd op (`_DeepFusion`); False runs
    them as four PyTorch ops, as the official code does. Both give the same values and gradients.
    """

    def __init__(self, cond_dim: int, channels: int, fused: bool = True):
        super().__init__()
        self.affine0 = Affine(cond_dim, channels)
        self.affine1 = Affine(cond_dim, channels)
        self.fused = fused

    def forward(self, x: torch.Tensor, y: torch.Tensor | Conditioning) -> torch.Tensor:
        if (
            not self.fused
        ):  # in place on each affine's fresh output, as the official code's LeakyReLU(inplace=True)
            x = F.leaky_relu_(self.affine0(x, y), LEAKY_SLOPE)
            return F.leaky_relu_(self.affine1(x, y), LEAKY_SLOPE)
        (g0, b0), (g1, b1) = self.affine0.scale_shift(y), self.affine1.scale_shift(y)
        return _DeepFusion.apply(x, *(t.to(x.dtype) for t in (g0, b0, g1, b1)))


class FusionBlock(nn.Module):
    """Residual conv -> DF -> conv -> DF block of the bridge feature predictor (official ``M_Block``)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, cond_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, 1, 1)
        self.fuse1 = DFBlock(cond_dim, mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1)
        self.fuse2 = DFBlock(cond_dim, out_ch)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor | Conditioning) -> torch.Tensor:
        h = self.fuse1(self.conv1(x), y)
        h = self.fuse2(self.conv2(h), y)
        return self.shortcut(x) + h


def resize_nearest(x: torch.Tensor, size: int) -> torch.Tensor:
    """Legacy "nearest" resize to size × size (not nearest-exact: 7->8 duplicates row/col 0, as trained)."""
    return F.interpolate(x, size=(size, size), mode="nearest")


def _fold_taps(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The 3 taps along ``dim`` of a padded 3-wide conv seen through a 2× nearest upsample, as the 4 taps of
    a stride-2 transposed conv: output 2i reads inputs (i-1, i) with (w0, w1+w2), output 2i+1 reads (i, i+1)
    with (w0+w1, w2); transposed-conv tap k feeds output 2i+k-1, so the taps are (w2, w1+w2, w0+w1, w0)."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack((w2, w1 + w2, w0 + w1, w0), dim)


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(resize_nearest(x, 2H), weight, bias, padding=1)`` without making the upsampled map.

    One stride-2 transposed conv with a 4×4 kernel folded from the 3×3 one (`_fold_taps`): 16 instead of
    36 multiply-adds per input pixel and channel pair, and the saved input is the small map. Same function
    up to float summation order; the gradient reaches ``weight`` through the fold.
    """
    kernel = _fold_taps(_fold_taps(weight, 2), 3).transpose(0, 1).contiguous()  # [in, out, 4, 4]
    if x.is_contiguous(memory_format=torch.channels_last):
        kernel = kernel.to(memory_format=torch.channels_last)
    return F.conv_transpose2d(x, kernel, bias, stride=2, padding=1)


class GBlock(nn.Module):
    """Decoder block: nearest upsample to ``size``, then a DF-fused residual pair of 3×3 convs.

    ``folded`` (the default) runs the same function with the upsample moved inside: fuse1 and the 1×1
    shortcut act per pixel, so they commute with a nearest resize and run on the small input; for an exact
    2× step, c1 of the upsampled map is one transposed conv on the small map (`upsample2x_conv3x3`).
    False runs it as the official code does (upsample first, everything at the output size).
    """

    def __init__(self, cond_dim: int, in_ch: int, out_ch: int, size: int, folded: bool = True):
        super().__init__()
        self.size = size
        self.c1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.c2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.fuse1 = DFBlock(cond_dim, in_ch)
        self.fuse2 = DFBlock(cond_dim, out_ch)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.folded = folded

    def forward(self, x: torch.Tensor, y: torch.Tensor | Conditioning) -> torch.Tensor:
        if not self.folded:
            x = resize_nearest(x, self.size)
            h = self.c1(self.fuse1(x, y))
            h = self.c2(self.fuse2(h, y))
            return self.shortcut(x) + h
        h = self.fuse1(x, y)
        if x.shape[-2:] == (self.size // 2, self.size // 2) and self.size % 2 == 0:
            h = upsample2x_conv3x3(h, self.c1.weight, self.c1.bias)
        else:
            h = self.c1(self._resize(h))
        h = self.c2(self.fuse2(h, y))
        return h.add_(self._resize(self.shortcut(x)))  # c2's output is saved by no backward: add in place

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.shape[-2:] == (self.size, self.size) else resize_nearest(x, self.size)


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
