"""The CLIP-empowered generator (paper §3.3; docs/official_code.md#generator-netg).

cond = [z; s]
bridge = BridgeFeaturePredictor(z, cond)                        # [B, width, grid, grid]
prompts = PromptPredictor(cond)                                  # one token per prompted block
seed = bridge + 0.1 · CLIP-ViT(bridge, prompts)                  # frozen CLIP as a mapper
image = ImageDecoder(seed, cond)                                 # conv, GBlocks up to CLIP's input size

How the blocks run (`Execution`) is a separate choice from what they compute: "fast" (the default) and
"official" (the official code's way) give the same images from the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from galip.clip import FrozenCLIP
from galip.models.layers import Conditioning, DFBlock, FusionBlock, GBlock, condition


class BridgeFeaturePredictor(nn.Module):
    """Noise -> (code_ch, grid, grid) -> text-fused residual blocks -> conv to CLIP width.

    The layout comes from the noise (the first Linear reads z alone); the text modulates channels through the
    fusion blocks.
    """

    def __init__(
        self,
        nz: int,
        cond_dim: int,
        grid: int,
        width: int,
        code_ch: int = 64,
        mid_ch: int = 32,
        n_blocks: int = 4,
    ):
        super().__init__()
        self.code_ch, self.grid = code_ch, grid
        self.fc_code = nn.Linear(nz, code_ch * grid * grid)
        self.blocks = nn.ModuleList(FusionBlock(code_ch, mid_ch, code_ch, cond_dim) for _ in range(n_blocks))
        self.conv_fuse = nn.Conv2d(code_ch, width, 5, 1, 2)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | Conditioning) -> torch.Tensor:
        x = self.fc_code(z).view(-1, self.code_ch, self.grid, self.grid)
        for block in self.blocks:
            x = block(x, cond)
        return self.conv_fuse(x)


class PromptPredictor(nn.Module):
    """One Linear from [z; s] to a prompt token for each prompted CLIP block."""

    def __init__(self, cond_dim: int, n_prompts: int, width: int):
        super().__init__()
        self.n_prompts, self.width = n_prompts, width
        self.fc_prompt = nn.Linear(cond_dim, n_prompts * width)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.fc_prompt(cond).view(-1, self.n_prompts, self.width)


def decoder_sizes(grid: int, image_size: int) -> list[int]:
    """Spatial size after each GBlock: powers of two from the one just above ``grid``, then ``image_size``.

    ViT-B/32 (grid 7, 224 px): 8, 16, 32, 64, 128, 224 — the official plan. Tiny (grid 8, 64 px): 8, 16, 32, 64.
    """
    size, sizes = 2 ** math.ceil(math.log2(grid)), []
    while size < image_size:
        sizes.append(size)
        size *= 2
    return [*sizes, image_size]


def decoder_channels(ngf: int, n_blocks: int, max_mult: int = 8) -> list[int]:
    """Channels before/after each block: ngf·8 capped, halving over the last blocks (512,…,256,128,64)."""
    return [ngf * min(2 ** (n_blocks - i), max_mult) for i in range(n_blocks + 1)]


class ImageDecoder(nn.Module):
    """Seed feature -> image: a 5×5 conv from CLIP width, GBlocks, then LeakyReLU + conv to RGB (no tanh).

    Two execution switches (set by `set_execution`), same values either way:

    - ``image_block_channels_last``: the last GBlock (the one that reaches the image size, the decoder's
      largest maps) runs on a channels_last copy of its input. On a CPU, oneDNN runs NCHW convs by
      reordering each map to its blocked layout and back; at 224 px those reorders of 100-200 MB maps, and
      the NCHW kernels themselves, cost more than channels_last's direct kernels.
    - ``rgb_channels_last``: the conv to RGB runs on channels_last maps (oneDNN's NCHW kernels for 3 output
      channels are slow, its backward most of all).

    The image comes back in the layout of the decoder's input; the gradient reaches the earlier blocks in
    theirs.
    """

    def __init__(self, cond_dim: int, width: int, grid: int, image_size: int, ngf: int = 64):
        super().__init__()
        self.image_block_channels_last = self.rgb_channels_last = True
        sizes = decoder_sizes(grid, image_size)
        chans = decoder_channels(ngf, len(sizes))
        self.stem = nn.Conv2d(width, chans[0], 5, 1, 2)
        self.blocks = nn.ModuleList(
            GBlock(cond_dim, c_in, c_out, size)
            for c_in, c_out, size in zip(chans[:-1], chans[1:], sizes, strict=True)
        )
        self.to_rgb = nn.Conv2d(chans[-1], 3, 3, 1, 1)

    def forward(self, seed: torch.Tensor, cond: torch.Tensor | Conditioning) -> torch.Tensor:
        x = self.stem(seed)
        nchw = not x.is_contiguous(memory_format=torch.channels_last)
        *blocks, image_block = self.blocks
        for block in blocks:
            x = block(x, cond)
        if self.image_block_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = image_block(x, cond)
        x = F.leaky_relu_(x, 0.2)  # in place on the last block's fresh sum, as the official code's to_rgb
        if self.rgb_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        image = self.to_rgb(x)
        return image.contiguous() if nchw else image


@dataclass(frozen=True)
class Execution:
    """How a generator runs its blocks: the same maths, the same weights, not part of the architecture.

    batched_affines: all Affine MLPs computed together (`layers.Conditioning`);
    fused_fusion: each DFBlock's elementwise steps as one op (`layers.DFBlock`);
    folded_upsample: each GBlock's upsample folded into its first conv (`layers.GBlock`);
    image_block_channels_last: the last GBlock, at the image size, in channels_last (`ImageDecoder`);
    rgb_channels_last: the conv to RGB in channels_last (`ImageDecoder`).

    ``Execution.of("fast")`` is all of them (the default), ``"official"`` none (the official code's way), a
    mapping picks them one by one (``model.generator.execution={fused_fusion: false}``).
    """

    batched_affines: bool = True
    fused_fusion: bool = True
    folded_upsample: bool = True
    image_block_channels_last: bool = True
    rgb_channels_last: bool = True

    @classmethod
    def of(cls, setting: str | Mapping[str, bool] | Execution) -> Execution:
        if isinstance(setting, Execution):
            return setting
        if isinstance(setting, Mapping):
            return cls(**setting)
        if setting == "fast":
            return cls()
        if setting == "official":
            return cls(**dict.fromkeys(asdict(cls()), False))
        raise ValueError(
            f"execution={setting!r}: expected 'fast', 'official' or a mapping of {list(asdict(cls()))}"
        )


# Per-lever keys of earlier releases, now fields of `Execution`.
EXECUTION_KEYS = tuple(asdict(Execution()))


class Generator(nn.Module):
    """Mate-G + frozen CLIP-ViT. ``clip`` is held by reference, never as a submodule.

    Args:
        clip: the shared frozen CLIP; its geometry sets every shape.
        nz: noise size (paper 100).
        ngf: decoder base channels (paper 64).
        code_ch, mid_ch, n_fusion_blocks: the bridge feature predictor's sizes (paper 64, 32, 4).
        prompt_blocks: 0-based CLIP blocks that get a predicted prompt (paper 1..8).
        use_clip_mapper: False drops the CLIP branch (ablation "w/o CLIP in G"): seed = bridge.
        mapped_scale: weight of the CLIP-mapped feature added to the bridge feature (paper 0.1).
        image_size: side of the images G draws; ``None`` = CLIP's input size (the paper). A CLIP that reads
            a smaller image (e.g. 32 px of a 64-px world) sees G's output through `FrozenCLIP.preprocess`'s
            antialiased resize, for D and for the CLIP term alike.
        execution: how the blocks run (`Execution`: "fast", "official" or per lever); not stored in ``config``.
    """

    REMOVED_KEYS = (*EXECUTION_KEYS, "code_input")  # earlier releases' keys, answered by `_refuse_removed`

    def __init__(
        self,
        clip: FrozenCLIP,
        nz: int = 100,
        ngf: int = 64,
        code_ch: int = 64,
        mid_ch: int = 32,
        n_fusion_blocks: int = 4,
        prompt_blocks: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8),
        use_clip_mapper: bool = True,
        mapped_scale: float = 0.1,
        image_size: int | None = None,
        execution: str | Mapping[str, bool] | Execution = "fast",
        **removed,
    ):
        super().__init__()
        _refuse_removed(removed)
        geo = clip.geometry
        _check_blocks("prompt_blocks", prompt_blocks, geo.depth)
        # Constructor arguments (without the CLIP): enough to rebuild this generator around a CLIP.
        self.config = {
            "nz": nz,
            "ngf": ngf,
            "code_ch": code_ch,
            "mid_ch": mid_ch,
            "n_fusion_blocks": n_fusion_blocks,
            "prompt_blocks": list(prompt_blocks),
            "use_clip_mapper": use_clip_mapper,
            "mapped_scale": mapped_scale,
            "image_size": image_size,
        }
        self._clip = (clip,)  # a tuple hides it from nn.Module registration
        self.nz, self.mapped_scale, self.use_clip_mapper = nz, mapped_scale, use_clip_mapper
        self.prompt_blocks = tuple(prompt_blocks) if use_clip_mapper else ()
        cond_dim = nz + geo.embed_dim
        self.bridge = BridgeFeaturePredictor(
            nz, cond_dim, geo.grid, geo.width, code_ch, mid_ch, n_fusion_blocks
        )
        self.prompts = (
            PromptPredictor(cond_dim, len(self.prompt_blocks), geo.width) if self.prompt_blocks else None
        )
        self.image_size = image_size or geo.image_size
        self.decoder = ImageDecoder(cond_dim, geo.width, geo.grid, self.image_size, ngf)
        set_execution(self, execution)

    @property
    def clip(self) -> FrozenCLIP:
        return self._clip[0]

    def forward(self, z: torch.Tensor, sent_emb: torch.Tensor) -> torch.Tensor:
        """Noise [B, nz] + sentence vector [B, embed_dim] -> image [B, 3, S, S] (S = ``image_size``), roughly
        in [-1, 1]."""
        cond = torch.cat([z, sent_emb.to(z.dtype)], dim=1)
        y = condition(self, cond, self.execution.batched_affines)  # every Affine's (γ, β), or cond itself
        seed = self.bridge(z, y)
        if self.use_clip_mapper:
            prompts = self.prompts(cond) if self.prompts is not None else None
            seed = seed + self.mapped_scale * self.clip.map_bridge(seed, prompts, self.prompt_blocks)
        return self.decoder(seed, y)


def set_execution(
    generator: nn.Module, execution: str | Mapping[str, bool] | Execution = "fast"
) -> nn.Module:
    """Choose how a generator runs its blocks (same maths either way; see `Execution`)."""
    generator.execution = execution = Execution.of(execution)
    for module in generator.modules():
        if isinstance(module, DFBlock):
            module.fused = execution.fused_fusion
        elif isinstance(module, GBlock):
            module.folded = execution.folded_upsample
        elif isinstance(module, ImageDecoder):
            module.image_block_channels_last = execution.image_block_channels_last
            module.rgb_channels_last = execution.rgb_channels_last
    return generator


def _refuse_removed(removed: Mapping) -> None:
    """Keys of earlier releases: one line naming what replaced each."""
    if not removed:
        return
    levers = sorted(set(removed) & set(EXECUTION_KEYS))
    if levers:
        raise TypeError(
            f"Generator: {levers} are now fields of one setting, execution: 'fast' | 'official' | "
            f"{{{levers[0]}: {removed[levers[0]]}, …}} (model.generator.execution)"
        )
    if removed.get("code_input", "noise") == "noise" and set(removed) == {"code_input"}:
        return  # exports and configs of earlier releases say the paper's value: nothing to do
    if "code_input" in removed:
        raise TypeError(
            "Generator: code_input='condition' was removed (it measured no gain); the bridge reads z"
        )
    raise TypeError(f"Generator got unexpected arguments {sorted(removed)}")


def _check_blocks(key: str, blocks: Sequence[int], depth: int) -> None:
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(
            f"{key}={list(blocks)}: {bad} outside the CLIP's {depth} blocks (0-based 0..{depth - 1})"
        )
