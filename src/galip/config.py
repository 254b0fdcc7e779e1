"""Config plumbing shared by the entry points: composing, resolvers, and checks that must fail fast.

Everything here works on a composed config before anything heavy (CLIP, data) is built. Hydra stops at the
entry points; the modules below them take plain arguments.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from galip.clip import config_depth
from galip.metrics.fid import EXTRACTORS

CONF_DIR = Path(__file__).resolve().parent / "conf"

# Groups with a `null` slot in the root configs: `+experiment=x` and `experiment=x` must both select them.
SLOT_GROUPS = ("experiment", "ablation", "debug", "sweep")


class ConfigError(ValueError):
    """A config that contradicts itself; the message is one line naming the key."""


# ---------------------------------------------------------------------------------------------
# Composing
# ---------------------------------------------------------------------------------------------
def normalize_slot_overrides(argv: Sequence[str]) -> list[str]:
    """``+experiment=smoke`` -> ``experiment=smoke`` (Hydra refuses "+" for a group already in the defaults)."""
    return [a[1:] if a.startswith("+") and a[1:].split("=", 1)[0] in SLOT_GROUPS else a for a in argv]


def compose(config_name: str, overrides: Sequence[str] = (), conf_dir: str | Path = CONF_DIR) -> DictConfig:
    """A config of ``conf_dir`` composed as its entry point composes it (outside ``@hydra.main``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=normalize_slot_overrides(overrides))


# ---------------------------------------------------------------------------------------------
# Resolvers
# ---------------------------------------------------------------------------------------------
def call(target: str, *args: Any) -> Any:
    """``${galip.call:pkg.module.function,arg,…}``: the value a function returns, computed once per config.

    What ``_target_`` is for objects, this is for values: a config names a function (e.g. one that builds an
    artefact on first use and returns its path) without the code that reads the config importing it.
    """
    module_name, _, name = target.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(
            f"${{galip.call:{target}}}: no function {name!r} in module {module_name!r}"
        ) from err
    return function(*args)


# Resolver names of earlier releases -> their spelling now (a config that still uses one gets this line).
RENAMED_RESOLVERS = {
    "galip.shapes_clip": "${galip.call:galip.world.shapes_clip[,experiment,'override',…]}",
    "galip.judge": "${galip.call:galip.world.judge_file}",
    "galip.shapes_shards": "${galip.call:galip.world.shapes_shards,n_train,n_val,size,seed[,world]}",
}


def register_resolvers(replace: bool = False) -> None:
    """``${galip.call:…}`` (see `call`); the renamed resolvers of earlier releases raise naming the new one.

    Registered once per process; ``replace=True`` registers them again (e.g. after a test stubbed one)."""
    if OmegaConf.has_resolver("galip.call") and not replace:
        return
    OmegaConf.register_new_resolver("galip.call", call, replace=True, use_cache=True)
    for old, new in RENAMED_RESOLVERS.items():
        OmegaConf.register_new_resolver(old, _renamed(old, new), replace=True)


def _renamed(old: str, new: str):
    def fail(*_: Any) -> Any:
        raise ConfigError(f"${{{old}:…}} is now {new}")

    return fail


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def check_run_length(cfg: DictConfig) -> None:
    """A training run needs a length: ``kimg`` (experiments set it), or epochs / optimizer steps."""
    if (
        not cfg.get("kimg")
        and cfg.trainer.get("max_steps", -1) in (-1, None)
        and not cfg.trainer.get("max_epochs")
    ):
        raise ConfigError(
            "no run length: give kimg=<thousands of images> (experiments set it), or trainer.max_epochs / "
            "trainer.max_steps with kimg=null"
        )


def validate(cfg: DictConfig) -> None:
    """Tap and prompt blocks must exist in the CLIP (depth read from its config, no weights built); the run
    length is given once."""
    for key in ("max_steps", "max_epochs"):
        if cfg.get("kimg") and cfg.trainer.get(key, -1) not in (-1, None):
            raise ConfigError(
                f"kimg={cfg.kimg} and trainer.{key}={cfg.trainer[key]} both set the run length: give one "
                f"(kimg=null to count in {'optimizer steps, two per batch' if key == 'max_steps' else 'epochs'})"
            )
    check_target_keys(cfg)
    depth = config_depth(cfg.clip.get("name"), cfg.clip.get("model_cfg"))
    _check_indices("model.tap_blocks", cfg.model.tap_blocks, depth, allow_empty=False)
    _check_indices("model.generator.prompt_blocks", cfg.model.generator.get("prompt_blocks", []), depth)


HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def check_target_keys(cfg: DictConfig | Mapping) -> None:
    """Every key of a ``_target_`` node must be a parameter of that target (unless it takes ``**kwargs``):
    a typo such as ``+model.tap_block=[1]`` stops here, before anything is built, naming the nearest key.
    Keys that are meant to be added go where the target accepts them (its parameters) or outside any target."""
    plain = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    for path, node in _target_nodes(plain, ""):
        target = node["_target_"]
        if not isinstance(target, str) or "${" in target:
            continue
        known = _parameters(target)
        if known is None:
            continue
        params, old = known
        for key in sorted(set(node) - params - old - HYDRA_KEYS):
            near = difflib.get_close_matches(key, sorted(params - {"self"}), n=1)
            hint = f"; did you mean {path}{near[0]}?" if near else f" (its keys: {', '.join(sorted(params))})"
            raise ConfigError(f"unknown key {path}{key}: {target} takes no '{key}'{hint}")


def _target_nodes(node: Any, path: str):
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from _target_nodes(value, f"{path}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _target_nodes(value, f"{path}{i}.")


def _parameters(target: str) -> tuple[set[str], set[str]] | None:
    """The keyword parameters of a class or function named by its import path, and the keys of earlier
    releases it still answers; None when it takes any (``**kwargs``) or cannot be imported here (instantiation
    will say why). A ``**removed`` catch-all only takes the old keys its target lists in ``REMOVED_KEYS`` (to
    answer them with their new spelling), so those are accepted here and nothing else."""
    module_name, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
        signature = inspect.signature(obj)
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    variadic = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    if variadic and variadic != ["removed"]:
        return None
    return set(signature.parameters) - {"removed"}, set(getattr(obj, "REMOVED_KEYS", ()))


def _check_indices(key: str, blocks, depth: int, allow_empty: bool = True) -> None:
    blocks = list(blocks)
    if not blocks and not allow_empty:
        raise ConfigError(f"{key} is empty: D needs at least one CLIP block to read")
    bad = [b for b in blocks if not 0 <= int(b) < depth]
    if bad:
        raise ConfigError(
            f"{key}={blocks}: {bad} beyond the CLIP depth ({depth} blocks, 0-based 0..{depth - 1})"
        )
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"{key}={blocks}: repeated block")


def to_plain(cfg: Any) -> Any:
    """A DictConfig/ListConfig (resolved) or nested mappings and sequences as plain dicts and lists."""
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return {str(k): to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [to_plain(v) for v in cfg]
    return cfg


def data_name(cfg: DictConfig) -> str:
    """The data config's name (``coco``, ``shapes``, …) for printed lines and file names."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("data") or "data"
    except (ValueError, AttributeError):
        return cfg.data._target_.rsplit(".", 1)[-1]


def fid_features(metrics: DictConfig):
    """The network of a custom FID extractor (``metrics.fid.features``, a ``_target_``), built only when
    ``metrics.fid.extractor`` names no built-in one (see `galip.metrics.fid.make_fid`)."""
    node = metrics.fid.get("features")
    return instantiate(node) if node is not None and metrics.fid.extractor not in EXTRACTORS else None
