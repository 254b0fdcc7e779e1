"""Differentiable augmentation of what D and the CLIP term see (DiffAugment, Zhao et al. 2020; not in GALIP).

A frozen CLIP can be satisfied by patterns that are not the captioned object: on the shapes world, G's own
CLIP ranks the captioned shape first for 0.66 of G's samples while an independent judge finds the shapes at
chance (experiments/demo.md). Shifting every image D and the CLIP term see by a random offset, reals and
fakes alike, makes such patterns harder to keep: they must work wherever they land. The augmentation is
differentiable, so G's gradients pass through it.

Only translation: colour, flips and cutout would change what the caption says (colours, left/right, which
objects are there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def translate(image: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by its own integer offset in [-fraction·size, fraction·size] along each axis.

    Pixels shifted in come from the border (replicate padding), so a uniform background stays uniform.
    ``fraction=0`` returns ``image`` itself. Offsets are drawn on ``generator``'s device (the caller's RNG
    stream, so they are reproducible and resumable).
    """
    if fraction <= 0:
        return image
    b, _, h, w = image.shape
    pad = max(1, round(fraction * max(h, w)))
    device = generator.device if generator is not None else image.device
    shifts = torch.randint(-pad, pad + 1, (2, b, 1), device=device, generator=generator).to(image.device)
    padded = F.pad(image, (pad, pad, pad, pad), mode="replicate")
    rows = torch.arange(h, device=image.device) + pad - shifts[0]  # [B, H]: source row of each output row
    cols = torch.arange(w, device=image.device) + pad - shifts[1]  # [B, W]
    batch = torch.arange(b, device=image.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
