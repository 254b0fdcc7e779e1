"""The training entry point: the real command end to end, every experiment config, and config errors."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from galip.config import SLOT_GROUPS, ConfigError, check_run_length, normalize_slot_overrides, validate
from galip.train import train
from tests.helpers import CONF_DIR, compose_config, config_names, run_train, train_in

EXPERIMENTS = config_names("experiment")


def test_smoke_experiment_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(["+experiment=smoke", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    last = run_dir / "checkpoints" / "last.ckpt"
    grids = sorted((run_dir / "samples").glob("kimg*.png"))
    assert last.is_file()
    assert grids, f"no sample grid in {run_dir / 'samples'}"
    assert str(last) in proc.stdout
    assert str(grids[-1]) in proc.stdout
    assert f"run directory: {run_dir}" in proc.stdout
    # 4 batches of 4: the end-of-training grid is named after the images seen, as the checkpoints are
    assert grids[-1].name == "kimg000000.016.png"
    assert (run_dir / "checkpoints" / "kimg000000.016.ckpt").is_file()
    assert (
        "kimg 0.016/0.016: 100%" in proc.stdout and "4/4" in proc.stdout
    )  # one bar over the run, not per epoch
    assert "Epoch" not in proc.stdout
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.task_name == "smoke" and saved.clip.model_cfg.vision_cfg.layers == 4
    assert not (tmp_path / "outputs").exists()  # hydra.run.dir was honoured
    # no library message a user cannot act on (galip.quiet names each and why)
    console = proc.stdout + proc.stderr
    for noise in ("litlogger", "in eval mode", "LeafSpec", "no `validation_step`", "weights_only"):
        assert noise not in console, noise

    # The run directory rebuilds the trained module, and the D probe reads it (scores are fractions).
    import torch

    from galip.loading import load_module
    from galip.world.probe import probe_discriminator

    module = load_module(run_dir)
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    for key, value in module.discriminator.state_dict().items():
        assert torch.equal(value, state[f"discriminator.{key}"]), key
    assert not module.training
    # moved out of its run directory, the checkpoint still loads (it carries its run's config) ...
    alone = tmp_path / "elsewhere" / "moved.ckpt"
    alone.parent.mkdir()
    alone.write_bytes(last.read_bytes())
    moved = load_module(alone)
    for key, value in moved.generator.state_dict().items():
        assert torch.equal(value, state[f"generator.{key}"]), key
    # ... and a .ckpt that galip did not write is named as such, before any config is looked for
    foreign = tmp_path / "elsewhere" / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="is not a galip training checkpoint"):
        load_module(foreign)
    result = probe_discriminator(run_dir, n_scenes=4)
    assert set(result) == {"shape", "colour", "size", "position"}  # what the full world's captions name
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


def test_the_demo_draws_its_world_at_32_px_through_a_4_pixel_patch_clip(compose, stub_world_artefacts):
    """+experiment=demo: data=shapes_demo (one object in the centre, 32 px) and clip=shapes_demo (a 32-px CLIP,
    8×8 grid of 4-pixel patches); G draws the world's 32 px and a GALIP step's shapes hold on random CLIP
    weights (the stubbed path is not loaded)."""
    import torch
    from hydra.utils import instantiate

    from galip.clip import load_clip
    from galip.loading import build_module
    from galip.world.scenes import World

    cfg = compose(["+experiment=demo"])
    validate(cfg)
    assert cfg.task_name == "demo" and cfg.kimg == 51.2
    vision = cfg.clip.model_cfg.vision_cfg
    assert (vision.image_size, vision.patch_size, cfg.data.image_size, cfg.model.generator.image_size) == (
        32,
        4,
        32,
        32,
    )
    world = World.from_config(cfg.data.world)
    assert not world.is_full and world.positions == ("centre",) and world.max_objects == 1
    assert "cross" in world.shapes
    assert cfg.clip.path == "<galip.world.shapes_clip>"
    clip = load_clip(name=None, model_cfg=OmegaConf.to_container(cfg.clip.model_cfg))
    module = build_module(cfg, clip)
    fake = module.generator(torch.randn(2, 100), torch.randn(2, 64))
    assert fake.shape == (2, 3, 32, 32) and clip.geometry.grid == 8
    taps, emb = module.d_input.fake(fake)
    assert taps.shape[-2:] == (8, 8) and emb.shape == (2, 64)
    assert instantiate(cfg.model.generator)(clip=clip).image_size == 32


def test_demo_full_is_the_demo_on_the_full_world(compose, stub_world_artefacts):
    """+experiment=demo_full: the demo's model, optimiser, trainer and judge on data=shapes (the full world,
    64 px) with the 64-px shapes CLIP (clip=shapes) and the default (shipped) judge."""
    full, demo = compose(["+experiment=demo_full"]), compose(["+experiment=demo"])
    validate(full)
    assert full.task_name == "demo_full" and full.kimg == 25.6
    assert full.data.world is None and full.data.image_size == 64 == full.model.generator.image_size
    vision = full.clip.model_cfg.vision_cfg
    assert (vision.image_size, vision.patch_size) == (64, 8)
    judge = full.callbacks.evaluation.evaluators.judge
    assert judge.world is None and judge.image_size == 64
    assert demo.callbacks.evaluation.evaluators.judge.world == demo.data.world
    for key in ("model", "optim", "trainer", "callbacks.evaluation", "callbacks.checkpoint"):
        a, b = (OmegaConf.to_container(OmegaConf.select(c, key), resolve=False) for c in (full, demo))
        assert a == b, key
    assert full.data.batch_size == demo.data.batch_size and full.data.num_workers == demo.data.num_workers


@pytest.mark.parametrize(
    ("experiment", "pretraining"), [("demo", "shapes_demo_clip"), ("demo_full", "shapes_clip")]
)
def test_each_demo_asks_for_the_clip_pretrained_on_its_world(experiment, pretraining, compose, monkeypatch):
    """clip.path resolves through the shapes-CLIP cache with that pretraining experiment, whose world and image
    size are the run's data's (pretraining is stubbed: the demo's CLIP is not shipped)."""
    import galip.world.tiny_clip as pc
    from galip.config import register_resolvers
    from galip.world.scenes import World

    asked = []
    monkeypatch.setattr(pc, "ensure", lambda cfg, logs_beside=False: asked.append(cfg) or "<clip.pt>")
    register_resolvers(replace=True)
    try:
        cfg = compose([f"+experiment={experiment}"])
        assert cfg.clip.path == "<clip.pt>"
    finally:
        register_resolvers(replace=True)  # forget the cached stubbed value
    (pretrain_cfg,) = asked
    assert pc.compose_config([f"experiment={pretraining}"]) == pretrain_cfg
    assert World.from_config(pretrain_cfg.data.get("world")) == World.from_config(cfg.data.world)
    assert pretrain_cfg.data.image_size == cfg.data.image_size
    assert pc.architecture(pretrain_cfg) == OmegaConf.to_container(cfg.clip.model_cfg)
    assert pretrain_cfg.loss.shape_negatives_weight > 0  # the recipe's shape negatives, on the world's shapes
    assert tuple(pc.build_module(pretrain_cfg).hparams.shapes) == World.from_config(cfg.data.world).shapes


def test_the_demo_runs_a_few_steps_without_pretrained_artefacts(tmp_path, untrained_world_artefacts):
    """+experiment=demo trains and is judged on its own world (a random CLIP and an untrained judge of that world
    stand in for its artefacts; shards are written): the judge reports the attributes its captions name."""
    import json

    cfg = compose_config(
        [
            "+experiment=demo",
            "data.n_train=16",
            "data.n_val=8",
            "data.batch_size=8",
            "kimg=0.016",  # 2 batches of 8
            "callbacks.evaluation.every_n_kimg=0.016",
            "callbacks.evaluation.evaluators.judge.n_samples=8",
            "callbacks.sample_grid.every_n_kimg=0",
        ],
        output_dir=tmp_path / "run",
    )
    train_in(cfg, tmp_path)
    assert len(untrained_world_artefacts["clip"]) == len(untrained_world_artefacts["judge"]) == 1
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    (line,) = [json.loads(x) for x in (tmp_path / "run" / "evaluation.jsonl").read_text().splitlines()]
    judged = {k.removeprefix("eval/judge/") for k in line["metrics"] if k.startswith("eval/judge/acc")}
    assert judged == {"acc", "acc_shape", "acc_colour", "acc_size", "acc_background", "acc_count"}


def test_default_config_composes_and_validates(compose):
    cfg = compose([])
    validate(cfg)
    assert cfg.clip.name == "ViT-B-32-quickgelu" and list(cfg.model.tap_blocks) == [1, 4, 8]
    assert list(cfg.model.generator.prompt_blocks) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_run_without_a_length_is_one_line(compose):
    """Experiments give ``kimg``; the bare root config has no run length and says what to give."""
    with pytest.raises(ConfigError, match=r"no run length: give kimg=<thousands of images>"):
        train(compose([]))
    check_run_length(compose(["kimg=null", "trainer.max_epochs=2"]))


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
    assert not (tmp_path / "run").exists()  # failed before anything was built, and left no empty run dir


@pytest.mark.parametrize(
    ("typo", "says"),
    [
        (
            "+model.tap_block=[1]",
            "unknown key model.tap_block: galip.module.GALIPModule takes no 'tap_block'; "
            "did you mean model.tap_blocks?",
        ),
        ("+model.generator.ngff=8", "did you mean model.generator.ngf?"),
        ("+trainer.max_step=3", "did you mean trainer.max_steps?"),
        ("+callbacks.sample_grid.nper=3", "(its keys: captions, dirpath, every_n_kimg,"),
    ],
)
def test_a_typo_in_a_config_key_stops_before_anything_is_built(tmp_path, typo, says):
    """Hydra's advice for an unknown key is to add it with ``+``; that must not train with the default."""
    proc = run_train(["+experiment=smoke", typo, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("galip: config error:")]
    assert len(errors) == 1 and says in errors[0], proc.stderr
    assert not (tmp_path / "run").exists()  # no empty run directory left behind


def test_every_shipped_experiment_and_component_row_passes_the_key_check():
    from galip.config import check_target_keys

    for name in config_names("experiment"):
        check_target_keys(compose_config([f"+experiment={name}"]))
    for row in config_names("ablation"):
        check_target_keys(compose_config(["+experiment=cub", f"ablation={row}"]))


def test_unknown_experiment_fails_naming_the_group(tmp_path):
    proc = run_train(["+experiment=nope", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode != 0
    assert "experiment" in proc.stderr
    assert "nope" in proc.stderr
