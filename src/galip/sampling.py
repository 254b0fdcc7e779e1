"""Sampling from a trained generator: prompts -> images, deterministic for a seed, batch-size independent."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid, save_image

from galip.loading import load_generator
from galip.models import Generator

PRECISIONS = ("fp32", "bf16")


class Sampler:
    """``Sampler.from_file(path).generate(["a red circle"], n=8, seed=0)`` -> [8, 3, H, W] in [-1, 1].

    ``precision="bf16"`` runs G's convolutions and matmuls in bfloat16 (``torch.autocast``; the text encoder
    and G's weights stay fp32): faster on CPUs with native bf16 (AVX-512 BF16 or AMX) and GPUs, at a small
    pixel error (measured in experiments/benchmarks.md).
    """

    def __init__(
        self,
        generator: Generator,
        device: str | torch.device = "cpu",
        channels_last: bool = True,
        precision: str = "fp32",
    ):
        self.device = torch.device(device)
        self.precision = check_precision(precision, self.device)
        # channels_last: same images, a faster G forward (ViT-B/32, 2-core CPU, B=8: 3.9 s -> 2.4 s; experiments/benchmarks.md).
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.generator = generator.to(self.device, memory_format=memory_format)
        self.generator.clip.to(self.device)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        run_config=None,
        precision: str = "fp32",
        **clip_overrides,
    ) -> Sampler:
        """G of any file the project writes: an export, a training ``.ckpt`` or a run directory
        (`galip.loading.load_generator`)."""
        return cls(load_generator(path, run_config, **clip_overrides), device, precision=precision)

    from_export = from_file  # the name of earlier releases

    @property
    def clip(self):
        return self.generator.clip

    def sentence_vectors(self, prompts: str | Sequence[str]) -> torch.Tensor:
        prompts = as_prompts(prompts)
        warn_cut_prompts(prompts, self.clip.tokenizer)
        return self.clip.encode_text(self.clip.tokenize(prompts).to(self.device))

    def noise(self, count: int, seed: int, truncation: float = 1.0) -> torch.Tensor:
        """All noise is drawn up front on the CPU, so results do not depend on the batch size or device.

        ``truncation`` is ψ of the truncation trick: z ~ N(0, I) moved toward its mean, z' = μ + ψ (z − μ).
        G has no mapping network, so μ is the prior's own mean, 0, and z' = ψ z: ψ = 1 is the prior, ψ = 0 the
        mean for every seed (less variety, more typical images)."""
        z = torch.randn(count, self.generator.nz, generator=torch.Generator().manual_seed(seed))
        return truncate(z, truncation)

    @torch.inference_mode()
    def from_vectors(self, sent: torch.Tensor, noise: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images for matching rows of sentence vectors and noise, in batches; clamped to [-1, 1]."""
        with self.autocast():
            out = [
                self.generator(z.to(self.device), s.to(self.device)).float().clamp(-1, 1).cpu()
                for z, s in zip(noise.split(batch_size), sent.split(batch_size), strict=True)
            ]
        return torch.cat(out)

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def generate(
        self,
        prompts: str | Sequence[str],
        n: int = 1,
        seed: int = 0,
        batch_size: int = 16,
        truncation: float = 1.0,
    ) -> torch.Tensor:
        """``n`` images per prompt, prompt-major: rows [p0 × n, p1 × n, …]. A string is one prompt.
        ``truncation``: ψ in [0, 1] (see `noise`)."""
        if int(n) < 1:
            raise ValueError(f"n={n}: the number of images per prompt must be at least 1")
        prompts = as_prompts(prompts)
        sent = self.sentence_vectors(prompts).repeat_interleave(n, dim=0)
        return self.from_vectors(sent, self.noise(len(prompts) * n, seed, truncation), batch_size)


def check_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``; bf16 on a CPU without native bf16 is allowed (it is emulated) but warned about."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if precision == "bf16" and device.type == "cpu" and not native:
        warnings.warn(
            "precision=bf16: this CPU has no native bf16 (AVX-512 BF16 or AMX); fp32 is faster here",
            stacklevel=3,
        )
    return precision


def truncate(z: torch.Tensor, truncation: float, mean: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The truncation trick (BigGAN, StyleGAN): ``mean + ψ (z − mean)``, ψ in [0, 1]; the mean of G's Gaussian
    prior is 0."""
    psi = float(truncation)
    if not 0.0 <= psi <= 1.0:
        raise ValueError(f"truncation={truncation}: ψ must be in [0, 1] (1 = no truncation, 0 = the mean)")
    return z if psi == 1.0 else mean + psi * (z - mean)


def as_prompts(prompts: str | Sequence[str]) -> list[str]:
    """A string is one prompt, a sequence one prompt per item; none, or an empty one, is a ValueError."""
    prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given: pass at least one, e.g. prompts='a red circle'")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise ValueError(f"prompt {empty[0]} is empty: every prompt needs some text")
    return prompts


def warn_cut_prompts(prompts: Sequence[str], tokenizer) -> None:
    """Warn (naming the words lost) for each prompt longer than the CLIP text encoder reads."""
    context = getattr(tokenizer, "context_length", None)
    if context is None or not hasattr(tokenizer, "encode"):
        return
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if len(ids) > context - 2:  # start and end tokens take two places
            lost = tokenizer.decode(ids[context - 2 :]).strip()
            warnings.warn(
                f"prompt {i} is {len(ids)} tokens; CLIP reads the first {context - 2}, so "
                f"'{lost}' is cut off",
                stacklevel=3,
            )


def save_grid(
    images: torch.Tensor, path: str | Path, nrow: int, row_labels: Sequence[str] | None = None
) -> Path:
    """Images in [-1, 1] as a PNG grid of ``nrow`` columns; ``row_labels`` (e.g. the captions) are written to
    the left of their rows, and images smaller than 64 px are enlarged (nearest) so the text stays legible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not row_labels:
        save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1))
        return path
    rows = -(-len(images) // nrow)
    if len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    scale = max(1, 64 // images.shape[-1])
    grid = make_grid(images.float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1))
    picture = to_pil_image(grid).resize((grid.shape[2] * scale, grid.shape[1] * scale), Image.NEAREST)
    font = ImageFont.load_default()
    margin = 8
    text_width = max(int(font.getlength(label)) for label in row_labels) + 2 * margin
    canvas = Image.new("RGB", (text_width + picture.width, picture.height), "white")
    canvas.paste(picture, (text_width, 0))
    draw, row_height = ImageDraw.Draw(canvas), picture.height / rows
    for i, label in enumerate(row_labels):
        draw.text((margin, (i + 0.5) * row_height), label, fill="black", font=font, anchor="lm")
    canvas.save(path)
    return path


def save_singles(images: torch.Tensor, directory: str | Path, stem: str = "sample") -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}_{i:04d}.png" for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        save_image(image, path, normalize=True, value_range=(-1, 1))
    return paths


# ---------------------------------------------------------------------------------------------
# Interpolation: the "style knob" (paper Fig. 7)
# ---------------------------------------------------------------------------------------------


def lerp_weights(steps: int) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, steps)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between noise vectors (keeps the Gaussian norm), rows of t in [0, 1]."""
    a_n, b_n = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.arccos((a_n * b_n).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    t = t[:, None]
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return torch.where(t == 0, a, torch.where(t == 1, b, out))  # exact endpoints


def interpolate_prompts(
    sampler: Sampler, prompts: Sequence[str], steps: int = 8, seed: int = 0, truncation: float = 1.0
) -> torch.Tensor:
    """Fixed noise, sentence vectors blended between 2 prompts (a row) or 4 prompts (a steps × steps grid,
    corners in reading order). Endpoints are exactly the prompts' own samples."""
    sent = sampler.sentence_vectors(prompts).cpu()
    t = lerp_weights(steps)
    if len(prompts) == 2:
        mix = torch.lerp(sent[0], sent[1], t[:, None])
    elif len(prompts) == 4:
        top = torch.lerp(sent[0], sent[1], t[:, None])
        bottom = torch.lerp(sent[2], sent[3], t[:, None])
        mix = torch.lerp(top[None], bottom[None], t[:, None, None]).reshape(steps * steps, -1)
    else:
        raise ValueError(f"interpolation takes 2 or 4 prompts, got {len(prompts)}")
    noise = sampler.noise(1, seed, truncation).expand(len(mix), -1)
    return sampler.from_vectors(mix, noise)


def interpolate_noise(
    sampler: Sampler,
    prompt: str,
    steps: int = 8,
    seeds: tuple[int, int] = (0, 1),
    truncation: float = 1.0,
) -> torch.Tensor:
    """Fixed prompt, noise slerped between the first noise of two seeds (content fixed, "style" varies)."""
    a, b = sampler.noise(1, seeds[0], truncation), sampler.noise(1, seeds[1], truncation)
    noise = slerp(a.expand(steps, -1), b.expand(steps, -1), lerp_weights(steps))
    sent = sampler.sentence_vectors([prompt]).cpu().expand(steps, -1)
    return sampler.from_vectors(sent, noise)


def save_gif(images: torch.Tensor, path: str | Path, duration_ms: int = 120, bounce: bool = True) -> Path:
    """Frames in order (and back, with ``bounce``) as an animated GIF."""
    from PIL import Image

    frames = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    pil = [Image.fromarray(f) for f in frames]
    if bounce and len(pil) > 2:
        pil = pil + pil[-2:0:-1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=duration_ms, loop=0)
    return path


def run_export_cli(task, cfg: DictConfig) -> None:
    """Run a CLI task on a trained generator (``ckpt=``); user errors become one ``galip: …`` line and exit code 2."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        print(
            "galip: ckpt=PATH is required (<run dir>/generator.safetensors, a Lightning .ckpt or a run directory)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        task(cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"galip: {err}", file=sys.stderr)
        sys.exit(2)
