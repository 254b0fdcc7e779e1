"""Schedules in kimg: when a periodic callback fires, the run length, and the keys of earlier releases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from galip.callbacks import SampleGrid, TrainingStatus
from galip.callbacks.schedule import kimg_due, set_run_length
from galip.config import ConfigError, validate
from tests.helpers import compose_config


def fired(batch_size: int, world_size: int, every_n_kimg: float, batches: int) -> list[int]:
    """Images seen at each batch where ``kimg_due`` fires."""
    trainer, module = SimpleNamespace(world_size=world_size), SimpleNamespace(images_seen=0)
    batch = {"image": torch.zeros(batch_size, 3, 2, 2)}
    out = []
    for _ in range(batches):
        module.images_seen += batch_size * world_size
        if kimg_due(trainer, module, batch, every_n_kimg):
            out.append(module.images_seen)
    return out


def test_kimg_due_fires_once_per_period_whatever_the_batch():
    assert fired(32, 1, 6.4, 800) == [6400 * k for k in range(1, 5)]  # the demo: batches 200, 400, 600, 800
    assert fired(8, 1, 6.4, 3200) == [6400 * k for k in range(1, 5)]
    assert fired(48, 2, 1.0, 40) == [1056, 2016, 3072]  # the batch that crosses each 1,000 images
    assert fired(32, 1, 0, 10) == [] and fired(32, 1, None, 10) == []


def test_run_length_in_kimg_sets_the_optimizer_steps():
    trainer = SimpleNamespace(
        world_size=2, fit_loop=SimpleNamespace(max_epochs=1, epoch_loop=SimpleNamespace())
    )
    assert set_run_length(trainer, 25.6, 32) == 2 * 400  # 25,600 images = 400 batches of 32 on 2 ranks
    assert trainer.fit_loop.epoch_loop.max_steps == 800 and trainer.fit_loop.max_epochs == -1
    assert set_run_length(trainer, 0.1, 32) == 2 * 2  # a partial batch rounds up


def test_run_length_is_given_once(tmp_path):
    cfg = compose_config(["+experiment=smoke", "kimg=1", "trainer.max_steps=8"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"kimg=1 and trainer.max_steps=8 both set the run length"):
        validate(cfg)
    cfg = compose_config(["+experiment=cub", "clip=tiny", "trainer.max_epochs=3"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"kimg=13300 and trainer.max_epochs=3 both set the run length"):
        validate(cfg)
    validate(
        compose_config(
            ["+experiment=cub", "clip=tiny", "kimg=null", "trainer.max_epochs=3"], output_dir=tmp_path
        )
    )
    validate(compose_config(["+experiment=smoke", "kimg=1", "trainer.max_epochs=-1"], output_dir=tmp_path))


def test_every_n_batches_of_earlier_releases_names_every_n_kimg(tmp_path):
    with pytest.raises(TypeError, match="SampleGrid: every_n_batches is now every_n_kimg"):
        SampleGrid(tmp_path, every_n_batches=200)
    with pytest.raises(TypeError, match="TrainingStatus: every_n_batches is now every_n_kimg"):
        TrainingStatus(tmp_path, every_n_batches=50)
    with pytest.raises(TypeError, match="unexpected arguments"):
        SampleGrid(tmp_path, every_n_minutes=5)


def test_checkpoints_every_n_kimg_and_not_at_every_epoch_end(tmp_path):
    """The demo's 10,000-scene epochs end mid-period: only the kimg marks (and last.ckpt) are saved."""
    from galip.config import compose
    from galip.train import train

    cfg = compose(
        "train",
        [
            "+experiment=smoke",
            "data.n_train=12",  # 3 batches of 4 per epoch: epochs end at 12, 24, 36 images
            "kimg=0.04",
            "callbacks.checkpoint.every_n_kimg=0.016",  # 4 batches: at 16 and 32 images
            f"paths.output_dir={tmp_path}",
        ],
    )
    train(cfg)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert saved == ["kimg000000.016.ckpt", "kimg000000.032.ckpt", "last.ckpt"]  # named by images seen
