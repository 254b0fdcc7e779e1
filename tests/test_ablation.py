"""Table 3 as configs: every ablation row composes and trains a step, the sweeps, and their summary table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from galip.config import ConfigError, validate
from galip.d_inputs import CLIPTaps, Pixels
from galip.loading import build_module
from galip.models import Discriminator, Generator
from galip.models.baseline import CNNDiscriminator, CNNGenerator, cnn_generator, down_sizes
from galip.models.projected import ProjectedDiscriminator
from galip.sweep_summary import main as summary_main
from galip.sweep_summary import write_summary
from tests.helpers import CONF_DIR, config_file, one_batch_trainer

ABLATIONS = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml"))
COMPONENT_ROWS = ["baseline", "clip_d", "clip_d_ccm_csm", "bridge", "galip"]
# (generator class, discriminator class, D input class, prompted?) of each component row
ROW_PARTS = {
    "baseline": (CNNGenerator, CNNDiscriminator, Pixels, False),
    "clip_d": (CNNGenerator, Discriminator, CLIPTaps, False),
    "clip_d_ccm_csm": (CNNGenerator, ProjectedDiscriminator, CLIPTaps, False),
    "bridge": (Generator, Discriminator, CLIPTaps, False),
    "galip": (Generator, Discriminator, CLIPTaps, True),
}
# The tiny test CLIP with ViT-B/32's 12 blocks, so the paper's tap and prompt rows are all valid.
TWELVE_BLOCKS = "clip.model_cfg.vision_cfg.layers=12"


def sweep_params(name: str) -> dict[str, str]:
    return yaml.safe_load(config_file("sweep", name).read_text())["hydra"]["sweeper"]["params"]


def sweep_values(value: str) -> list[str]:
    """Split a sweep string on the commas outside brackets: "[0],[0,1]" -> ["[0]", "[0,1]"]."""
    out, depth, current = [], 0, ""
    for ch in value:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return [*out, current]


def trained_one_step(cfg) -> tuple:
    """build_module + one batch (two optimizer steps) through a real Trainer; parameters before and after."""
    torch.manual_seed(0)
    clip = instantiate(cfg.clip)
    module = build_module(cfg, clip)
    before = {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith("clip.")}
    trainer = one_batch_trainer()
    trainer.fit(module, datamodule=instantiate(cfg.data, tokenizer=clip.tokenizer))
    return module, trainer, before


def changed(module: torch.nn.Module, before: dict, prefix: str) -> bool:
    after = module.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))


# ---------------------------------------------------------------------------------------------
# Every row composes and trains
# ---------------------------------------------------------------------------------------------


def test_table3_rows_exist():
    paper = [f"taps_{t}" for t in ("2", "5", "12", "2_5", "2_5_12", "2_5_9", "2_5_8_9")]
    paper += [f"prompts_1_{k}" for k in (3, 6, 9, 12)]
    assert set(COMPONENT_ROWS + paper) == set(ABLATIONS)


@pytest.mark.parametrize("name", ABLATIONS)
def test_every_ablation_composes_and_trains_one_step(name, compose):
    cfg = compose(["+experiment=smoke", f"ablation={name}", TWELVE_BLOCKS, "data.batch_size=2"])
    validate(cfg)
    module, trainer, before = trained_one_step(cfg)

    assert trainer.global_step == 2
    for key in ("d/loss", "g/loss", "d/magp"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    assert changed(module, before, "generator."), "G did not train"
    assert changed(module, before, "discriminator."), "D did not train"
    assert module.tap_blocks == tuple(cfg.model.tap_blocks)


@pytest.mark.parametrize("name", COMPONENT_ROWS)
def test_component_rows_build_their_networks(name, compose):
    cfg = compose(["+experiment=smoke", f"ablation={name}"])
    module = build_module(cfg, instantiate(cfg.clip))
    g_cls, d_cls, input_cls, prompted = ROW_PARTS[name]
    assert type(module.generator) is g_cls
    assert type(module.discriminator) is d_cls
    assert type(module.d_input) is input_cls
    assert bool(getattr(module.generator, "prompts", None)) == prompted


def test_paper_tap_and_prompt_rows_are_zero_based_blocks(compose):
    assert list(compose(["ablation=taps_2_5_9"]).model.tap_blocks) == [1, 4, 8]  # the paper's GALIP
    assert list(compose(["ablation=taps_2_5_8_9"]).model.tap_blocks) == [1, 4, 7, 8]
    assert list(compose(["ablation=prompts_1_3"]).model.generator.prompt_blocks) == [0, 1, 2]
    assert list(compose(["ablation=prompts_1_12"]).model.generator.prompt_blocks) == list(range(12))


def test_paper_tap_rows_refuse_the_four_block_clip(compose):
    validate(compose(["ablation=taps_12"]))  # ViT-B/32: fine
    with pytest.raises(ConfigError, match="model.tap_blocks"):
        validate(compose(["+experiment=smoke", "ablation=taps_12"]))


# ---------------------------------------------------------------------------------------------
# The pixel discriminator's step
# ---------------------------------------------------------------------------------------------


def test_baseline_magp_differentiates_wrt_pixels(compose):
    cfg = compose(["+experiment=smoke", "ablation=baseline"])
    torch.manual_seed(0)
    clip = instantiate(cfg.clip)
    module = build_module(cfg, clip)
    with torch.no_grad():  # gates open, so D's conv stack (not only the shortcut) reaches the logits
        for block in module.discriminator.blocks:
            block.gamma.fill_(1.0)
    image, sent = torch.rand(4, 3, 64, 64) * 2 - 1, torch.randn(4, clip.geometry.embed_dim)
    real = module.real_taps(image)
    assert torch.equal(real, image) and not real.requires_grad

    terms = module.discriminator_terms(real, image.flip(0), sent)
    x, s = real.clone().requires_grad_(True), sent.clone().requires_grad_(True)
    gx, gs = torch.autograd.grad(module.discriminator(x, s).sum(), (x, s))
    norm = torch.cat([gx.flatten(1), gs.flatten(1)], dim=1).norm(dim=1)
    torch.testing.assert_close(terms["magp"], cfg.model.loss.magp_k * norm.pow(cfg.model.loss.magp_p).mean())
    assert terms["magp"] > 0


def test_pixel_input_resizes_reals_to_the_generator_size(tiny_clip):
    real = Pixels(tiny_clip).real(torch.rand(2, 3, 96, 96))
    assert real.shape == (2, 3, 64, 64)


# ---------------------------------------------------------------------------------------------
# The baseline and CCM&CSM networks
# ---------------------------------------------------------------------------------------------


def test_cnn_generator_shape_and_range(tiny_clip):
    g = CNNGenerator(tiny_clip, nz=16, ngf=8)
    image = g(torch.randn(3, 16), torch.randn(3, tiny_clip.geometry.embed_dim))
    assert image.shape == (3, 3, 64, 64)
    assert image.abs().max() <= 1.0
    assert [b.size for b in g.blocks] == [4, 8, 16, 32, 64]


def test_cnn_generator_factory_drops_only_galip_keys(tiny_clip):
    g = cnn_generator(tiny_clip, nz=16, ngf=8, code_ch=4, prompt_blocks=[1], use_clip_mapper=True)
    assert isinstance(g, CNNGenerator) and g.nz == 16
    with pytest.raises(TypeError, match="ngff"):
        cnn_generator(tiny_clip, ngff=8)


def test_cnn_discriminator_downsamples_to_a_logit():
    assert down_sizes(64) == [32, 16, 8, 4]
    assert down_sizes(224) == [112, 56, 28, 14, 7]
    d = CNNDiscriminator(image_size=64, embed_dim=32, ndf=8, out_ch=32, hidden=16)
    assert d(torch.randn(5, 3, 64, 64), torch.randn(5, 32)).shape == (5,)


def test_projected_discriminator_mixing_is_fixed_and_top_down():
    torch.manual_seed(0)
    d = ProjectedDiscriminator(width=16, grid=8, embed_dim=8, n_taps=3, out_ch=16, hidden=8)
    frozen = [n for n, p in d.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("ccm.", "csm.")) for n in frozen)
    assert all(p.requires_grad for n, p in d.named_parameters() if n.startswith(("blocks.", "assessors.")))

    taps = torch.randn(2, 3, 16, 8, 8)
    levels = d.csm(d.ccm(taps))
    deep, shallow = taps.clone(), taps.clone()
    deep[:, 2] += 1.0  # the deepest tap reaches every level
    shallow[:, 0] += 1.0  # the shallowest only its own
    moved_deep = [not torch.allclose(a, b) for a, b in zip(levels, d.csm(d.ccm(deep)), strict=True)]
    moved_shallow = [not torch.allclose(a, b) for a, b in zip(levels, d.csm(d.ccm(shallow)), strict=True)]
    assert moved_deep == [True, True, True]
    assert moved_shallow == [True, False, False]
    assert d(taps, torch.randn(2, 8)).shape == (2,)


# ---------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------


def test_table3_sweep_runs_the_component_rows_with_a_summary(compose):
    assert sweep_values(sweep_params("table3")["ablation"]) == COMPONENT_ROWS
    cfg = compose(["sweep=table3"])
    assert cfg.task_name == "table3"


@pytest.mark.parametrize(("sweep", "row_prefix"), [("taps", "taps_"), ("prompts", "prompts_")])
def test_paper_sweeps_name_existing_rows(sweep, row_prefix):
    rows = sweep_values(sweep_params(sweep)["ablation"])
    assert sorted(rows) == sorted(a for a in ABLATIONS if a.startswith(row_prefix))


@pytest.mark.parametrize(
    ("sweep", "key"), [("taps_world", "model.tap_blocks"), ("prompts_world", "model.generator.prompt_blocks")]
)
def test_world_sweeps_are_valid_on_the_four_block_clip(sweep, key, compose, stub_world_artefacts):
    values = sweep_values(sweep_params(sweep)[key])
    assert len(values) == len(set(values)) >= 4
    for value in values:
        validate(compose(["+experiment=demo", f"sweep={sweep}", f"{key}={value}"]))


@pytest.mark.parametrize("name", COMPONENT_ROWS)
@pytest.mark.parametrize("experiment", ["demo", "demo_full"])
def test_component_rows_validate_on_the_embedded_world(name, experiment, compose, stub_world_artefacts):
    cfg = compose([f"+experiment={experiment}", "sweep=table3", f"ablation={name}"])
    validate(cfg)
    # a row changes the model, never the world it is trained on (32 px: the demo's; 64 px: the full one's)
    assert cfg.data.image_size == {"demo": 32, "demo_full": 64}[experiment] and cfg.task_name == "table3"
    assert cfg.data.world == compose([f"+experiment={experiment}"]).data.world


def write_run(root: Path, name: str, overrides: list[str], judge: list[dict] | None) -> None:
    (root / name / ".hydra").mkdir(parents=True)
    (root / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if judge is not None:
        lines = [
            json.dumps(
                {
                    "batch": i + 1,
                    "kimg": 0.5 * (i + 1),
                    "metrics": {f"eval/{k}": v for k, v in m.items()},
                }
            )
            for i, m in enumerate(judge)
        ]
        (root / name / "evaluation.jsonl").write_text("\n".join(lines) + "\n")


def test_summary_table_holds_each_runs_final_judge_metrics(tmp_path):
    common = ["experiment=demo", "sweep=table3"]
    write_run(
        tmp_path,
        "10",
        [*common, "ablation=galip"],
        [{"judge/acc": 0.1}, {"judge/acc": 0.9, "judge/fd": 512.0}],
    )
    write_run(tmp_path, "2", [*common, "ablation=baseline"], [{"judge/acc": 0.25, "judge/fd": 20000.0}])
    write_run(tmp_path, "3", [*common, "ablation=bridge"], None)

    table = write_summary(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert table in md and "No evaluation.jsonl (or an empty one) in: 3" in md
    assert "| 2 | ablation=baseline | 1 | 0.500 | 0.250 | 20,000 |" in md
    assert "| 10 | ablation=galip | 2 | 1.000 | 0.900 | 512 |" in md  # the last line, job order 2 < 3 < 10

    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert rows[0] == "run,overrides,batch,kimg,judge/acc,judge/fd"
    assert rows[1:] == [
        "2,ablation=baseline,1,0.5,0.25,20000.0",
        "3,ablation=bridge,,,,",
        "10,ablation=galip,2,1.0,0.9,512.0",
    ]


def test_summary_cli(tmp_path, capsys):
    assert summary_main([str(tmp_path)]) == 1
    assert "no runs" in capsys.readouterr().err
    write_run(tmp_path, "0", ["model.tap_blocks=[1]"], [{"judge/acc": 0.5}])
    assert summary_main([str(tmp_path)]) == 0
    assert "| 0 | model.tap_blocks=[1] |" in capsys.readouterr().out


def test_multirun_over_two_tap_choices_gives_two_runs_and_a_summary(tmp_path):
    """The real command: ``-m`` over two tap choices -> two run directories and summary.md with two rows."""
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "GALIP_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    args = ["-m", "+experiment=smoke", "+sweep=summary", "model.tap_blocks=[1],[1,2]"]
    args += [f"hydra.sweep.dir={sweep_dir}", "kimg=0.004"]  # one batch of 4
    proc = subprocess.run(
        [sys.executable, "-m", "galip.train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert runs == ["0", "1"]
    taps = [OmegaConf.load(sweep_dir / r / ".hydra" / "config.yaml").model.tap_blocks for r in runs]
    assert [list(t) for t in taps] == [[1], [1, 2]]
    assert all((sweep_dir / r / "checkpoints" / "last.ckpt").is_file() for r in runs)
    md = (sweep_dir / "summary.md").read_text()
    assert "| 0 | model.tap_blocks=[1] |" in md and "| 1 | model.tap_blocks=[1,2] |" in md
    assert str(sweep_dir / "summary.md") in proc.stdout
