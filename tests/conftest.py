"""Shared fixtures: offline environment, the two CLIP geometries, the real Hydra config (helpers: helpers.py).

Nothing here reaches the network: ``HF_HUB_OFFLINE=1`` and ``WANDB_MODE=offline`` are set before anything
imports huggingface_hub or wandb (both read them at import time).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.pop("HYDRA_FULL_ERROR", None)  # the entry point's one-line errors are part of what we test

from collections.abc import Callable, Sequence

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import TINY_CLIP_CFG, compose_config

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


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


@pytest.fixture
def stub_world_artefacts():
    """The embedded world's configs compute artefacts (shards, tiny CLIP, judge) on first use through
    ``${galip.call:…}``: here every such value is ``<function name>`` instead, and nothing is built."""
    from galip.config import register_resolvers

    OmegaConf.register_new_resolver("galip.call", lambda target, *_: f"<{target}>", replace=True)
    yield
    register_resolvers(replace=True)


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run only where CUDA is (and are reported as skipped elsewhere, with the reason)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
