"""Train GALIP: ``python -m galip.train +experiment=smoke`` (Hydra overrides as usual).

seed -> CLIP -> data, model, callbacks, loggers -> Trainer -> fit -> the numbers a sweeper optimises.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from galip.checkpoints import export_generator
from galip.clip import FrozenCLIP
from galip.config import ConfigError, validate
from galip.module import GALIPModule
from galip.world import register_resolvers

log = logging.getLogger("galip.train")


def build_module(cfg: DictConfig, clip: FrozenCLIP) -> GALIPModule:
    """Generator and discriminator around the shared frozen CLIP, with their optimizers and loss weights."""
    geo, taps = clip.geometry, list(cfg.model.tap_blocks)
    generator = instantiate(cfg.model.generator)(clip=clip)
    discriminator = instantiate(cfg.model.discriminator)(
        width=geo.width, grid=geo.grid, embed_dim=geo.embed_dim, n_taps=len(taps)
    )
    return GALIPModule(
        clip,
        generator,
        discriminator,
        tap_blocks=taps,
        optimizer_g=instantiate(cfg.optim.generator),
        optimizer_d=instantiate(cfg.optim.discriminator),
        grad_clip=cfg.model.get("grad_clip"),
        ema_half_life_kimg=cfg.model.get("ema_half_life_kimg"),
        **cfg.model.loss,
    )


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, float]:
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    clip: FrozenCLIP = instantiate(cfg.clip)
    datamodule = instantiate(cfg.data, tokenizer=clip.tokenizer)
    module = build_module(cfg, clip)
    callbacks, loggers = instantiate_group(cfg.get("callbacks")), instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    log_hyperparameters(cfg, module, trainer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if trainer.is_global_zero:
        export = export_generator(
            module.sampling_generator, Path(cfg.paths.output_dir) / "generator.safetensors", cfg.clip
        )
        log.info(f"generator export: {export}")
    report(cfg, trainer, callbacks)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def log_hyperparameters(cfg: DictConfig, module: GALIPModule, trainer: L.Trainer) -> None:
    counts = module.parameter_counts()
    log.info("parameters: " + ", ".join(f"{k.split('/')[1]} {v:,}" for k, v in counts.items()))
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **counts})


def report(cfg: DictConfig, trainer: L.Trainer, callbacks: list[Any]) -> None:
    """Tell the user where the run left its files."""
    out = Path(cfg.paths.output_dir)
    lines = [f"run directory: {out}"]
    ckpt = next((cb for cb in callbacks if isinstance(cb, L.pytorch.callbacks.ModelCheckpoint)), None)
    if ckpt is not None and ckpt.last_model_path:
        lines.append(f"checkpoint:    {ckpt.last_model_path}")
    grids = [cb.last_path for cb in callbacks if getattr(cb, "last_path", None)]
    lines += [f"sample grid:   {p}" for p in grids]
    lines.append(
        f"generator:     {out / 'generator.safetensors'}  (python -m galip.sample ckpt=… prompts='[…]')"
    )
    if trainer.is_global_zero:
        print("\n".join(lines), flush=True)


# Groups with a `null` slot in train.yaml: `+experiment=x` and `experiment=x` must both select them.
SLOT_GROUPS = ("experiment", "ablation", "debug")


def normalize_slot_overrides(argv: list[str]) -> list[str]:
    """``+experiment=smoke`` -> ``experiment=smoke`` (Hydra refuses "+" for a group already in the defaults)."""
    return [a[1:] if a.startswith("+") and a[1:].split("=", 1)[0] in SLOT_GROUPS else a for a in argv]


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except ConfigError as err:
        print(f"galip: config error: {err}", file=sys.stderr)
        sys.exit(2)
    return metrics.get(cfg.get("optimized_metric", "")) if cfg.get("optimized_metric") else None


register_resolvers()

if __name__ == "__main__":
    sys.argv = normalize_slot_overrides(sys.argv)
    main()
