"""``python -m galip.sample ckpt=generator.safetensors prompts='["a bird", …]' n=8 seed=0 [truncation=0.7] [precision=bf16]``.

Writes ``<out_dir>/grid.png`` (one row per prompt, the prompt beside it) and ``<out_dir>/<prompt index>_<i>.png``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from galip.sampling import Sampler, as_prompts, run_export_cli, save_grid, save_singles


def sample(cfg: DictConfig) -> Path:
    sampler = Sampler.from_file(cfg.ckpt, device=cfg.device, precision=cfg.precision)
    prompts = as_prompts(cfg.prompts)  # a string is one prompt
    images = sampler.generate(
        prompts, n=cfg.n, seed=cfg.seed, batch_size=cfg.batch_size, truncation=cfg.truncation
    )
    out = Path(cfg.out_dir)
    grid = save_grid(images, out / "grid.png", nrow=cfg.n, row_labels=prompts)
    for p, chunk in enumerate(images.split(cfg.n)):
        save_singles(chunk, out, stem=f"{p:03d}")
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    psi = f", truncation ψ={cfg.truncation}" if cfg.truncation != 1 else ""
    print(f"{len(images)} images ({cfg.n} per prompt, seed {cfg.seed}{psi}) -> {grid}")
    return grid


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_export_cli(sample, cfg)


if __name__ == "__main__":
    main()
