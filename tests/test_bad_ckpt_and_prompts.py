"""What a user may hand the entry points by mistake: a ``.ckpt`` that is not a usable galip checkpoint (truncated,
empty, garbage, another program's) given to resume, evaluate and sample is a one-line error naming the file; and
prompts that are empty or not ASCII reach the sampler as they were typed."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from galip import evaluate
from galip import sample as sample_cli
from galip.checkpoints import export_generator
from galip.config import ConfigError, compose
from galip.models import Generator
from galip.sampling import Sampler
from galip.train import train
from tests.helpers import TINY_CLIP_CFG, compose_config


@pytest.fixture(scope="module")
def bad_ckpts(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("bad")
    whole = folder / "whole.ckpt"
    torch.save({"state_dict": {"generator.w": torch.randn(4096)}, "galip_version": "0.1.0"}, whole)
    files = {
        "truncated": whole.read_bytes()[
            : whole.stat().st_size // 2
        ],  # a kill mid-save, without atomic writes
        "empty": b"",
        "garbage": bytes(range(256)) * 16,
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.ckpt"
        paths[name].write_bytes(data)
    paths["foreign"] = folder / "foreign.ckpt"
    torch.save({"model": {"netG": {}}, "epoch": 3}, paths["foreign"])  # loads, but galip did not write it
    return paths


BAD = ["truncated", "empty", "garbage", "foreign"]


@pytest.mark.parametrize("bad", BAD)
def test_resume_from_a_bad_ckpt_is_a_config_error_naming_it(bad_ckpts, bad, tmp_path):
    path = bad_ckpts[bad]
    cfg = compose_config(["+experiment=smoke", f"ckpt_path={path}"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError) as error:
        train(cfg)
    message = str(error.value)
    assert f"ckpt_path={path}" in message and "\n" not in message
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("bad", BAD)
def test_evaluate_a_bad_ckpt_is_a_one_line_error(bad_ckpts, bad, monkeypatch, capsys):
    # the data and metrics are checked before G is loaded: pass them, so the file is what fails
    monkeypatch.setattr(evaluate, "check_data", lambda cfg: None)
    monkeypatch.setattr(evaluate, "evaluators", lambda cfg: {})
    cfg = OmegaConf.create({"ckpt": str(bad_ckpts[bad]), "device": "cpu", "seed": 0, "run_config": None})
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"galip: {bad_ckpts[bad]} is not a") and "\n" not in err


@pytest.mark.parametrize("bad", BAD)
def test_sample_from_a_bad_ckpt_is_a_one_line_error(bad_ckpts, bad, tmp_path, capsys):
    cfg = compose("sample", [f"ckpt={bad_ckpts[bad]}", f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"galip: {bad_ckpts[bad]} is not a") and "\n" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Prompts: empty ones are errors (tests/test_sampling.py), non-ASCII ones are prompts like any other
# ---------------------------------------------------------------------------------------------
NON_ASCII = ["un oiseau à tête rouge", "红色的鸟", "🐦 a bird", "Ünïcödé café — naïve"]


@pytest.fixture(scope="module")
def export_path(tiny_clip, tmp_path_factory):
    torch.manual_seed(0)
    g = Generator(tiny_clip, ngf=16, prompt_blocks=[1, 2])
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("export") / "generator.safetensors"
    return export_generator(g, path, {"name": None, "model_cfg": TINY_CLIP_CFG})


def test_non_ascii_prompts_condition_g_like_any_other(export_path):
    sampler = Sampler.from_file(export_path)
    images = sampler.generate(NON_ASCII, n=2, seed=1)
    assert images.shape == (8, 3, 64, 64) and torch.isfinite(images).all()
    # each prompt is its own sentence vector (the tokenizer did not reduce them all to one unknown token)
    vectors = sampler.sentence_vectors(NON_ASCII)
    assert len({tuple(v.tolist()) for v in vectors}) == len(NON_ASCII)


@pytest.mark.parametrize("prompts", ["''", "'   '", '["a red circle",""]'])
def test_sample_cli_with_an_empty_prompt_is_a_one_line_error(export_path, prompts, tmp_path, capsys):
    cfg = compose("sample", [f"ckpt={export_path}", f"prompts={prompts}", f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as exit_info:
        sample_cli.main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("galip: prompt ") and "is empty" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_sample_cli_with_non_ascii_prompts_writes_them_back_unchanged(export_path, tmp_path):
    out = tmp_path / "out"
    prompts = "[" + ",".join(f'"{p}"' for p in NON_ASCII) + "]"
    grid = sample_cli.sample(
        compose("sample", [f"ckpt={export_path}", f"prompts={prompts}", "n=1", f"out_dir={out}"])
    )
    assert grid.is_file()
    assert (out / "prompts.txt").read_text(encoding="utf-8").splitlines() == NON_ASCII
    assert sorted(p.name for p in out.glob("*_0000.png")) == [
        f"{i:03d}_0000.png" for i in range(len(NON_ASCII))
    ]
