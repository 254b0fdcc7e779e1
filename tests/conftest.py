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


@pytest.fixture
def untrained_world_artefacts(tmp_path, monkeypatch):
    """The embedded world's artefacts without any training or shipped copy, so an experiment composes *and runs*
    in seconds whether or not its CLIP and judge are shipped or cached (a changed world's are neither); the
    numbers mean nothing.

    ``${galip.call:galip.world.shapes_clip,<experiment>,…}`` is a random CLIP of that pretraining's architecture
    (with the ``config.json`` `load_shapes_clip` reads), ``…judge_file,<world>,<size>`` an untrained small judge
    of that world; every other ``galip.call`` (shards) runs for real, into a cache under ``tmp_path``. Yields
    ``{"clip": [paths], "judge": [paths]}``, what was built."""
    import json

    from galip.clip import load_clip
    from galip.config import call, register_resolvers

    monkeypatch.setenv("GALIP_CACHE", str(tmp_path / "cache"))
    built: dict[str, list] = {"clip": [], "judge": []}

    def shapes_clip(experiment: str = "shapes_clip", *overrides):
        import galip.world.tiny_clip as pc

        model_cfg = pc.architecture(pc.compose_config([f"experiment={experiment}", *map(str, overrides)]))
        path = tmp_path / "untrained" / f"clip{len(built['clip'])}" / "clip.pt"
        path.parent.mkdir(parents=True)
        torch.manual_seed(0)
        torch.save(load_clip(name=None, model_cfg=model_cfg).model.state_dict(), path)
        (path.parent / "config.json").write_text(json.dumps({"model_cfg": model_cfg}))
        built["clip"].append(path)
        return str(path)

    def judge_file(world=None, image_size=64):
        from galip.world.judge import Judge, save_judge

        torch.manual_seed(0)
        judge = Judge(int(image_size), widths=(8, 16), feature_dim=16, hidden_dim=16, world=world)
        path = save_judge(tmp_path / "untrained" / f"judge{len(built['judge'])}" / "judge.pt", judge)
        built["judge"].append(path)
        return str(path)

    stubs = {"galip.world.shapes_clip": shapes_clip, "galip.world.judge_file": judge_file}

    def resolve(target, *args):
        return stubs[target](*args) if target in stubs else call(target, *args)

    OmegaConf.register_new_resolver("galip.call", resolve, replace=True, use_cache=True)
    yield built
    register_resolvers(replace=True)


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run only where CUDA is (and are reported as skipped elsewhere, with the reason)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
