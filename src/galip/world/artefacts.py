"""The world's artefacts, built on first use and cached by config: shard sets, the tiny CLIP, the judge.

Configs name these functions through the framework's ``${galip.call:…}`` resolver, so one command
(``python -m galip.train +experiment=demo``) renders the shards, pretrains the tiny CLIP and trains the judge
when they are not cached yet (or shipped in ``galip/world/assets``), then trains GALIP:

    shards: ${galip.call:galip.world.shapes_shards,${data.n_train},${data.n_val},${data.image_size},${data.seed}}
    path: ${galip.call:galip.world.shapes_clip}                  # clip=shapes
    path: ${galip.call:galip.world.shapes_clip,shapes_demo_clip}     # clip=shapes_demo
    judge_path: ${galip.call:galip.world.judge_file}
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from galip.clip import FrozenCLIP, load_clip
from galip.config import CONF_DIR, compose
from galip.world.cache import artefact_dir, write_config
from galip.world.judge import DEFAULT_TRAIN_CONFIG, JUDGE_FORMAT, save_judge, train_judge
from galip.world.scenes import World, write_shapes_shards
from galip.world.tiny_clip import ensure_shapes_clip


def ensure_shapes_shards(
    n_train: int = 10_000,
    n_val: int = 512,
    image_size: int = 64,
    seed: int = 0,
    world: World | Mapping[str, Any] | None = None,
) -> Path:
    """A directory of PNG WebDataset shards of a shapes world (train and val), written if missing.

    ``world``: a `World` or its fields; ``None`` is the full world (keyed only when it is another, so the full
    world's shard sets keep their keys)."""
    world = World.from_config(world)
    config = {"n_train": n_train, "n_val": n_val, "image_size": image_size, "seed": seed, "format": 1}
    if not world.is_full:
        config["world"] = world.key()
    directory = artefact_dir("shards", config)
    if not (directory / "config.json").is_file():
        print(f"shapes world: writing {n_train} + {n_val} scenes to {directory}", flush=True)
        write_shapes_shards(
            directory,
            {"train": n_train, "val": n_val},
            seed=seed,
            image_size=image_size,
            world=world,
        )
        write_config(directory, config)  # last: its presence means the shard set is complete
    return directory


def shapes_shards(n_train, n_val, image_size, seed, world=None) -> str:
    """`ensure_shapes_shards` for a config value (the resolver passes numbers as they are written)."""
    return str(ensure_shapes_shards(int(n_train), int(n_val), int(image_size), int(seed), world))


def shapes_clip(experiment: str = "shapes_clip", *overrides: str) -> str:
    """The shapes CLIP of ``python -m galip.world.pretrain_clip +experiment=<experiment> <overrides>``: shipped,
    cached, or pretrained now (e.g. ``shapes_demo_clip`` for clip=shapes_demo)."""
    return str(ensure_shapes_clip([f"experiment={experiment}", *(str(o) for o in overrides)]))


def data_world(data: str = "shapes", overrides: Sequence[str] = ()) -> tuple[World, int]:
    """The world and image size of a ``data=`` preset of the training config (e.g. ``shapes_demo``)."""
    cfg = compose("train", [f"data={data}", *overrides])
    return World.from_config(cfg.data.get("world")), int(cfg.data.image_size)


def judge_file(world=None, image_size=64) -> str:
    """The judge of a world (default: the full one) at the data's image size, trained first if missing."""
    return str(ensure_judge(world_judge_config(world, int(image_size))))


def world_judge_config(world=None, image_size: int = 64) -> dict[str, Any]:
    """The judge training overrides for ``world`` read at ``image_size`` (``{}``: the full world's default judge)."""
    world = World.from_config(world)
    config: dict[str, Any] = {} if world.is_full else {"world": world.key()}
    if image_size != DEFAULT_TRAIN_CONFIG["image_size"]:
        config["image_size"] = image_size
    return config


# ---------------------------------------------------------------------------------------------------------
# The judge (python -m galip.world.train_judge trains one by hand)
# ---------------------------------------------------------------------------------------------------------
JUDGE_FILE = "judge.pt"


def judge_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full training config (defaults + overrides); with the file format it keys the cache."""
    known = {*DEFAULT_TRAIN_CONFIG, "world"}
    unknown = set(config or {}) - known
    if unknown:
        raise KeyError(f"unknown judge config keys {sorted(unknown)}; known: {sorted(known)}")
    config = dict(config or {})
    if "world" in config and World.from_config(config["world"]).is_full:
        del config["world"]  # the full world is the default: its judges keep their keys
    elif "world" in config:
        config["world"] = World.from_config(config["world"]).key()
    return {**DEFAULT_TRAIN_CONFIG, **config, "format": JUDGE_FORMAT}


def cached_judge_path(config: Mapping[str, Any] | None = None) -> Path:
    return artefact_dir("judge", judge_config(config)) / JUDGE_FILE


def build_judge(config: Mapping[str, Any] | None, out: str | Path, log=print) -> dict[str, float]:
    """Train with ``config`` and write ``out`` (plus config.json and metrics.json beside it)."""
    cfg = judge_config(config)
    train_cfg = {k: v for k, v in cfg.items() if k != "format"}
    judge, metrics = train_judge(train_cfg, log=log)
    out = save_judge(out, judge, metrics, train_cfg)
    write_config(out.parent, cfg)
    (out.parent / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log(f"judge: wrote {out}")
    return metrics


def ensure_judge(config: Mapping[str, Any] | None = None, log=print) -> Path:
    """The cached judge for ``config`` (defaults when None), training it first if it is not there yet."""
    path = cached_judge_path(config)
    if path.is_file():
        log(f"judge: cached at {path}, not retraining")
    else:
        build_judge(config, path, log=log)
    return path


# ---------------------------------------------------------------------------------------------------------
# The shapes CLIP as a model
# ---------------------------------------------------------------------------------------------------------


def load_shapes_clip(path: str | None = None) -> FrozenCLIP:
    """A pretrained shapes CLIP (default: the demo's, shipped or cached). Its architecture is read from the
    ``config.json`` that `galip.world.tiny_clip` writes beside it, else it is the tiny one (conf/clip/tiny.yaml)."""
    if path is None:
        path = shapes_clip()
    written = Path(path).parent / "config.json"
    if written.is_file() and "model_cfg" in (config := json.loads(written.read_text())):
        model_cfg = config["model_cfg"]
    else:
        tiny = CONF_DIR / "clip" / "tiny.yaml"
        model_cfg = yaml.safe_load(tiny.read_text())["model_cfg"]
    return load_clip(name=None, model_cfg=model_cfg, path=path)
