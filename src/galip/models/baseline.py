"""The ablation baseline of the paper's Table 3: DF-GAN-style CNN generator and discriminator.

Both networks see the frozen CLIP only through its sentence vectors (the CLIP text encoder replaces
DF-GAN's own); neither runs the CLIP-ViT. D reads pixels, not CLIP taps (``model.d_input: pixels``).

    image = to_rgb(GBlocks(Linear(z) as a 4×4 map, cond=[z; s]))             # CNNGenerator
    logit = QualityAssessor(DownBlocks(conv(pixels)), s)                     # CNNDiscriminator

The decoder blocks and the logit head are GALIP's own (``GBlock``, ``QualityAssessor``), so the rows of
Table 3 differ in the components the paper adds, not in incidental layer choices.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from galip.clip import FrozenCLIP
from galip.models.discriminator import QualityAssessor
from galip.models.generator import Execution, decoder_channels, decoder_sizes, set_execution
from galip.models.layers import GBlock, condition

# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------

# Keys of a GALIP generator config that a CNN generator has no use for. An ablation row swaps the
# generator's `_target_` under whatever sizes an experiment set, and config merging cannot delete keys.
GALIP_ONLY_KEYS = frozenset(
    {"code_ch", "mid_ch", "n_fusion_blocks", "prompt_blocks", "use_clip_mapper", "mapped_scale"}
)


class CNNGenerator(nn.Module):
    """DF-GAN's generator: noise -> 4×4 map -> text-fused GBlocks up to ``image_size`` (CLIP's input size
    unless set) -> tanh.

    Holds the frozen CLIP by reference (for its geometry and so samplers find ``generator.clip``).
    """

    def __init__(
        self, clip: FrozenCLIP, nz: int = 100, ngf: int = 64, start: int = 4, image_size: int | None = None
    ):
        super().__init__()
        geo = clip.geometry
        self.config = {"nz": nz, "ngf": ngf, "start": start, "image_size": image_size}
        self._clip = (clip,)  # a tuple hides it from nn.Module registration
        self.nz, self.start = nz, start
        self.image_size = image_size or geo.image_size  # None: CLIP's input size, as GALIP's G
        sizes = decoder_sizes(start, self.image_size)
        chans = decoder_channels(ngf, len(sizes))
        cond_dim = nz + geo.embed_dim
        self.fc = nn.Linear(nz, chans[0] * start * start)
        self.blocks = nn.ModuleList(
            GBlock(cond_dim, c_in, c_out, size)
            for c_in, c_out, size in zip(chans[:-1], chans[1:], sizes, strict=True)
        )
        self.to_rgb = nn.Conv2d(chans[-1], 3, 3, 1, 1)
        self.execution = Execution()  # how its blocks run, see galip.models.generator.set_execution

    @property
    def clip(self) -> FrozenCLIP:
        return self._clip[0]

    def forward(self, z: torch.Tensor, sent_emb: torch.Tensor) -> torch.Tensor:
        """Noise [B, nz] + sentence vector [B, embed_dim] -> image [B, 3, S, S] in [-1, 1]."""
        cond = torch.cat([z, sent_emb.to(z.dtype)], dim=1)
        x = self.fc(z).view(z.shape[0], -1, self.start, self.start)
        y = condition(self, cond, self.execution.batched_affines)
        for block in self.blocks:
            x = block(x, y)
        return torch.tanh(self.to_rgb(F.leaky_relu(x, 0.2)))


def cnn_generator(
    clip: FrozenCLIP,
    nz: int = 100,
    ngf: int = 64,
    image_size: int | None = None,
    execution: str | Mapping[str, bool] | Execution = "fast",
    **galip_only,
) -> CNNGenerator:
    """Hydra target of the baseline row: a ``CNNGenerator`` from a (merged) GALIP generator config.

    The GALIP-only keys left behind by the experiment are dropped; anything else is a typo and fails.
    """
    unknown = sorted(set(galip_only) - GALIP_ONLY_KEYS)
    if unknown:
        raise TypeError(f"cnn_generator got unexpected keys {unknown}")
    return set_execution(CNNGenerator(clip, nz=nz, ngf=ngf, image_size=image_size), execution)


# ---------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    """DF-GAN's D block: a 4×4 stride-2 conv pair on the residual, 1×1 conv + avg-pool on the shortcut.

    The residual enters through a learnable scalar gate initialised at 0, as in Mate-D's ``DBlock``.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv_r = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.conv_s = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = F.avg_pool2d(self.conv_s(x), 2)
        return shortcut + self.gamma * self.conv_r(x)


def down_sizes(image_size: int, final_max: int = 7) -> list[int]:
    """Map sizes after each DownBlock: halve until at most ``final_max`` (64 -> 32,16,8,4; 224 -> …,14,7)."""
    sizes, size = [], image_size
    while size > final_max:
        size //= 2
        sizes.append(size)
    return sizes


class CNNDiscriminator(nn.Module):
    """DF-GAN's discriminator on pixels, with GALIP's quality assessor as the text-conditioned head.

    Args:
        image_size: side of the images D judges (CLIP's input size, which is G's output size).
        embed_dim: sentence vector size.
        ndf: channels of the first conv (DF-GAN 64); doubled per block up to ``out_ch``.
        out_ch: channels of the final map (the Mate-D key of the same name).
        hidden: hidden channels of the quality assessor.
    """

    def __init__(self, image_size: int, embed_dim: int, ndf: int = 64, out_ch: int = 512, hidden: int = 128):
        super().__init__()
        sizes = down_sizes(image_size)
        chans = [min(ndf * 2**i, out_ch) for i in range(len(sizes))] + [out_ch]
        self.conv_img = nn.Conv2d(3, chans[0], 3, 1, 1)
        self.blocks = nn.Sequential(
            *(DownBlock(c_in, c_out) for c_in, c_out in zip(chans[:-1], chans[1:], strict=True))
        )
        self.assessor = QualityAssessor(out_ch, embed_dim, sizes[-1] if sizes else image_size, hidden)

    def forward(self, image: torch.Tensor, sent_emb: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, S, S] + sentence vector [B, D] -> logits [B]."""
        return self.assess(self.features(image), sent_emb)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.conv_img(image))

    def assess(self, features: torch.Tensor, sent_emb: torch.Tensor) -> torch.Tensor:
        return self.assessor(features, sent_emb)
