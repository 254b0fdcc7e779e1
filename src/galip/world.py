"""The embedded world's artefacts, built on first use and cached by config: shards, tiny CLIP, judge.

``python -m galip.train +experiment=demo`` refers to them through config resolvers, so one command
renders the shards, pretrains the tiny CLIP and trains the judge when they are not cached yet (or
shipped in ``galip/assets``), then trains GALIP.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from galip.cache import artefact_dir, write_config


def ensure_shapes_shards(
    n_train: int = 10_000, n_val: int = 512, image_size: int = 64, seed: int = 0, max_objects: int = 3
) -> Path:
    """A directory of PNG WebDataset shards of the shapes world (train and val), written if missing.

    ``max_objects`` < 3: scenes of at most that many objects (keyed only then, so the whole world's shard
    sets keep their keys)."""
    from galip.data import write_shapes_shards

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


def shapes_clip_path(patch_size: int | str | None = None, *overrides: str) -> str:
    """The shapes CLIP of ``+experiment=shapes_clip`` (``patch_size``: that experiment with another patch size,
    e.g. 4 for conf/clip/shapes_p4.yaml; ``overrides``: further pretraining overrides such as
    ``optim.steps=600``, e.g. ``${galip.shapes_clip:4,'optim.steps=600'}``)."""
    from galip.pretrain_clip import ensure_shapes_clip

    extra = [str(o) for o in overrides]
    if patch_size not in (None, ""):
        extra.insert(0, f"clip.model_cfg.vision_cfg.patch_size={int(patch_size)}")
    return str(ensure_shapes_clip(extra or None))


def judge_path() -> str:
    from galip.train_judge import ensure_judge

    return str(ensure_judge())


def register_resolvers() -> None:
    """``${galip.shapes_clip:}`` (``${galip.shapes_clip:4[,'override',…]}``: patch size 4), ``${galip.judge:}``,
    ``${galip.shapes_shards:n_train,n_val,size,seed[,max_objects]}``."""
    OmegaConf.register_new_resolver("galip.shapes_clip", shapes_clip_path, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("galip.judge", judge_path, replace=True, use_cache=True)
    OmegaConf.register_new_resolver(
        "galip.shapes_shards",
        lambda n_train, n_val, size, seed, max_objects=3: str(
            ensure_shapes_shards(int(n_train), int(n_val), int(size), int(seed), int(max_objects))
        ),
        replace=True,
        use_cache=True,
    )
