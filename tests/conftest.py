"""Shared test setup: offline environment, the two CLIP geometries, and the real Hydra config.

Nothing here reaches the network: ``HF_HUB_OFFLINE=1`` and ``WANDB_MODE=offline`` are set before anything
imports huggingface_hub or wandb (both read them at import time).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("HYDRA_FULL_ERROR", None)  # the entry point's one-line errors are part of what we test

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import yaml

import galip

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

CONF_DIR = Path(galip.__file__).resolve().parent / "conf"
TINY_CLIP_CFG: dict = yaml.safe_load((CONF_DIR / "clip" / "tiny.yaml").read_text())["model_cfg"]


def compose_config(overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None):
    """The real ``train`` config composed with ``hydra.compose``.

    ``${hydra:runtime.output_dir}`` does not exist outside ``@hydra.main``, so ``paths.output_dir`` is always
    overridden; ``+experiment=x`` is normalised exactly as the entry point does it.
    """
    from hydra import compose, initialize_config_dir

    from galip.train import normalize_slot_overrides

    output_dir = output_dir if output_dir is not None else "outputs/test"
    args = [*normalize_slot_overrides(list(overrides)), f"paths.output_dir={output_dir}"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=args)


@pytest.fixture
def compose(tmp_path) -> Callable:
    """``compose(["+experiment=smoke", ...])`` -> DictConfig whose outputs go under this test's tmp_path."""

    def _compose(overrides: Sequence[str] = ()):
        return compose_config(overrides, output_dir=tmp_path / "out")

    return _compose


@pytest.fixture(scope="session")
def tiny_clip():
    """The tiny random CLIP of ``conf/clip/tiny.yaml``: 64 wide, 8×8 grid, 4 blocks, 64-d embedding, 64 px."""
    from galip.clip import load_clip

    torch.manual_seed(0)
    return load_clip(name=None, model_cfg=TINY_CLIP_CFG)


@pytest.fixture(scope="session")
def vitb32_clip():
    """The paper's ViT-B/32 geometry with random weights (a few seconds to build: built once per session)."""
    from galip.clip import load_clip

    torch.manual_seed(0)
    return load_clip("ViT-B-32-quickgelu")
