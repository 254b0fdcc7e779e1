"""Train GALIP: ``python -m galip.train +experiment=smoke`` (Hydra overrides as usual).

seed -> CLIP -> data, model, callbacks, loggers -> Trainer -> fit -> the numbers a sweeper optimises.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from galip.atomic_io import remove_stale_temporaries
from galip.callbacks.schedule import kimg_seen, set_run_length
from galip.checkpoints import export_generator
from galip.clip import FrozenCLIP
from galip.config import (
    ConfigError,
    check_run_length,
    normalize_slot_overrides,
    register_resolvers,
    validate,
)
from galip.data.paper_layout import missing_data_cause
from galip.data.webdataset import quote_shard_patterns
from galip.loading import build_module, read_checkpoint
from galip.models import Generator
from galip.module import GALIPModule, NonFiniteError
from galip.quiet import silence_library_noise, silence_resume_noise

log = logging.getLogger("galip.train")
# Exit statuses of a run stopped by a signal, as a shell reports a process the signal ended (128 + signal)
STOPPED_STATUS = {"SIGTERM": 143, "Ctrl+C": 130}


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, float]:
    register_resolvers()
    silence_library_noise()
    validate(cfg)
    check_run_length(cfg)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is not None:
        resumed = read_resumable(ckpt_path, cfg)
        continue_wandb_run(cfg, resumed)
        continue_tensorboard(cfg, resumed)
        silence_resume_noise()
        for tmp in remove_stale_temporaries(Path(cfg.paths.output_dir) / "checkpoints"):
            log.info(f"removed {tmp.name}, a checkpoint a killed run left half-written")
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the seed is in the run-length line
    clip: FrozenCLIP = instantiate(cfg.clip)
    datamodule = instantiate(cfg.data, tokenizer=clip.tokenizer)
    module = build_module(cfg, clip)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks, loggers = instantiate_group(cfg.get("callbacks")), instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if cfg.get("kimg"):
        steps = set_run_length(trainer, cfg.kimg, cfg.data.batch_size)
        log.info(
            f"run length: {cfg.kimg} kimg = {steps // 2} batches of {cfg.data.batch_size} per rank; seed {cfg.seed}"
        )
    try:
        log_hyperparameters(cfg, module, trainer)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # Lightning ends fit with a SystemExit whose status is 0: say it, and fail
        raise Stopped("SIGTERM", stopped_message("SIGTERM", cfg, trainer, callbacks)) from None
    except SystemExit as err:
        # Lightning's Ctrl+C handling says "Detected KeyboardInterrupt" and exits 1 from its except clause
        if isinstance(err.__context__, KeyboardInterrupt):
            raise Stopped("Ctrl+C", stopped_message("Ctrl+C", cfg, trainer, callbacks)) from None
        raise
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


# Settings that shape the weights (a resume that changes them cannot load the checkpoint), less the speed switch.
SHAPING_KEYS = ("clip", "model.generator", "model.discriminator", "model.tap_blocks", "data.image_size")
FREE_KEYS = ("model.generator.execution",)


def read_resumable(ckpt_path: str, cfg: DictConfig) -> Mapping[str, Any]:
    """The checkpoint a run resumes from, after the checks that make a resume do what it says: the file is a
    galip checkpoint, the config builds the same networks, and the run length leaves something to train."""
    try:
        checkpoint = read_checkpoint(ckpt_path, mmap=True)
    except ValueError as err:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: {err}") from None
    saved = checkpoint.get("config")
    if saved:
        current = OmegaConf.to_container(cfg, resolve=True)
        old, new = _leaves(saved, SHAPING_KEYS), _leaves(current, SHAPING_KEYS)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path}: this config changes {', '.join(changed)} from the run the checkpoint "
                "came from; resume with that run's overrides (its .hydra/overrides.yaml)"
            )
    seen = checkpoint.get("images_seen", 0) / 1000.0
    if cfg.get("kimg") and seen >= cfg.kimg:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: the checkpoint has already seen {seen:g} kimg of the run's kimg={cfg.kimg}; "
            "give a larger kimg= to train on"
        )
    return checkpoint


def _leaves(tree: Any, keep: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` for the leaves under the dotted ``keep`` paths, less ``FREE_KEYS``."""
    if prefix in FREE_KEYS:
        return {}
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if any(path == k or path.startswith(k + ".") or k.startswith(path + ".") for k in keep):
                out.update(_leaves(value, keep, path))
        return out
    return {prefix: tree}


def continue_wandb_run(cfg: DictConfig, checkpoint: Mapping[str, Any]) -> None:
    """A resumed run logs into the W&B run its checkpoint came from."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is None:
        return
    run_id = checkpoint.get("wandb_run_id")
    if run_id:
        with open_dict(cfg):
            wandb_cfg.id, wandb_cfg.resume = run_id, "allow"


def continue_tensorboard(cfg: DictConfig, checkpoint: Mapping[str, Any]) -> None:
    """A resumed run's TensorBoard writer drops what the run logged after its checkpoint.

    The resumed run writes a new event file in the same folder; steps a killed run had logged past the
    checkpoint would otherwise be drawn twice. ``purge_step`` (the first step the resumed run logs: the
    batches the checkpoint has seen) tells TensorBoard to discard the earlier events from that step on."""
    loops = checkpoint.get("loops") or {}
    batches = loops.get("fit_loop", {}).get("epoch_loop.state_dict", {}).get("_batches_that_stepped")
    for logger_cfg in (cfg.get("logger") or {}).values():
        if batches is not None and str(logger_cfg.get("_target_", "")).endswith("TensorBoardLogger"):
            with open_dict(cfg):
                logger_cfg.purge_step = int(batches)


class Stopped(Exception):
    """The run was stopped by a signal (``by``: SIGTERM or Ctrl+C); the message says where and how to resume."""

    def __init__(self, by: str, message: str):
        super().__init__(message)
        self.by = by


def stopped_message(by: str, cfg: DictConfig, trainer: L.Trainer, callbacks: list[Any]) -> str:
    seen, done = (
        kimg_seen(trainer.lightning_module),
        trainer.fit_loop.epoch_loop.batch_progress.total.completed,
    )
    where = f"stopped by {by} after {done} batches ({seen:g} of {cfg.get('kimg')} kimg)"
    last = last_checkpoint(callbacks)
    if last is None:
        return f"{where}; no checkpoint was written"
    return (
        f"{where}; {last} holds the last saved point: resume with the run's overrides and "
        f"hydra.run.dir={cfg.paths.output_dir} ckpt_path=last"
    )


def last_checkpoint(callbacks: list[Any]) -> str | None:
    """The ``last.ckpt`` the run's checkpoint callback wrote, if it wrote one."""
    ckpt = next((cb for cb in callbacks if isinstance(cb, ModelCheckpoint)), None)
    return ckpt.last_model_path if ckpt is not None and ckpt.last_model_path else None


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
    if (last := last_checkpoint(callbacks)) is not None:
        lines.append(f"checkpoint:    {last}")
    grids = [cb.last_path for cb in callbacks if getattr(cb, "last_path", None)]
    lines += [f"sample grid:   {p}" for p in grids]
    if (out / "generator.safetensors").is_file():
        lines.append(
            f"generator:     {out / 'generator.safetensors'}  (python -m galip.sample ckpt=… prompts='[…]')"
        )
    if trainer.is_global_zero:
        print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except ConfigError as err:
        print(f"galip: config error: {err}", file=sys.stderr)
        remove_unused_run_dir(cfg)
        sys.exit(2)
    except NonFiniteError as err:
        print(f"galip: {err}", file=sys.stderr)
        sys.exit(3)
    except Stopped as err:
        if rank_zero_only.rank == 0:  # every rank stops; one says so
            print(f"galip: {err}", file=sys.stderr)
        sys.exit(STOPPED_STATUS[err.by])
    except Exception as err:  # a dataset that is not there: one line naming the path, not a traceback
        if (missing := missing_data_cause(err)) is None:
            raise
        print(f"galip: data missing: {missing}", file=sys.stderr)
        remove_unused_run_dir(cfg)
        sys.exit(2)
    return metrics.get(cfg.get("optimized_metric", "")) if cfg.get("optimized_metric") else None


def remove_unused_run_dir(cfg: DictConfig) -> None:
    """A run stopped by a user's mistake before it trained leaves no directory behind: the run directory goes
    when it holds nothing but what Hydra wrote at start (``.hydra/`` and the log). A directory with anything
    else in it (an earlier run resumed with ``ckpt_path=last``) is kept as it is."""
    out = Path(cfg.paths.output_dir)
    if out.is_dir() and {p.name for p in out.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(out, ignore_errors=True)


# Names of earlier releases that moved: asked for here, they say where.
_MOVED = {
    "build_module": "galip.loading.build_module",
    "module_from_run": "galip.loading.load_module",
    "module_from_checkpoint": "galip.loading.load_module",
    "normalize_slot_overrides": "galip.config.normalize_slot_overrides",
    "SLOT_GROUPS": "galip.config.SLOT_GROUPS",
}


def __getattr__(name: str):
    if name in _MOVED:
        raise AttributeError(f"galip.train.{name} moved: use {_MOVED[name]}")
    raise AttributeError(f"module 'galip.train' has no attribute {name!r}")


if __name__ == "__main__":
    register_resolvers()
    sys.argv = quote_shard_patterns(normalize_slot_overrides(sys.argv))
    main()
