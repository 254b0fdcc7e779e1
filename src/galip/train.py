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
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from galip.checkpoints import export_generator
from galip.clip import FrozenCLIP
from galip.config import ConfigError, validate
from galip.data.paper_layout import missing_data_cause
from galip.data.webdataset import quote_shard_patterns
from galip.models import Generator
from galip.module import GALIPModule, NonFiniteError
from galip.world import register_resolvers

log = logging.getLogger("galip.train")


def build_module(cfg: DictConfig, clip: FrozenCLIP) -> GALIPModule:
    """Generator and discriminator around the shared frozen CLIP, with their optimizers and loss weights."""
    taps, d_input = list(cfg.model.tap_blocks), cfg.model.get("d_input", "clip")
    generator = instantiate(cfg.model.generator)(clip=clip)
    discriminator = instantiate(cfg.model.discriminator)(**discriminator_shape(d_input, clip, len(taps)))
    return GALIPModule(
        clip,
        generator,
        discriminator,
        tap_blocks=taps,
        optimizer_g=instantiate(cfg.optim.generator),
        optimizer_d=instantiate(cfg.optim.discriminator),
        grad_clip=cfg.model.get("grad_clip"),
        ema_half_life_kimg=cfg.model.get("ema_half_life_kimg"),
        nonfinite=cfg.model.get("nonfinite", "stop"),
        d_input=d_input,
        channels_last=cfg.model.get("channels_last", False),
        augment_translation=cfg.model.get("augment_translation", 0.0),
        hard_negatives=instantiate(cfg.model.get("hard_negatives")),
        **cfg.model.loss,
    )


def module_from_run(run_dir: str | Path, ckpt: str = "last.ckpt") -> GALIPModule:
    """A finished run's GALIPModule (G, EMA, D) in eval mode, from ``<run>/.hydra/config.yaml`` and
    ``<run>/checkpoints/<ckpt>``."""
    run = Path(run_dir)
    config_file, path = run / ".hydra" / "config.yaml", run / "checkpoints" / ckpt
    for needed in (config_file, path):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} not found: is {run} a training run directory?")
    return module_from_checkpoint(path, config_file)


def module_from_checkpoint(path: str | Path, config_file: str | Path) -> GALIPModule:
    """The GALIPModule of a training checkpoint (which holds everything but the frozen CLIP), rebuilt with
    its run's config, in eval mode and frozen."""
    cfg = OmegaConf.load(config_file)
    module = build_module(cfg, instantiate(cfg.clip))
    state = torch.load(str(path), map_location="cpu", weights_only=False)["state_dict"]  # our own run's file
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("clip.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{path} does not match its run config: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return module.eval().requires_grad_(False)


def discriminator_shape(d_input: str, clip: FrozenCLIP, n_taps: int) -> dict[str, int]:
    """What D is built around: the stacked CLIP taps, or (``d_input=pixels``, the baseline) the images."""
    geo = clip.geometry
    if d_input == "pixels":
        return {"image_size": geo.image_size, "embed_dim": geo.embed_dim}
    return {"width": geo.width, "grid": geo.grid, "embed_dim": geo.embed_dim, "n_taps": n_taps}


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, float]:
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg)
    continue_wandb_run(cfg, ckpt_path)
    clip: FrozenCLIP = instantiate(cfg.clip)
    datamodule = instantiate(cfg.data, tokenizer=clip.tokenizer)
    module = build_module(cfg, clip)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks, loggers = instantiate_group(cfg.get("callbacks")), instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        log_hyperparameters(cfg, module, trainer)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_wandb(failed=sys.exc_info()[0] is not None)
    # Only GALIP's Generator can be rebuilt from an export (the CNN baseline of Table 3 cannot).
    if trainer.is_global_zero and isinstance(module.sampling_generator, Generator):
        export = export_generator(
            module.sampling_generator, Path(cfg.paths.output_dir) / "generator.safetensors", cfg.clip
        )
        log.info(f"generator export: {export}")
    report(cfg, trainer, callbacks)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path=last`` -> this run directory's ``checkpoints/last.ckpt``; a missing file is an error."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt" if ckpt == "last" else Path(ckpt)
    if not path.is_file():
        hint = (
            " (resume in the old run directory: hydra.run.dir=<run dir> ckpt_path=last)"
            if ckpt == "last"
            else ""
        )
        raise ConfigError(f"ckpt_path={ckpt}: no checkpoint at {path}{hint}")
    return str(path)


def continue_wandb_run(cfg: DictConfig, ckpt_path: str | None) -> None:
    """A resumed run logs into the W&B run its checkpoint came from."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if ckpt_path is None or wandb_cfg is None:
        return
    run_id = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True).get("wandb_run_id")
    if run_id:
        with open_dict(cfg):
            wandb_cfg.id, wandb_cfg.resume = run_id, "allow"


def finish_wandb(failed: bool) -> None:
    """Close the W&B run even when training crashed, so the next job of a sweep starts a clean run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


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
    if (out / "generator.safetensors").is_file():
        lines.append(
            f"generator:     {out / 'generator.safetensors'}  (python -m galip.sample ckpt=… prompts='[…]')"
        )
    if trainer.is_global_zero:
        print("\n".join(lines), flush=True)


# Groups with a `null` slot in train.yaml: `+experiment=x` and `experiment=x` must both select them.
SLOT_GROUPS = ("experiment", "ablation", "debug", "sweep")


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
    except NonFiniteError as err:
        print(f"galip: {err}", file=sys.stderr)
        sys.exit(3)
    except Exception as err:  # a dataset that is not there: one line naming the path, not a traceback
        if (missing := missing_data_cause(err)) is None:
            raise
        print(f"galip: data missing: {missing}", file=sys.stderr)
        sys.exit(2)
    return metrics.get(cfg.get("optimized_metric", "")) if cfg.get("optimized_metric") else None


register_resolvers()

if __name__ == "__main__":
    sys.argv = quote_shard_patterns(normalize_slot_overrides(sys.argv))
    main()
