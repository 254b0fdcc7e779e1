"""The shipped artefacts are the ones the configs ask for: a change of a world, of a CLIP's pretraining recipe or
of the judge's training must fail here (fast, before anything trains) until the artefact is made again and
shipped under its new key (src/galip/world/assets/README.md has the commands)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import galip.world.tiny_clip as pc
from galip.clip import load_clip
from galip.world.artefacts import cached_judge_path, data_world, world_judge_config
from galip.world.cache import SHIPPED_ROOT, artefact_dir
from galip.world.judge import load_judge
from galip.world.scenes import World
from tests.helpers import compose_config

# data preset -> (its CLIP's pretraining experiment, the clip= config G and D use, shipped CLIP key, judge key)
SHIPPED = {
    "shapes_demo": ("shapes_demo_clip", "shapes_demo", "7c9242c5815f", "85a8795a14d8"),
    "shapes": ("shapes_clip", "shapes", "fa110b7c1b2f", "b0779088d7c2"),
}


@pytest.fixture(autouse=True)
def shipped_only(monkeypatch, tmp_path):
    monkeypatch.setenv("GALIP_CACHE", str(tmp_path))  # nothing cached: only shipped copies can be found
    monkeypatch.delenv("GALIP_NO_SHIPPED", raising=False)


@pytest.mark.parametrize("data", list(SHIPPED))
def test_the_configs_keys_are_the_shipped_clip_and_judge(data):
    experiment, _, clip_key, judge_key = SHIPPED[data]
    pretrain = pc.compose_config([f"experiment={experiment}"])
    clip_dir = artefact_dir("clip", pc.artefact_config(pretrain))
    assert clip_dir == SHIPPED_ROOT / "clip" / clip_key, f"{experiment} no longer matches the shipped CLIP"
    assert (clip_dir / "clip.pt").is_file()
    world, image_size = data_world(data)
    judge = cached_judge_path(world_judge_config(world, image_size))
    assert judge == SHIPPED_ROOT / "judge" / judge_key / "judge.pt", (
        f"data={data}'s judge is not the shipped one"
    )
    # the CLIP was pretrained on the world and at the size the data preset trains on
    assert World.from_config(pretrain.data.get("world")) == world
    assert pretrain.data.image_size == image_size


@pytest.mark.parametrize("data", list(SHIPPED))
def test_the_shipped_clip_loads_with_the_architecture_g_and_d_use(data):
    experiment, clip_name, clip_key, _ = SHIPPED[data]
    cfg = compose_config(["+experiment=demo", f"data={data}", f"clip={clip_name}"])
    model_cfg = OmegaConf.to_container(cfg.clip.model_cfg)
    assert model_cfg == pc.architecture(pc.compose_config([f"experiment={experiment}"]))
    clip = load_clip(name=None, model_cfg=model_cfg, path=SHIPPED_ROOT / "clip" / clip_key / "clip.pt")
    assert clip.geometry.grid == 8 and clip.geometry.image_size == model_cfg["vision_cfg"]["image_size"]


@pytest.mark.parametrize("data", list(SHIPPED))
def test_the_shipped_judge_reads_its_world_at_its_size_and_is_accurate(data):
    world, image_size = data_world(data)
    judge = load_judge(SHIPPED_ROOT / "judge" / SHIPPED[data][3] / "judge.pt")
    assert judge.world == world and judge.image_size == image_size
    assert judge.metrics["judge/acc_shape"] >= 0.98 and judge.metrics["judge/acc_colour"] >= 0.99


def test_the_demo_runs_on_the_demo_world_and_demo_full_on_the_full_one():
    demo = compose_config(["+experiment=demo"])
    full = compose_config(["+experiment=demo_full"])
    assert World.from_config(demo.data.world) == data_world("shapes_demo")[0] != World()
    assert demo.data.image_size == 32 and demo.clip.model_cfg.vision_cfg.image_size == 32
    assert World.from_config(full.data.world).is_full and full.data.image_size == 64
    assert full.clip.model_cfg.vision_cfg.patch_size == 8


def test_a_found_clip_is_reported_in_one_line_without_its_training_time(capsys):
    """Finding a shipped CLIP must not read as if it had just been pretrained (the training time is the
    artefact's, printed only when it is made)."""
    path = SHIPPED_ROOT / "clip" / SHIPPED["shapes_demo"][2] / "clip.pt"
    pc.report(path, "found")
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("shapes CLIP (shipped, not retrained): ") and "i2t 0.993" in line
    assert "s of training" not in line
    pc.report(path, "saved")
    assert "s of training" in capsys.readouterr().out
