"""The world's artefacts, built on first use and cached by config: shard sets, the tiny CLIP, the judge.

Configs name these functions through the framework's ``${galip.call:…}`` resolver, so one command
(``python -m galip.train +experiment=demo``) renders the shards, pretrains the tiny CLIP and trains the judge
when they are not cached yet (or shipped in ``galip/world/assets``), then trains GALIP:

    shards: ${galip.call:galip.world.shapes_shards,${data.n_train},${data.n_val},${data.image_size},${data.seed}}
    path: ${galip.call:galip.world.shapes_clip}                  # clip=shapes
    path: ${galip.call:galip.world.shapes_clip,4,'optim.steps=600'}   # another patch size, more steps
    judge_path: ${galip.call:galip.world.judge_file}
"""

from __future__ import annotations

from pathlib import Path

from galip.world.cache import artefact_dir, write_config


def ensure_shapes_shards(
    n_train: int = 10_000, n_val: int = 512, image_size: int = 64, seed: int = 0, max_objects: int = 3
) -> Path:
    """A directory of PNG WebDataset shards of the shapes world (train and val), written if missing.

    ``max_objects`` < 3: scenes of at most that many objects (keyed only then, so the whole world's shard
    sets keep their keys)."""
    from galip.world.scenes import write_shapes_shards

    config = {"n_train": n_train, "n_val": n_val, "image_size": image_size, "seed": seed, "format": 1}
    if max_objects != 3:
        config["max_objects"] = max_objects
    directory = artefact_dir("shards", config)
    if not (directory / "config.json").is_file():
        print(f"shapes world: writing {n_train} + {n_val} scenes to {directory}", flush=True)
        write_shapes_shards(
            directory,
            {"train": n_train, "val": n_val},
            seed=seed,
            image_size=image_size,
            max_objects=max_objects,
        )
        write_config(directory, config)  # last: its presence means the shard set is complete
    return directory


def shapes_shards(n_train, n_val, image_size, seed, max_objects=3) -> str:
    """`ensure_shapes_shards` for a config value (the resolver passes numbers as they are written)."""
    return str(ensure_shapes_shards(int(n_train), int(n_val), int(image_size), int(seed), int(max_objects)))


def shapes_clip(patch_size: int | str | None = None, *overrides: str) -> str:
    """The shapes CLIP of ``+experiment=shapes_clip`` (``patch_size``: that experiment with another patch size,
    e.g. 4 for clip=shapes_p4; ``overrides``: further pretraining overrides such as ``optim.steps=600``)."""
    from galip.world.pretrain_clip import ensure_shapes_clip

    extra = [str(o) for o in overrides]
    if patch_size not in (None, ""):
        extra.insert(0, f"clip.model_cfg.vision_cfg.patch_size={int(patch_size)}")
    return str(ensure_shapes_clip(extra or None))


def judge_file() -> str:
    """The judge of the default training config (`galip.world.train_judge`), trained first if missing."""
    from galip.world.train_judge import ensure_judge

    return str(ensure_judge())
