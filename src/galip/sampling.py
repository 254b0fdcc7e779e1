"""Sampling from a generator export: prompts -> images, deterministic for a seed, batch-size independent."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.utils import save_image

from galip.checkpoints import build_generator
from galip.models import Generator


class Sampler:
    """``Sampler.from_export(path).generate(["a red circle"], n=8, seed=0)`` -> [8, 3, H, W] in [-1, 1]."""

    def __init__(self, generator: Generator, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.generator = generator.to(self.device)
        self.generator.clip.to(self.device)

    @classmethod
    def from_export(cls, path: str | Path, device: str | torch.device = "cpu", **clip_overrides) -> Sampler:
        return cls(build_generator(path, **clip_overrides), device)

    @property
    def clip(self):
        return self.generator.clip

    def sentence_vectors(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.clip.encode_text(self.clip.tokenize(list(prompts)).to(self.device))

    def noise(self, count: int, seed: int) -> torch.Tensor:
        """All noise is drawn up front on the CPU, so results do not depend on the batch size or device."""
        return torch.randn(count, self.generator.nz, generator=torch.Generator().manual_seed(seed))

    @torch.inference_mode()
    def from_vectors(self, sent: torch.Tensor, noise: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images for matching rows of sentence vectors and noise, in batches; clamped to [-1, 1]."""
        out = [
            self.generator(z.to(self.device), s.to(self.device)).clamp(-1, 1).float().cpu()
            for z, s in zip(noise.split(batch_size), sent.split(batch_size), strict=True)
        ]
        return torch.cat(out)

    def generate(self, prompts: Sequence[str], n: int = 1, seed: int = 0, batch_size: int = 16) -> torch.Tensor:
        """``n`` images per prompt, prompt-major: rows [p0 × n, p1 × n, …]."""
        sent = self.sentence_vectors(prompts).repeat_interleave(n, dim=0)
        return self.from_vectors(sent, self.noise(len(prompts) * n, seed), batch_size)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1))
    return path


def save_singles(images: torch.Tensor, directory: str | Path, stem: str = "sample") -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}_{i:04d}.png" for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        save_image(image, path, normalize=True, value_range=(-1, 1))
    return paths
