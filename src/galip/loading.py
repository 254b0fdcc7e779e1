"""Load anything the project writes: a generator export, a training checkpoint, or a run directory.

    load_generator(path)   # G (the EMA weights when the run kept them), frozen, in eval mode
    load_module(path)      # the whole GALIPModule (G, EMA, D) of a .ckpt or run directory

``path`` is a ``generator.safetensors`` export (`galip.checkpoints`), a Lightning ``.ckpt`` (rebuilt with its
run's config, ``<run>/.hydra/config.yaml`` or ``run_config=``), or a run directory (its export when it has one,
else ``checkpoints/last.ckpt``). `build_module` is how training builds the module from a config, so a
checkpoint is rebuilt exactly as it was trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from galip.checkpoints import build_generator
from galip.clip import FrozenCLIP
from galip.config import register_resolvers
from galip.models import Generator
from galip.models.generator import EXECUTION_KEYS
from galip.module import GALIPModule

EXPORT = "generator.safetensors"
LAST = Path("checkpoints") / "last.ckpt"


def build_module(cfg: DictConfig, clip: FrozenCLIP) -> GALIPModule:
    """The training module of a run's config (``model``: a `GALIPModule` target, ``optim``: its optimizers)
    around ``clip``: how training builds it, and how a checkpoint is rebuilt."""
    model = upgraded(cfg.model)
    return instantiate(
        model,
        clip=clip,
        optimizer_g=instantiate(cfg.optim.generator),
        optimizer_d=instantiate(cfg.optim.discriminator),
    )


# Keys of earlier releases' run configs: options removed with their default value (dropped), and G's speed
# switches, now fields of model.generator.execution.
_REMOVED = {"hard_negatives": None, "generator.code_input": "noise", "discriminator.embedding_head": False}


def upgraded(model: DictConfig) -> DictConfig:
    """A run config's ``model`` in today's form: earlier releases wired it by hand (no ``_target_``)."""
    if "_target_" in model:
        return model
    model = model.copy()
    with open_dict(model):
        model._target_ = "galip.module.GALIPModule"
        for dotted, off in _REMOVED.items():
            node, _, key = dotted.rpartition(".")
            parent = OmegaConf.select(model, node) if node else model
            if parent is not None and key in parent:
                if parent[key] != off:
                    raise ValueError(f"model.{dotted}={parent[key]} was removed (it measured no gain)")
                parent.pop(key)
        levers = {k: model.generator.pop(k) for k in EXECUTION_KEYS if k in model.generator}
        if levers:
            model.generator.execution = levers
    return model


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_generator(path: str | Path, run_config: str | Path | None = None, **clip_overrides) -> Generator:
    """G of any file the project writes (see the module docstring), frozen and in eval mode."""
    path = _existing(path)
    if path.is_dir():
        path = path / EXPORT if (path / EXPORT).is_file() else _checkpoint(path)
    if path.suffix == ".safetensors":
        return build_generator(path, **clip_overrides)
    if path.suffix == ".ckpt":
        return load_module(path, run_config).sampling_generator
    raise ValueError(
        f"{path}: expected a generator export (.safetensors), a Lightning checkpoint (.ckpt) or a run directory"
    )


def load_module(path: str | Path, run_config: str | Path | None = None) -> GALIPModule:
    """The GALIPModule of a training checkpoint or run directory (everything but the frozen CLIP is in the
    file; the CLIP is rebuilt from the run's config), in eval mode and frozen.

    The run's config is ``run_config=`` when given, else the run directory's ``.hydra/config.yaml``, else the
    copy every galip checkpoint carries (so a ``.ckpt`` moved out of its run directory still loads)."""
    path = _existing(path)
    if path.is_dir():
        path = _checkpoint(path)
    checkpoint = read_checkpoint(path)
    cfg = _run_config(path, run_config, checkpoint)
    register_resolvers()  # the run's config may compute values (${galip.call:…})
    module = build_module(cfg, instantiate(cfg.clip))
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("clip.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{path} does not match its run config: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return module.eval().requires_grad_(False)


def read_checkpoint(path: str | Path, mmap: bool = False) -> Mapping[str, Any]:
    """A training checkpoint galip wrote, whole; ``ValueError`` in one line for a file that is not one (another
    program's, truncated, or not a checkpoint at all)."""
    try:
        # our runs' own files, so not weights_only
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, … for a bad file
        cause = f"{type(err).__name__}: {str(err)[:80]}"
        raise ValueError(f"{path} is not a readable checkpoint ({cause})") from err
    if not isinstance(checkpoint, Mapping) or not {"state_dict", "galip_version"} <= checkpoint.keys():
        raise ValueError(
            f"{path} is not a galip training checkpoint (a Lightning .ckpt written by galip.train)"
        )
    return checkpoint


def _run_config(path: Path, run_config: str | Path | None, checkpoint: Mapping) -> DictConfig:
    if run_config is not None:
        if not Path(run_config).is_file():
            raise FileNotFoundError(f"run_config={run_config}: no such file")
        return OmegaConf.load(run_config)
    beside = path.resolve().parent.parent / ".hydra" / "config.yaml"
    if beside.is_file():
        return OmegaConf.load(beside)
    if checkpoint.get("config"):
        return OmegaConf.create(checkpoint["config"])
    raise FileNotFoundError(
        f"no run config for {path}: neither {beside} nor a copy in the checkpoint; pass run_config=<run>/.hydra/config.yaml"
    )


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or directory (a generator.safetensors export, a Lightning .ckpt or a run directory)"
        )
    return path


def _checkpoint(run: Path) -> Path:
    if not (run / LAST).is_file():
        raise FileNotFoundError(f"{run / LAST} not found: is {run} a training run directory?")
    return run / LAST
