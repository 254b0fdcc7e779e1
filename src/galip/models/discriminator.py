"""The CLIP-based discriminator (paper §3.2; docs/official_code.md#discriminator-netd-and-netc).

D(x, s) = QualityAssessor(CLIPFeatureExtractor(CLIP taps of x), s). The frozen CLIP taps are computed
outside (``FrozenCLIP.image_taps``) so the training step can reuse them and choose where gradients flow.
"""

from __future__ import annotations

import torch
from torch import nn

from galip.models.layers import DBlock


class CLIPFeatureExtractor(nn.Module):
    """Mate-D's CLIP-FE: residual conv blocks over the first tap, adding each later tap through a gate."""

    def __init__(self, width: int, n_taps: int, out_ch: int = 512):
        super().__init__()
        self.blocks = nn.ModuleList(DBlock(width, width, takes_clip_feature=True) for _ in range(n_taps - 1))
        self.main = DBlock(width, out_ch, takes_clip_feature=False)

    def forward(
        self, taps: torch.Tensor, memory_format: torch.memory_format = torch.preserve_format
    ) -> torch.Tensor:
        """[B, n_taps, width, g, g] -> [B, out_ch, g, g], its convs run in ``memory_format``."""
        out = taps[:, 0].to(memory_format=memory_format)
        for i, block in enumerate(self.blocks):
            out = block(out, taps[:, i + 1].to(memory_format=memory_format))
        return self.main(out)


class QualityAssessor(nn.Module):
    """Mate-D's QA: sentence vector tiled over the grid, concatenated, two 4×4-ish convs -> one logit."""

    def __init__(self, in_ch: int = 512, cond_dim: int = 512, grid: int = 7, hidden: int = 128):
        super().__init__()
        k1 = min(4, grid)
        k2 = grid - k1 + 1  # so the second conv reduces the map to 1×1 (4 and 4 at grid 7)
        self.joint_conv = nn.Sequential(
            nn.Conv2d(in_ch + cond_dim, hidden, k1, 1, 0, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(hidden, 1, k2, 1, 0, bias=False),
        )

    def forward(self, feats: torch.Tensor, sent_emb: torch.Tensor) -> torch.Tensor:
        """[B, C, g, g] + [B, D] -> logits [B]."""
        s = sent_emb.to(feats.dtype)[:, :, None, None].expand(-1, -1, *feats.shape[-2:])
        return self.joint_conv(torch.cat([feats, s], dim=1)).flatten()


class Discriminator(nn.Module):
    """Mate-D: the learnable part of GALIP's discriminator (the frozen CLIP stays outside).

    ``channels_last`` is an execution choice (same values and gradients, same weights): D's convs run on
    channels_last maps, where oneDNN's kernels for these small 7×7 maps are faster than the NCHW ones
    (experiments/benchmarks.md). False runs them as the official code does.
    """

    def __init__(
        self,
        width: int,
        grid: int,
        embed_dim: int,
        n_taps: int = 3,
        out_ch: int = 512,
        hidden: int = 128,
        channels_last: bool = True,
    ):
        super().__init__()
        self.extractor = CLIPFeatureExtractor(width, n_taps, out_ch)
        self.assessor = QualityAssessor(out_ch, embed_dim, grid, hidden)
        self.channels_last = channels_last

    def forward(self, taps: torch.Tensor, sent_emb: torch.Tensor) -> torch.Tensor:
        return self.assess(self.features(taps), sent_emb)

    # D(x, s) = assess(features(x), s): real and mismatched pairs share one feature pass (as officially).
    def features(self, taps: torch.Tensor) -> torch.Tensor:
        return self.extractor(taps, torch.channels_last if self.channels_last else torch.preserve_format)

    def assess(self, features: torch.Tensor, sent_emb: torch.Tensor) -> torch.Tensor:
        return self.assessor(features, sent_emb)
