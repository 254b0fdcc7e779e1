"""D side: run a CLIP-normalised image through the frozen ViT and tap the patch tokens of some blocks.

The ViT's patch embedding is a convolution whose stride is its kernel (32 for ViT-B/32): each token is one
patch's pixels times a [width, 3·32·32] matrix. `patch_tokens` runs it as that GEMM on the image cut into
patches (`frozen_linear`). Same maths up to float summation order; on a CPU oneDNN's convolution computes
the gradient to the pixels (the G step's path to the fakes) at a small fraction of its GEMM rate (B=8 at
224 px: ~75-150 ms against ~10 ms for the GEMM). ``set_patch_gemm(False)`` (benchmarks/speed.py without
the lever ``patch_gemm``) keeps the convolution, as the official code runs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from galip.clip.blocks import frozen_linear, run_block

_PATCH_GEMM = True


def set_patch_gemm(enabled: bool) -> None:
    """Process-wide: False makes `patch_tokens` run the patch convolution itself."""
    global _PATCH_GEMM
    _PATCH_GEMM = enabled


def embed_patches(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Patch conv -> tokens, CLS prepended, positions added, ``ln_pre``: [B, 1 + grid², width]."""
    return add_cls_and_positions(visual, patch_tokens(visual.conv1, pixels))


def patch_tokens(conv: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``conv(pixels)`` as tokens [B, grid², width] (row-major over the grid); a patchifying conv as a GEMM."""
    if not (_PATCH_GEMM and _patchifies(conv, pixels)):
        return rearrange(conv(pixels), "b c h w -> b (h w) c")
    ph, pw = conv.kernel_size
    patches = rearrange(pixels, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=ph, pw=pw)  # the weight's order
    return frozen_linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)


def _patchifies(conv: nn.Module, pixels: torch.Tensor) -> bool:
    """A plain Conv2d that cuts the image into whole, non-overlapping patches."""
    return (
        type(conv) is nn.Conv2d
        and conv.stride == conv.kernel_size
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and pixels.dim() == 4
        and pixels.shape[-2] % conv.kernel_size[0] == 0
        and pixels.shape[-1] % conv.kernel_size[1] == 0
    )


def add_cls_and_positions(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    cls = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
    x = torch.cat([cls, tokens], dim=1) + visual.positional_embedding.to(tokens.dtype)
    return visual.ln_pre(x)


def tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """Drop CLS and lay the patch tokens out on the grid: token t -> (t // grid, t % grid)."""
    grid = int(round((x.shape[1] - 1) ** 0.5))
    return rearrange(x[:, 1:], "b (h w) c -> b c h w", h=grid, w=grid)


def image_taps(
    visual: nn.Module, pixels: torch.Tensor, blocks: Sequence[int], with_embedding: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stacked tap maps [B, n_taps, width, grid, grid] (in ``blocks`` order) and the image embedding.

    Without the embedding, blocks after the last tap are not run (they would be wasted work).
    """
    wanted = {b: i for i, b in enumerate(blocks)}
    resblocks = visual.transformer.resblocks
    last = len(resblocks) - 1 if with_embedding else max(blocks)
    x = embed_patches(visual, pixels)
    maps: list[torch.Tensor | None] = [None] * len(blocks)
    for i in range(last + 1):
        x = run_block(resblocks[i], x)
        if i in wanted:
            maps[wanted[i]] = tokens_to_map(x)
    embedding = image_embedding(visual, x) if with_embedding else None
    return torch.stack(maps, dim=1), embedding


def image_embedding(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``ln_post`` of the CLS token after the last block, projected: the (unnormalised) image embedding."""
    pooled = visual.ln_post(x[:, 0])
    return pooled @ visual.proj if visual.proj is not None else pooled
