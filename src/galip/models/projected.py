"""The "CCM&CSM" row of the paper's Table 3: Projected-GAN-style mixing of the CLIP taps instead of CLIP-FE.

Projected GAN (Sauer et al., 2021) feeds a frozen feature network's multi-scale features to several small
discriminators, after two *fixed random* mixings: cross-channel mixing (CCM, a random 1×1 conv per scale)
and cross-scale mixing (CSM, a top-down feature pyramid of random convs). GALIP's ablation puts the same
head on the frozen CLIP-ViT taps. The taps of a ViT all share one patch grid, so the "scales" here are
depths and the pyramid needs no resampling.

    m_k = CCM_k(tap_k)                          # fixed
    p_K = CSM_K(m_K);  p_k = CSM_k(m_k + p_{k+1})   # fixed, deepest first
    D(taps, s) = Σ_k QualityAssessor_k(DBlock_k(p_k), s)   # learned, one head per level
"""

from __future__ import annotations

import torch
from torch import nn

from galip.models.discriminator import QualityAssessor
from galip.models.layers import DBlock


def _fixed(module: nn.Module) -> nn.Module:
    """Random and never trained (Projected GAN's random projections); kept in the state dict for resume."""
    return module.requires_grad_(False)


class CrossChannelMixing(nn.Module):
    """CCM: one fixed random 1×1 conv per tap, width -> channels."""

    def __init__(self, width: int, n_taps: int, channels: int):
        super().__init__()
        self.convs = _fixed(nn.ModuleList(nn.Conv2d(width, channels, 1) for _ in range(n_taps)))

    def forward(self, taps: torch.Tensor) -> list[torch.Tensor]:
        """[B, n_taps, width, g, g] -> n_taps maps [B, channels, g, g]."""
        return [conv(taps[:, k]) for k, conv in enumerate(self.convs)]


class CrossScaleMixing(nn.Module):
    """CSM: a top-down pyramid of fixed random 3×3 convs; each level also sees every deeper level."""

    def __init__(self, channels: int, n_levels: int):
        super().__init__()
        self.convs = _fixed(nn.ModuleList(nn.Conv2d(channels, channels, 3, 1, 1) for _ in range(n_levels)))

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [None] * len(levels)  # type: ignore[list-item]
        deeper = torch.zeros_like(levels[-1])
        for k in reversed(range(len(levels))):
            deeper = self.convs[k](levels[k] + deeper)
            out[k] = deeper
        return out


class ProjectedDiscriminator(nn.Module):
    """CLIP taps -> CCM -> CSM (both fixed) -> one learned head per level; the logits are summed.

    Same constructor keys as ``Discriminator`` (Mate-D), so the ablation row only swaps ``_target_``.

    Args:
        width, grid, embed_dim: CLIP geometry.
        n_taps: number of CLIP taps (= pyramid levels).
        out_ch, hidden: channels of each head's conv block and quality assessor (as in Mate-D).
        ccm_ch: channels after CCM; ``None`` keeps the CLIP width.
    """

    def __init__(
        self,
        width: int,
        grid: int,
        embed_dim: int,
        n_taps: int = 3,
        out_ch: int = 512,
        hidden: int = 128,
        ccm_ch: int | None = None,
    ):
        super().__init__()
        ccm_ch = ccm_ch or width
        self.ccm = CrossChannelMixing(width, n_taps, ccm_ch)
        self.csm = CrossScaleMixing(ccm_ch, n_taps)
        self.blocks = nn.ModuleList(DBlock(ccm_ch, out_ch, takes_clip_feature=False) for _ in range(n_taps))
        self.assessors = nn.ModuleList(
            QualityAssessor(out_ch, embed_dim, grid, hidden) for _ in range(n_taps)
        )

    def forward(self, taps: torch.Tensor, sent_emb: torch.Tensor) -> torch.Tensor:
        """[B, n_taps, width, g, g] + [B, D] -> logits [B]."""
        return self.assess(self.features(taps), sent_emb)

    def features(self, taps: torch.Tensor) -> list[torch.Tensor]:
        """One map per level: the learned conv block on the fixed CCM + CSM projection."""
        return [block(p) for p, block in zip(self.csm(self.ccm(taps)), self.blocks, strict=True)]

    def assess(self, features: list[torch.Tensor], sent_emb: torch.Tensor) -> torch.Tensor:
        logits = [qa(f, sent_emb) for f, qa in zip(features, self.assessors, strict=True)]
        return torch.stack(logits).sum(0)
