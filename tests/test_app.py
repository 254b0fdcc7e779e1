"""The web page's actions without a browser (`galip.app.Playground`), its page builds, and its command line's
one-line errors. The browser drives the served page in test_app_browser.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from galip.app import MAX_IMAGES, Playground, build_page, load_sampler
from tests.test_sampling import compose_cli, export_path, sampler  # noqa: F401  (module fixtures)


@pytest.fixture(scope="module")
def play(sampler, tmp_path_factory):  # noqa: F811
    return Playground(sampler, "tiny", tmp_path_factory.mktemp("app"))


def test_generate_gives_n_pngs_a_seed_each_and_the_time(play):
    images, seeds, files, status = play.generate("a red circle", 3, 7, 1.0)
    assert images.shape == (3, 3, 64, 64) and seeds == [7, 8, 9]
    assert status.startswith("3 images in ") and status.endswith(" s on cpu")
    for path in files:
        with Image.open(path) as im:
            assert im.size == (64, 64) and im.format == "PNG"


def test_the_seed_under_an_image_draws_it_again(play):
    """Image i of seed s is image 0 of seed s + i, and the sampler's first noise of that seed."""
    batch, *_ = play.generate("a red circle", 4, 10, 0.8)
    again, *_ = play.generate("a red circle", 1, 12, 0.8)
    torch.testing.assert_close(batch[2], again[0], rtol=0, atol=5e-5)
    alone = play.sampler.generate("a red circle", n=1, seed=12, truncation=0.8)
    torch.testing.assert_close(again, alone, rtol=0, atol=5e-5)


def test_interpolation_slider_ends_are_the_strip_ends(play):
    strip = play.prompt_frames("a red circle", "a blue square", torch.linspace(0, 1, 3), 5)
    ends = play.prompt_frames("a red circle", "a blue square", [0.0, 1.0], 5)
    torch.testing.assert_close(ends, strip[[0, 2]], rtol=0, atol=5e-5)
    a, *_ = play.generate("a blue square", 1, 5)
    torch.testing.assert_close(ends[1], a[0], rtol=0, atol=5e-5)
    noise = play.noise_frames("a red circle", 3, 4, [0.0, 0.5, 1.0])
    three, four = play.generate("a red circle", 2, 3)[0]
    torch.testing.assert_close(noise[[0, 2]], torch.stack([three, four]), rtol=0, atol=5e-5)


def test_a_strip_writes_a_png_and_an_animated_gif(play):
    strip, gif, status = play.strip(lambda w: play.prompt_frames("a", "b", w, 0), 4, "prompts")
    assert strip.suffix == ".png" and status.startswith("4 images")
    with Image.open(gif) as im:
        assert im.n_frames >= 4


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.generate("  ", 2, 0), "empty"),
        (lambda p: p.generate("a", 0, 0), f"choose 1 to {MAX_IMAGES}"),
        (lambda p: p.generate("a", 2, 0, 1.5), "ψ must be in"),
        (lambda p: p.prompt_frames("a", "", [0.5], 0), "empty"),
        (lambda p: p.strip(lambda w: w, 1, "x"), "choose 2 to 32"),
    ],
)
def test_user_mistakes_are_value_errors_with_a_message(play, call, message):
    with pytest.raises(ValueError, match=message):
        call(play)


def test_the_page_builds(play):
    page = build_page(play)
    ids = {getattr(block, "elem_id", None) for block in page.blocks.values()}
    assert {"prompt", "generate", "gallery", "seed", "random_seed", "psi", "p_t", "q_t"} <= ids


# ---------------------------------------------------------------------------------------------
# The command line: one-line errors, exit code 2
# ---------------------------------------------------------------------------------------------
def run_main(overrides, capsys):
    import galip.app

    with pytest.raises(SystemExit) as exit_info:
        galip.app.main(compose_cli("app", overrides))
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    code, err = run_main([f"ckpt={tmp_path / 'nope.safetensors'}"], capsys)
    assert code == 2 and err.startswith("galip: ") and "no such file" in err and "\n" not in err


@pytest.mark.parametrize("name", ["foreign.ckpt", "foreign.safetensors", "notes.txt"])
def test_a_foreign_file_is_one_line(tmp_path, capsys, name):
    (tmp_path / name).write_bytes(b"not a checkpoint at all" * 10)
    code, err = run_main([f"ckpt={tmp_path / name}"], capsys)
    assert code == 2 and err.startswith("galip: ") and "\n" not in err, err
    assert str(tmp_path / name) in err


def test_without_gradio_it_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "gradio" else find_spec(n, *a)
    )
    code, err = run_main([], capsys)
    assert (
        code == 2
        and err == "galip: the web page needs gradio: pip install 'galip[app]' (or pip install -e '.[app]')"
    )


def test_it_binds_to_localhost_by_default(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    cfg = compose_cli("app", [])
    assert cfg.server_name == "127.0.0.1" and cfg.server_port == 7860 and cfg.share is False
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    assert compose_cli("app", []).server_port == 7999


def test_a_checkpoint_loads_on_the_cpu_when_asked(export_path):  # noqa: F811
    loaded, source = load_sampler(export_path, "cpu")
    assert loaded.device.type == "cpu" and source == str(export_path)


# ---------------------------------------------------------------------------------------------
# The default: the shipped demo generator, offline, the file its README describes
# ---------------------------------------------------------------------------------------------
def test_the_default_is_the_shipped_demo_generator_and_its_readme_has_its_sha256():
    import hashlib

    from galip.world.demo_generator import DEMO_GENERATOR

    loaded, source = load_sampler(None, "cpu")  # HF_HUB_OFFLINE=1 (conftest): nothing is downloaded
    assert "shipped demo generator" in source and loaded.generator.image_size == 32
    images, *_ = Playground(loaded).generate("a large red circle on a white background", 2, 0)
    assert images.shape == (2, 3, 32, 32) and images.std() > 0.1
    readme = (DEMO_GENERATOR.parent / "README.md").read_text()
    assert hashlib.sha256(DEMO_GENERATOR.read_bytes()).hexdigest() in readme


def test_the_shipped_export_samples_from_anywhere(tmp_path):
    """Its CLIP is named inside the package (``galip:…``), so the sample CLI takes it from any directory."""
    from galip.checkpoints import read_export
    from galip.world.demo_generator import DEMO_GENERATOR
    from tests.helpers import run_module

    assert read_export(DEMO_GENERATOR)[1]["clip"]["path"] == "galip:world/assets/clip/7c9242c5815f/clip.pt"
    args = [f"ckpt={DEMO_GENERATOR}", "n=1", f"out_dir={tmp_path / 'out'}"]
    proc = run_module("galip.sample", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "000_0000.png").is_file()
