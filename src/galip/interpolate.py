"""``python -m galip.interpolate ckpt=… prompts='[a, b]' steps=8`` -> grid.png and an animated GIF."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from galip.sampling import (
    Sampler,
    as_prompts,
    interpolate_noise,
    interpolate_prompts,
    run_export_cli,
    save_gif,
    save_grid,
)


def interpolate(cfg: DictConfig) -> Path:
    sampler = Sampler.from_file(cfg.ckpt, device=cfg.device)
    prompts = as_prompts(cfg.prompts)  # a string is one prompt
    if cfg.mode == "noise":
        images = interpolate_noise(sampler, prompts[0], cfg.steps, tuple(cfg.seeds), cfg.truncation)
    elif cfg.mode == "prompts":
        images = interpolate_prompts(sampler, prompts, cfg.steps, cfg.seed, cfg.truncation)
    else:
        raise ValueError(f"mode={cfg.mode!r}: expected 'prompts' or 'noise'")
    out = Path(cfg.out_dir)
    grid = save_grid(images, out / "grid.png", nrow=cfg.steps)
    # The GIF walks the first row (2 prompts, noise) or the diagonal (4 prompts).
    frames = images[:: cfg.steps + 1] if len(images) == cfg.steps**2 else images
    gif = save_gif(frames, out / "interpolation.gif")
    print(f"{len(images)} images -> {grid}, {gif}")
    return grid


@hydra.main(version_base="1.3", config_path="conf", config_name="interpolate")
def main(cfg: DictConfig) -> None:
    run_export_cli(interpolate, cfg)


if __name__ == "__main__":
    main()
