"""D side: run a CLIP-normalised image through the frozen ViT and tap the patch tokens of some blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from galip.clip.blocks import run_block


def embed_patches(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Patch conv -> tokens, CLS prepended, positions added, ``ln_pre``: [B, 1 + grid², width]."""
    x = rearrange(visual.conv1(pixels), "b c h w -> b (h w) c")
    return add_cls_and_positions(visual, x)


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
