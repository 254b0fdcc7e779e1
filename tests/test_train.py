"""The training entry point: the real command end to end, every experiment config, and config errors."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from galip.config import SLOT_GROUPS, ConfigError, normalize_slot_overrides, validate
from tests.helpers import CONF_DIR, compose_config, config_names, run_train

EXPERIMENTS = config_names("experiment")


def test_smoke_experiment_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(["+experiment=smoke", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    last = run_dir / "checkpoints" / "last.ckpt"
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    assert last.is_file()
    assert grids, f"no sample grid in {run_dir / 'samples'}"
    assert str(last) in proc.stdout
    assert str(grids[-1]) in proc.stdout
    assert f"run directory: {run_dir}" in proc.stdout
    # 4 batches × 2 optimizer steps: the end-of-training grid is named after the last global step
    assert grids[-1].name == "step_0000008.png"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.task_name == "smoke" and saved.clip.model_cfg.vision_cfg.layers == 4
    assert not (tmp_path / "outputs").exists()  # hydra.run.dir was honoured

    # The run directory rebuilds the trained module, and the D probe reads it (scores are fractions).
    import torch

    from galip.loading import load_module
    from galip.world.probe import probe_discriminator

    module = load_module(run_dir)
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    for key, value in module.discriminator.state_dict().items():
        assert torch.equal(value, state[f"discriminator.{key}"]), key
    assert not module.training
    result = probe_discriminator(run_dir, n_scenes=4)
    assert set(result) == {"shape", "colour", "position"}
    assert all(v in (0, 0.25, 0.5, 0.75, 1.0) for v in result.values())
    with pytest.raises(FileNotFoundError, match="training run directory"):
        load_module(tmp_path)


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def test_experiment_configs_exist():
    assert "smoke" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name, compose, stub_world_artefacts):
    cfg = compose([f"experiment={name}"])
    validate(cfg)
    for group in ("data", "clip", "model", "optim", "trainer"):
        assert group in cfg, group
    assert "_target_" in cfg.clip and "_target_" in cfg.data and "_target_" in cfg.trainer
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves (outside hydra.runtime)


def test_the_demo_on_a_32_px_clip_draws_64_px_and_trains(compose, stub_world_artefacts):
    """clip=shapes_p4_32: the CLIP reads a 32-px view (8×8 grid of 4-pixel patches), G draws the world's
    64 px, and a GALIP step runs on random CLIP weights (the stubbed path is not loaded)."""
    import torch
    from hydra.utils import instantiate

    from galip.clip import load_clip
    from galip.loading import build_module

    cfg = compose(["+experiment=demo", "clip=shapes_p4_32"])
    validate(cfg)
    vision = cfg.clip.model_cfg.vision_cfg
    assert (vision.image_size, vision.patch_size, cfg.model.generator.image_size) == (32, 4, 64)
    assert cfg.clip.path == "<galip.world.shapes_clip>"
    clip = load_clip(name=None, model_cfg=OmegaConf.to_container(cfg.clip.model_cfg))
    module = build_module(cfg, clip)
    fake = module.generator(torch.randn(2, 100), torch.randn(2, 64))
    assert fake.shape == (2, 3, 64, 64) and clip.geometry.grid == 8
    taps, emb = module.d_input.fake(fake)
    assert taps.shape[-2:] == (8, 8) and emb.shape == (2, 64)
    assert instantiate(cfg.model.generator)(clip=clip).image_size == 64


def test_the_robust_clip_option_asks_for_the_adversarially_pretrained_clip(compose, monkeypatch):
    """clip=shapes_robust resolves through the shapes-CLIP cache with the adversarial pretraining override
    (pretraining is stubbed: the artefact is not shipped)."""
    import galip.world.tiny_clip as pc
    from galip.config import register_resolvers

    asked = []
    monkeypatch.setattr(pc, "ensure", lambda cfg, logs_beside=False: asked.append(cfg) or "<robust clip.pt>")
    register_resolvers(replace=True)
    cfg = compose(["+experiment=demo", "clip=shapes_robust"])
    assert cfg.clip.path == "<robust clip.pt>" and cfg.clip.model_cfg.vision_cfg.patch_size == 8
    (pretrain_cfg,) = asked
    assert pretrain_cfg.loss.adversarial_eps == 1.5 and pretrain_cfg.loss.shape_negatives_weight == 1.0


def test_default_config_composes_and_validates(compose):
    cfg = compose([])
    validate(cfg)
    assert cfg.clip.name == "ViT-B-32-quickgelu" and list(cfg.model.tap_blocks) == [1, 4, 8]
    assert list(cfg.model.generator.prompt_blocks) == [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("form", ["+experiment=smoke", "experiment=smoke"])
def test_both_experiment_forms_select_it(form, compose):
    cfg = compose([form])
    assert cfg.task_name == "smoke"
    assert cfg.clip.model_cfg.vision_cfg.layers == 4


def test_both_forms_compose_to_the_same_config(tmp_path):
    plus = compose_config(["+experiment=smoke"], output_dir=tmp_path)
    bare = compose_config(["experiment=smoke"], output_dir=tmp_path)
    assert OmegaConf.to_container(plus) == OmegaConf.to_container(bare)


def test_plain_hydra_refuses_plus_form_for_slot_groups(tmp_path):
    """Why normalize_slot_overrides exists: a group with a ``null`` default cannot be ``+``-appended."""
    from hydra import compose, initialize_config_dir

    with (
        initialize_config_dir(str(CONF_DIR), version_base="1.3"),
        pytest.raises(ConfigCompositionException, match="experiment"),
    ):
        compose("train", overrides=["+experiment=smoke", f"paths.output_dir={tmp_path}"])


def test_normalize_slot_overrides():
    argv = ["galip/train.py", "+experiment=smoke", "+debug=fast", "+ablation=x", "+trainer.foo=1", "seed=3"]
    assert normalize_slot_overrides(argv) == [
        "galip/train.py",
        "experiment=smoke",
        "debug=fast",
        "ablation=x",
        "+trainer.foo=1",
        "seed=3",
    ]
    assert set(SLOT_GROUPS) == {"experiment", "ablation", "debug", "sweep"}
    assert normalize_slot_overrides(["experiment=smoke", "++experiment=x"]) == [
        "experiment=smoke",
        "++experiment=x",
    ]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.tap_blocks=[1,2,9]", "model.tap_blocks"),
        ("model.tap_blocks=[]", "model.tap_blocks"),
        ("model.tap_blocks=[1,1,2]", "model.tap_blocks"),
        ("model.generator.prompt_blocks=[0,4]", "model.generator.prompt_blocks"),
        ("model.generator.prompt_blocks=[-1]", "model.generator.prompt_blocks"),
    ],
)
def test_validate_rejects_blocks_outside_the_clip(override, key, compose):
    cfg = compose(["+experiment=smoke", override])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_validate_uses_the_clip_depth_not_a_constant(compose):
    validate(compose(["model.tap_blocks=[1,4,11]"]))  # ViT-B/32: 12 blocks
    with pytest.raises(ConfigError, match="model.tap_blocks"):
        validate(compose(["+experiment=smoke", "model.tap_blocks=[1,2,4]"]))  # tiny: 4 blocks


# ---------------------------------------------------------------------------------------------
# Errors from the real command
# ---------------------------------------------------------------------------------------------


def test_bad_tap_blocks_gives_one_line_error_and_exit_2(tmp_path):
    proc = run_train(
        ["+experiment=smoke", "model.tap_blocks=[1,2,9]", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("galip: config error:")]
    assert len(errors) == 1, proc.stderr
    assert "model.tap_blocks" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before anything was built


def test_unknown_experiment_fails_naming_the_group(tmp_path):
    proc = run_train(["+experiment=nope", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode != 0
    assert "experiment" in proc.stderr
    assert "nope" in proc.stderr
