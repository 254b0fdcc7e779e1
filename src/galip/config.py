"""Checks on a composed config that must fail fast, before anything heavy (CLIP, data) is built."""

from __future__ import annotations

from omegaconf import DictConfig

from galip.clip import config_depth


class ConfigError(ValueError):
    """A config that contradicts itself; the message is one line naming the key."""


def validate(cfg: DictConfig) -> None:
    """Tap and prompt blocks must exist in the CLIP (depth read from its config, no weights built)."""
    depth = config_depth(cfg.clip.get("name"), cfg.clip.get("model_cfg"))
    _check_indices("model.tap_blocks", cfg.model.tap_blocks, depth, allow_empty=False)
    _check_indices("model.generator.prompt_blocks", cfg.model.generator.get("prompt_blocks", []), depth)


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
