"""G side: the frozen CLIP ViT as a feature mapper driven by text-conditioned prompts (paper §3.3).

The bridge feature takes the place of the patch embeddings (``conv1`` is skipped). Each prompted block
sees its own prompt token appended at the end of the sequence; the token is removed after that block,
so a prompt lives for exactly one block, as in the official code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from galip.clip.blocks import run_block
from galip.clip.taps import add_cls_and_positions, tokens_to_map


def map_bridge(
    visual: nn.Module, bridge: torch.Tensor, prompts: torch.Tensor | None, prompt_blocks: Sequence[int]
) -> torch.Tensor:
    """[B, width, grid, grid] bridge feature (+ prompts [B, n_prompts, width]) -> mapped [B, width, grid, grid]."""
    slot = {block: i for i, block in enumerate(prompt_blocks)}
    x = add_cls_and_positions(visual, rearrange(bridge, "b c h w -> b (h w) c"))
    for i, block in enumerate(visual.transformer.resblocks):
        if i in slot:
            prompt = prompts[:, slot[i]].to(x.dtype)
            x = run_block(block, torch.cat([x, prompt[:, None]], dim=1))[:, :-1]
        else:
            x = run_block(block, x)
    return tokens_to_map(x)
