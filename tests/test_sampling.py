"""Sampling from a generator export: determinism, ordering, interpolation endpoints, image files, the CLIs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import galip
from galip.checkpoints import export_generator
from galip.models import Generator
from galip.sampling import (
    Sampler,
    interpolate_noise,
    interpolate_prompts,
    lerp_weights,
    save_gif,
    save_grid,
    save_singles,
    slerp,
    truncate,
)
from tests.helpers import CONF_DIR, TINY_CLIP_CFG, run_module

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
SIZE = 64  # the tiny CLIP's input size, hence the generator's output size


@pytest.fixture(scope="module")
def export_path(tiny_clip, tmp_path_factory) -> Path:
    """A tiny generator (ngf=16) with every weight moved off its init, exported once for this module."""
    torch.manual_seed(0)
    g = Generator(tiny_clip, ngf=16, prompt_blocks=[1, 2])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    spec = {"name": None, "model_cfg": TINY_CLIP_CFG}
    return export_generator(g, tmp_path_factory.mktemp("export") / "generator.safetensors", spec)


@pytest.fixture(scope="module")
def sampler(export_path) -> Sampler:
    return Sampler.from_export(export_path)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to batching (a conv over 1 or 16 rows may sum in another order; oneDNN's channels_last
    kernels, the sampler's default, pick their blocking by batch size: differences of ~1e-5 on [-1, 1])."""
    torch.testing.assert_close(a, b, rtol=0, atol=5e-5)


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


def test_generate_is_deterministic_for_a_seed(sampler):
    a = sampler.generate(PROMPTS[:2], n=2, seed=7)
    b = sampler.generate(PROMPTS[:2], n=2, seed=7)
    assert torch.equal(a, b)
    c = sampler.generate(PROMPTS[:2], n=2, seed=8)
    assert (a - c).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image changes with the seed


def test_generate_is_batch_size_independent(sampler):
    one = sampler.generate(PROMPTS[:2], n=2, seed=3, batch_size=1)
    many = sampler.generate(PROMPTS[:2], n=2, seed=3, batch_size=16)
    odd = sampler.generate(PROMPTS[:2], n=2, seed=3, batch_size=3)  # a ragged last batch
    close(one, many)
    close(odd, many)


def test_generate_shape_order_and_range(sampler):
    n, seed = 3, 11
    images = sampler.generate(PROMPTS[:2], n=n, seed=seed)
    assert images.shape == (2 * n, 3, SIZE, SIZE)
    assert images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    # prompt-major: rows [p0 × n, p1 × n], each with its own row of the seed's noise
    sent, noise = sampler.sentence_vectors(PROMPTS[:2]), sampler.noise(2 * n, seed)
    for p in range(2):
        rows = slice(p * n, (p + 1) * n)
        expected = sampler.from_vectors(sent[p : p + 1].expand(n, -1), noise[rows])
        close(images[rows], expected)
    assert not torch.allclose(images[0], images[1])  # different noise within a prompt
    assert not torch.allclose(images[0], images[n])  # same noise row index, other prompt


def test_load_generator_returns_a_sampler(export_path, sampler):
    loaded = galip.load_generator(export_path)
    assert isinstance(loaded, Sampler)
    assert loaded.device == torch.device("cpu")
    assert torch.equal(loaded.generate(PROMPTS[:1], n=2, seed=1), sampler.generate(PROMPTS[:1], n=2, seed=1))


# ---------------------------------------------------------------------------------------------
# Interpolation
# ---------------------------------------------------------------------------------------------


def test_prompt_interpolation_endpoints_are_the_prompts_samples(sampler):
    seed, steps = 4, 5
    images = interpolate_prompts(sampler, PROMPTS[:2], steps=steps, seed=seed)
    assert images.shape == (steps, 3, SIZE, SIZE)
    sent, noise = sampler.sentence_vectors(PROMPTS[:2]), sampler.noise(1, seed)
    for index, p in ((0, 0), (-1, 1)):
        close(images[index], sampler.from_vectors(sent[p : p + 1], noise)[0])
        close(images[index], sampler.generate([PROMPTS[p]], n=1, seed=seed)[0])
    assert not torch.allclose(images[0], images[steps // 2])


def test_four_prompt_grid_corners(sampler):
    seed, steps = 2, 3
    images = interpolate_prompts(sampler, PROMPTS, steps=steps, seed=seed)
    assert images.shape == (steps * steps, 3, SIZE, SIZE)
    corners = [0, steps - 1, steps * (steps - 1), steps * steps - 1]  # reading order
    direct = torch.cat([sampler.generate([p], n=1, seed=seed) for p in PROMPTS])
    for corner, expected in zip(corners, direct, strict=True):
        close(images[corner], expected)


def test_noise_interpolation_endpoints_are_the_seeds_samples(sampler):
    steps, seeds = 4, (5, 6)
    images = interpolate_noise(sampler, PROMPTS[0], steps=steps, seeds=seeds)
    assert images.shape == (steps, 3, SIZE, SIZE)
    sent = sampler.sentence_vectors(PROMPTS[:1])
    close(images[0], sampler.from_vectors(sent, sampler.noise(1, seeds[0]))[0])
    close(images[-1], sampler.from_vectors(sent, sampler.noise(1, seeds[1]))[0])
    close(images[0], sampler.generate(PROMPTS[:1], n=1, seed=seeds[0])[0])


def test_slerp_endpoints_and_norm():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 100, generator=gen), torch.randn(1, 100, generator=gen)
    out = slerp(a.expand(9, -1), b.expand(9, -1), lerp_weights(9))
    torch.testing.assert_close(out[0], a[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[-1], b[0], rtol=1e-6, atol=1e-7)
    # between equal-norm endpoints slerp stays on the sphere (a lerp would shrink towards the middle)
    b = b / b.norm() * a.norm()
    out = slerp(a.expand(9, -1), b.expand(9, -1), lerp_weights(9))
    torch.testing.assert_close(out.norm(dim=-1), a.norm().expand(9), rtol=1e-5, atol=0)


def test_slerp_endpoints_are_bitwise_exact():
    misses = 0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        a, b = torch.randn(1, 100, generator=gen), torch.randn(1, 100, generator=gen)
        out = slerp(a.expand(3, -1), b.expand(3, -1), lerp_weights(3))
        misses += (not torch.equal(out[0], a[0])) + (not torch.equal(out[-1], b[0]))
    assert misses == 0


def test_interpolation_takes_two_or_four_prompts(sampler):
    with pytest.raises(ValueError, match="2 or 4 prompts, got 3"):
        interpolate_prompts(sampler, PROMPTS[:3], steps=2)
    with pytest.raises(ValueError, match="got 1"):
        interpolate_prompts(sampler, PROMPTS[:1], steps=2)


# ---------------------------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------------------------


def random_images(count: int, size: int = 16) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(count)) * 2 - 1


@pytest.mark.parametrize(("bounce", "frames"), [(True, 4 + 2), (False, 4)])
def test_save_gif_is_animated(tmp_path, bounce, frames):
    path = save_gif(random_images(4), tmp_path / "deep" / "walk.gif", bounce=bounce)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.is_animated
        assert gif.n_frames == frames
        assert gif.size == (16, 16)


def test_save_grid_and_singles(tmp_path):
    images = random_images(6)
    grid = save_grid(images, tmp_path / "a" / "grid.png", nrow=3)
    with Image.open(grid) as im:
        assert im.size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)  # torchvision's 2 px padding
    singles = save_singles(images, tmp_path / "b", stem="001")
    assert [p.name for p in singles] == [f"001_{i:04d}.png" for i in range(6)]
    for path in singles:
        with Image.open(path) as im:
            assert im.size == (16, 16) and im.mode == "RGB"


# ---------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------


def test_sample_cli(export_path, tmp_path):
    out = tmp_path / "samples"
    proc = run_module(
        "galip.sample", [f"ckpt={export_path}", 'prompts=["a","b"]', "n=2", f"out_dir={out}"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "000_0000.png",
        "000_0001.png",
        "001_0000.png",
        "001_0001.png",
        "grid.png",
        "prompts.txt",
    ]
    assert (out / "prompts.txt").read_text() == "a\nb\n"
    with Image.open(out / "grid.png") as im:  # the images, and the prompts written to the left of their rows
        assert im.size[1] == 2 * SIZE + 3 * 2 and im.size[0] > 2 * SIZE + 3 * 2
    assert "4 images (2 per prompt, seed 0)" in proc.stdout
    assert not (tmp_path / "outputs").exists()  # hydra.run.dir is "." and no .hydra subdir


def test_sample_cli_missing_checkpoint(tmp_path):
    missing = tmp_path / "nope.safetensors"
    proc = run_module("galip.sample", [f"ckpt={missing}", f"out_dir={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("galip: ") and "nope.safetensors: no such file or directory" in lines[0]
    assert str(missing) in lines[0]
    assert not (tmp_path / "out").exists()


def test_interpolate_cli(export_path, tmp_path):
    out = tmp_path / "interp"
    args = [f"ckpt={export_path}", 'prompts=["a red circle","a blue square"]', "steps=3", f"out_dir={out}"]
    proc = run_module("galip.interpolate", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "interpolation.gif"]
    with Image.open(out / "grid.png") as im:
        assert im.size == (3 * SIZE + 4 * 2, SIZE + 2 * 2)
    with Image.open(out / "interpolation.gif") as gif:
        assert gif.n_frames >= 3 and gif.size == (SIZE, SIZE)


@pytest.mark.parametrize("name", ["sample", "interpolate"])
def test_cli_missing_export_in_process(name, tmp_path, capsys):
    """The same one-line error through ``main(cfg)`` (Hydra runs a passed config directly)."""
    import importlib

    cli = importlib.import_module(f"galip.{name}")
    cfg = compose_cli(name, [f"ckpt={tmp_path / 'nope.safetensors'}", f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("galip: ") and "nope.safetensors: no such file or directory" in err and "\n" not in err
    )


@pytest.mark.parametrize("name", ["sample", "interpolate"])
def test_cli_without_ckpt_is_a_one_line_error(name, tmp_path, capsys):
    import importlib

    cli = importlib.import_module(f"galip.{name}")
    cfg = compose_cli(name, [f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("galip: ") and "ckpt" in err and "\n" not in err


def compose_cli(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


# ---------------------------------------------------------------------------------------------
# What a newcomer types: one prompt as a string, empty or long prompts, default output places
# ---------------------------------------------------------------------------------------------


def test_a_prompt_string_is_one_prompt(sampler):
    one = sampler.generate("a red circle", n=2, seed=3)
    assert one.shape[0] == 2
    close(one, sampler.generate(["a red circle"], n=2, seed=3))


@pytest.mark.parametrize(
    ("prompts", "n", "message"),
    [([], 1, "no prompts"), (["a red circle", "  "], 1, "prompt 1 is empty"), ("a red circle", 0, "n=0")],
)
def test_empty_prompts_and_no_images_are_errors(sampler, prompts, n, message):
    with pytest.raises(ValueError, match=message):
        sampler.generate(prompts, n=n)


def test_a_prompt_longer_than_clip_reads_warns_with_the_lost_words(sampler):
    long = " ".join(["red"] * 80) + " circle"
    with pytest.warns(
        UserWarning, match=r"prompt 0 is 81 tokens; CLIP reads the first 75, so 'red .*circle' is cut"
    ):
        sampler.generate(long)


def test_sample_cli_one_prompt_default_place_and_readable_export(export_path, tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    assert export_path.stat().st_mode & 0o777 == 0o666 & ~mask  # not safetensors' 0600
    proc = run_module("galip.sample", [f"ckpt={export_path}", "prompts=a red circle", "n=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (tmp_path / "outputs" / "sample").iterdir()  # outputs/sample/<time>/, git-ignored like every run
    assert (out / "prompts.txt").read_text() == "a red circle\n"
    assert sorted(p.name for p in out.iterdir()) == ["000_0000.png", "grid.png", "prompts.txt"]
    assert not (tmp_path / "samples").exists()


def test_sample_cli_empty_prompt_is_a_one_line_error(export_path, tmp_path):
    proc = run_module("galip.sample", [f"ckpt={export_path}", "prompts=[]"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "galip: no prompts given: pass at least one, e.g. prompts='a red circle'"
    ]
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------------------
# Truncation ψ: the noise scaled toward the prior's mean (0)
# ---------------------------------------------------------------------------------------------


def test_truncation_scales_the_noise_toward_the_mean(sampler):
    z = sampler.noise(5, seed=3)
    for psi in (1.0, 0.7, 0.25, 0.0):
        torch.testing.assert_close(sampler.noise(5, seed=3, truncation=psi), psi * z, rtol=0, atol=0)
    assert torch.equal(truncate(z, 0.5, mean=torch.ones(z.shape[-1])), 1 + 0.5 * (z - 1))


def test_truncated_generate_is_g_of_the_scaled_noise(sampler):
    images = sampler.generate(PROMPTS[:2], n=3, seed=4, truncation=0.7)
    sent = sampler.sentence_vectors(PROMPTS[:2]).repeat_interleave(3, dim=0)
    close(images, sampler.from_vectors(sent, 0.7 * sampler.noise(6, seed=4)))
    assert not torch.allclose(images, sampler.generate(PROMPTS[:2], n=3, seed=4), atol=1e-3)


def test_truncation_zero_is_the_same_image_for_every_seed(sampler):
    a = sampler.generate(PROMPTS[0], n=3, seed=0, truncation=0.0)
    b = sampler.generate(PROMPTS[0], n=1, seed=99, truncation=0.0)
    close(a, b.expand_as(a))


@pytest.mark.parametrize("psi", [-0.1, 1.5])
def test_truncation_outside_0_1_is_an_error(sampler, psi):
    with pytest.raises(ValueError, match=r"ψ must be in \[0, 1\]"):
        sampler.generate(PROMPTS[0], truncation=psi)


def test_sample_cli_truncation(export_path, tmp_path, sampler):
    from galip.sample import sample

    cfg = compose_cli("sample", [f"ckpt={export_path}", "prompts=a red circle", "n=2", "truncation=0.5"])
    cfg.out_dir = str(tmp_path / "out")
    sample(cfg)
    expected = sampler.generate("a red circle", n=2, seed=0, truncation=0.5)
    with Image.open(tmp_path / "out" / "000_0001.png") as im:
        png = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()
    torch.testing.assert_close(png, ((expected[1] + 1) * 127.5).round().clamp(0, 255), rtol=0, atol=1.0)
