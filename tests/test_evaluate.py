"""Evaluation: FID/CLIPSIM building blocks against hand-made references, reference statistics files, the
periodic-evaluation callback in a real (tiny) run, and ``python -m galip.evaluate`` end to end on the
embedded world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from galip.metrics.clipsim import CLIPSimilarity
from galip.metrics.fid import FrechetDistance, InceptionWeightsMissing, make_fid, resolve_weights, to_uint8
from galip.metrics.protocol import caption_batches, score_generator
from galip.metrics.reference import (
    ReferenceStats,
    check_compatible,
    load_reference,
    manifest_path,
    save_reference,
    seed_fid,
)
from tests.helpers import compose_config, run_module, train_in


class MeanColour(nn.Module):
    """A custom extractor with features one can compute by hand: per-channel means and their squares."""

    num_features = 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = images.float().mean(dim=(2, 3)) / 255.0
        return torch.cat([m, m.square()], dim=1)


def image_set(n: int = 64, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 8, 8, generator=gen) * 1.6 - 0.8 + shift).clamp(-1, 1)


def fid_of(real: torch.Tensor, fake: torch.Tensor) -> float:
    fid = FrechetDistance(MeanColour(), "mean_colour").double()
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


# ---------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------
def test_fid_of_a_set_with_itself_is_zero_and_shifted_is_positive():
    images = image_set()
    assert abs(fid_of(images, images)) < 1e-6
    shifted = fid_of(images, image_set(shift=0.2))
    assert shifted > 1e-3
    # the mean term alone, by hand: a uniform shift moves each channel mean by ~0.2/2 in [0, 1] units
    assert shifted > 0.5 * 3 * (0.1**2)


def test_to_uint8_quantises_like_a_png():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 1.5, float("nan"), float("inf")])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 0, 255]


def test_seeded_statistics_give_the_same_fid_as_the_images():
    real, fake = image_set(seed=1), image_set(seed=2, shift=0.1)
    direct = FrechetDistance(MeanColour(), "mean_colour").double()
    direct.update(real, real=True)
    mu, sigma, n = direct.real_statistics()
    assert n == len(real)
    torch.testing.assert_close(mu, MeanColour()(to_uint8(real)).double().mean(0))
    seeded = FrechetDistance(MeanColour(), "mean_colour").double()
    seeded.set_real_statistics(mu, sigma, n=None)  # DF-GAN files do not say N: any N must give the same FID
    for metric in (direct, seeded):
        metric.update(fake, real=False)
    assert float(seeded.compute()) == pytest.approx(float(direct.compute()), rel=1e-9, abs=1e-12)
    assert seeded.reference_n is None and direct.reference_n == len(real)


def test_missing_inception_weights_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(InceptionWeightsMissing) as err:
        make_fid("inception")
    message = str(err.value)
    assert "\n" not in message
    assert "metrics.inception_weights=" in message and "pt_inception-2015-12-05-6726825d.pth" in message
    assert "metrics.download=true" in message
    with pytest.raises(InceptionWeightsMissing, match="no such file"):
        resolve_weights("inception", tmp_path / "nope.pth")
    with pytest.raises(InceptionWeightsMissing, match="inception_v3_google"):
        make_fid("dfgan_inception")


def test_inception_weights_from_a_local_file_and_the_cache(tmp_path, monkeypatch):
    """The real torch-fidelity Inception, loaded from a local file (random weights of the right layout)."""
    from torchvision.models import inception_v3

    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(
        inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).state_dict(),
        weights,
    )
    fid = make_fid("inception", weights=weights)
    images = image_set(3)
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert fid.n_real == 3 and abs(float(fid.compute())) < 1e-3
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = Path(tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    cached.parent.mkdir(parents=True)
    cached.symlink_to(weights)
    assert resolve_weights("inception") == cached


def test_corrupt_inception_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match="not a TF-FID Inception-v3 state dict"):
        make_fid("inception", weights=bad)


def test_dfgan_inception_input_path(tmp_path):
    """Features of torchvision's Inception after the official input path: [0,1], 299 px, transform_input."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    weights = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(net.state_dict(), weights)
    fid = make_fid("dfgan_inception", weights=weights)
    images = to_uint8(image_set(2))
    feats = fid.inception(images)
    net.eval().transform_input = True
    x = torch.nn.functional.interpolate(
        images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False
    )
    net.fc = nn.Identity()  # torchvision's forward ends in dropout (eval: identity) + fc
    torch.testing.assert_close(feats, net(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Reference statistics files
# ---------------------------------------------------------------------------------------------
def test_reference_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    stats = ReferenceStats(
        rng.normal(size=5), a @ a.T, 123, {"extractor": "inception", "data": {"name": "coco"}}
    )
    path = save_reference(tmp_path / "ref.npz", stats)
    back = load_reference(path)
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert back.n == 123 and back.extractor == "inception"
    manifest = json.loads(manifest_path(path).read_text())
    assert manifest["n"] == 123 and manifest["feature_dim"] == 5 and manifest["format"].startswith("galip")


def test_reads_dfgan_family_npz(tmp_path):
    path = tmp_path / "coco_val256_FIDK0.npz"
    mu, sigma = np.arange(4, dtype=np.float32), np.eye(4, dtype=np.float32)
    np.savez(path, mu=mu, sigma=sigma)  # what the DF-GAN metadata ships: two keys, float32, no manifest
    stats = load_reference(path)
    assert stats.n is None and stats.extractor == "dfgan_inception"
    np.testing.assert_array_equal(stats.mu, mu)
    assert stats.mu.dtype == np.float64
    with pytest.raises(ValueError, match="extractor=dfgan_inception"):
        check_compatible(stats, "inception")
    other = tmp_path / "mine.npz"
    np.savez(other, mu=mu, sigma=sigma)
    assert load_reference(other).extractor == "unknown"
    assert load_reference(other, extractor="inception").extractor == "inception"


def test_bad_reference_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference_stats"):
        load_reference(tmp_path / "missing.npz")
    np.savez(tmp_path / "x.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        load_reference(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="D×D"):
        load_reference(tmp_path / "y.npz")


def test_seed_fid_checks_feature_size(tmp_path):
    fid = FrechetDistance(MeanColour(), "mean_colour")
    with pytest.raises(ValueError, match="features"):
        seed_fid(fid, ReferenceStats(np.zeros(3), np.eye(3), 10, {"extractor": "mean_colour"}))


# ---------------------------------------------------------------------------------------------
# Protocol and CLIPSIM
# ---------------------------------------------------------------------------------------------
def batches(n_rows: int, batch_size: int):
    rows = [{"image": image_set(1, seed=i)[0], "caption": f"c{i}"} for i in range(n_rows)]
    return [
        {
            "image": torch.stack([r["image"] for r in rows[i : i + batch_size]]),
            "caption": [r["caption"] for r in rows[i : i + batch_size]],
        }
        for i in range(0, n_rows, batch_size)
    ]


def test_caption_batches_repeat_passes_and_cut_the_last():
    loader = batches(5, 2)
    got = [(epoch, list(b["caption"])) for epoch, b in caption_batches(loader, 12)]
    captions = [c for _, cs in got for c in cs]
    assert captions == [f"c{i}" for i in range(5)] * 2 + ["c0", "c1"]
    assert [e for e, _ in got] == [0, 0, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="empty"):
        list(caption_batches([], 3))


def test_score_generator_counts_real_once_and_is_deterministic():
    loader = batches(6, 4)

    def generate(captions, noise):  # a "generator" whose output depends on the noise only
        return torch.tanh(noise[:, :3, None, None].expand(-1, 3, 8, 8))

    fid = FrechetDistance(MeanColour(), "mean_colour").double()
    first = score_generator(generate, loader, 10, nz=4, fid=fid, seed=3)
    assert first["fid/n"] == 10 and first["fid/n_real"] == 6  # 10 fakes over 2 passes, each real image once
    again = score_generator(generate, loader, 10, nz=4, fid=fid, seed=3)
    assert again == first  # real side kept, fake side reset, same noise
    assert score_generator(generate, loader, 10, nz=4, fid=fid, seed=4)["fid"] != first["fid"]


def test_clipsim_is_mean_cosine_of_embeddings(tiny_clip):
    images = image_set(3).repeat_interleave(8, -1).repeat_interleave(8, -2)  # 64 px
    captions = ["a red circle", "a blue square", "two green stars"]
    metric = CLIPSimilarity(tiny_clip)
    metric.update(images[:2], captions[:2])
    metric.update(images[2:], captions[2:])
    img = tiny_clip.model.encode_image(tiny_clip.preprocess(images))
    txt = tiny_clip.encode_text(tiny_clip.tokenize(captions))
    expected = torch.nn.functional.cosine_similarity(img, txt, dim=-1).mean()
    assert float(metric.compute()) == pytest.approx(float(expected), abs=1e-5)
    assert int(metric.n) == 3
    with pytest.raises(ValueError, match="captions"):
        metric.update(images, captions[:1])


# ---------------------------------------------------------------------------------------------
# A trained embedded-world run (a few batches), with the periodic evaluation callback
# ---------------------------------------------------------------------------------------------
TRAIN_OVERRIDES = [
    "+experiment=demo_full",  # the full world: its shipped 64-px CLIP and judge; with the periodic evaluation
    "callbacks.evaluation.every_n_kimg=0.016",  # batches of 8: after batches 2 and 4
    "callbacks.evaluation.evaluators.judge.n_samples=8",
    "callbacks.sample_grid.every_n_kimg=0",
    "data.shards=null",
    "data.n_train=32",
    "data.n_val=16",
    "data.batch_size=8",
    "kimg=0.032",  # 4 batches of 8
    "logger=csv",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:

    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(TRAIN_OVERRIDES, output_dir=out)
    train_in(cfg, out)
    (out / ".hydra").mkdir(exist_ok=True)  # what @hydra.main writes: the run's config, for .ckpt evaluation
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return out


def test_periodic_evaluation_writes_best_next_to_last(trained_run):
    ckpts = trained_run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and (ckpts / "best.ckpt").is_file()
    lines = [json.loads(x) for x in (trained_run / "evaluation.jsonl").read_text().splitlines()]
    assert [x["kimg"] for x in lines] == [
        0.016,
        0.032,
    ]  # not again at train end: the last batch was evaluated
    fds = [x["metrics"]["eval/judge/fd"] for x in lines]
    assert lines[-1]["best"] == min(fds)
    best = torch.load(ckpts / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["images_seen"] == (32 if fds[1] < fds[0] else 16)  # saved at the evaluation that was best
    state = best["callbacks"]["PeriodicEvaluation"]  # resumes with the best so far and the next due kimg
    assert state["best"] == min(fds) and state["next_kimg"] == pytest.approx(0.048)
    logged = next(trained_run.rglob("metrics.csv")).read_text()
    assert "eval/judge/fd" in logged and "eval/best" in logged


def run_cli(module: str, args: list[str], cwd: Path):
    return run_module(module, args, cwd, timeout=600, OMP_NUM_THREADS="1")


def test_evaluate_end_to_end_on_the_embedded_world(trained_run):
    out = trained_run / "eval.json"
    args = [
        f"ckpt={trained_run / 'generator.safetensors'}",
        "data=shapes",
        "n_samples=24",
        "batch_size=16",
        "data.n_val=16",
        "metrics.fid.enabled=true",  # judge features: no Inception weights on this machine
        f"out={out}",
    ]
    proc = run_cli("galip.evaluate", args, trained_run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert m["judge/n"] == 24 and 0 <= m["judge/acc"] <= 1 and m["judge/fd"] > 0
    assert m["fid/n"] == 24 and m["fid/n_real"] == 16 and m["fid"] > 0  # 16 test scenes, read 1.5 times
    assert -1 <= m["clipsim"] <= 1 and m["clipsim/n"] == 24
    assert "N=24 generated vs the shapes/test images (N=16 real)" in proc.stdout
    assert "CLIPSIM" in proc.stdout and "judge/acc" in proc.stdout
    assert "(the CLIP G was trained against: partly optimised)" in proc.stdout  # the world's CLIP is G's


def test_evaluate_judges_the_images_g_draws_in_bf16(trained_run, capsys):
    """``precision=bf16`` evaluates what ``galip.sample precision=bf16`` draws: the sampler runs in bf16, the
    report and the results JSON say so, and the numbers are those of other images than fp32's."""
    from galip.config import compose
    from galip.evaluate import evaluate

    results = {}
    for precision in ("fp32", "bf16"):
        cfg = compose(
            "evaluate",
            [
                f"ckpt={trained_run / 'generator.safetensors'}",
                "data=shapes",
                "data.n_val=16",
                "n_samples=16",
                "batch_size=16",
                "metrics.clipsim.enabled=false",
                f"precision={precision}",
                f"out={trained_run / f'eval_{precision}.json'}",
            ],
        )
        results[precision] = evaluate(cfg)
        head = next(
            line for line in capsys.readouterr().out.splitlines() if line.startswith("galip.evaluate")
        )
        assert head.endswith("(seed 0, G in bf16)" if precision == "bf16" else "(seed 0)"), head
    saved = json.loads((trained_run / "eval_bf16.json").read_text())
    assert saved["precision"] == "bf16" and results["fp32"]["precision"] == "fp32"
    assert saved["metrics"]["judge/n"] == 16
    assert saved["metrics"]["judge/fd"] != results["fp32"]["metrics"]["judge/fd"]  # other pixels were judged


def test_results_go_next_to_the_checkpoint_unless_it_ships_inside_the_package(tmp_path):
    """The package may be installed read-only: a shipped generator's results go to the working directory."""
    from galip.clip.backbone import PACKAGE_DIR
    from galip.evaluate import results_dir

    run = tmp_path / "run"
    run.mkdir()
    assert results_dir(run / "generator.safetensors") == run
    assert results_dir(run / "checkpoints" / "last.ckpt") == run / "checkpoints"
    assert results_dir(run) == run  # a run directory
    shipped = PACKAGE_DIR / "world" / "assets" / "generator" / "demo" / "generator.safetensors"
    assert shipped.is_file()
    assert results_dir(shipped) == Path("outputs/evaluate")


def test_clipsim_is_labelled_g_s_clip_only_when_it_is(tiny_clip):
    from types import SimpleNamespace

    from galip.clip import load_clip
    from galip.evaluate import clipsim_is_gs
    from tests.helpers import TINY_CLIP_CFG

    torch.manual_seed(1)
    other = load_clip(name=None, model_cfg=TINY_CLIP_CFG)
    assert clipsim_is_gs([SimpleNamespace(clipsim_choice="model")], tiny_clip)
    assert clipsim_is_gs([SimpleNamespace(clipsim_choice=tiny_clip)], tiny_clip)
    assert not clipsim_is_gs([SimpleNamespace(clipsim_choice=other)], tiny_clip)
    assert not clipsim_is_gs([SimpleNamespace(clipsim_choice=None)], tiny_clip)


def test_evaluate_a_lightning_checkpoint_uses_the_ema(trained_run):
    from galip.sampling import Sampler

    from_ckpt = Sampler.from_file(trained_run / "checkpoints" / "last.ckpt")
    from_export = Sampler.from_file(trained_run / "generator.safetensors")
    a = from_ckpt.generate(["a small red circle on a grey background"], n=2, seed=0)
    b = from_export.generate(["a small red circle on a grey background"], n=2, seed=0)
    torch.testing.assert_close(a, b)


def test_reference_stats_cli_then_evaluate_against_it(trained_run):
    ref = trained_run / "shapes_test_judge.npz"
    proc = run_cli(
        "galip.metrics.reference_stats", ["data=shapes", "data.n_val=16", f"out={ref}"], trained_run
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = load_reference(ref)
    assert stats.n == 16 and stats.extractor == "judge" and stats.manifest["data"]["split"] == "test"
    shown = run_cli("galip.metrics.reference_stats", [f"show={ref}"], trained_run)
    assert "N=16" in shown.stdout and "extractor judge" in shown.stdout
    out = trained_run / "eval_ref.json"
    args = [
        f"ckpt={trained_run / 'generator.safetensors'}",
        "data=shapes",
        "n_samples=16",
        "data.n_val=16",
        "metrics.fid.enabled=true",
        "metrics.extra.judge=null",
        "metrics.clipsim.enabled=false",
        f"metrics.fid.reference={ref}",
        f"out={out}",
    ]
    proc = run_cli("galip.evaluate", args, trained_run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with_ref = json.loads(out.read_text())["metrics"]
    assert set(with_ref) == {"fid", "fid/n", "fid/n_real"} and with_ref["fid/n_real"] == 16
    assert str(ref) in proc.stdout


def test_evaluate_without_inception_weights_stops_with_one_line(trained_run, tmp_path):
    env_home = tmp_path / "torch"
    args = [
        f"ckpt={trained_run / 'generator.safetensors'}",
        "data=shapes",
        "metrics.fid.enabled=true",
        "metrics.fid.extractor=inception",
        "metrics.extra.judge=null",
    ]
    env = {**os.environ, "TORCH_HOME": str(env_home)}
    proc = subprocess.run(
        [sys.executable, "-m", "galip.evaluate", *args],
        cwd=trained_run,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("galip: FID needs the TF-FID Inception-v3 weights")
    assert "metrics.inception_weights=" in lines[0]
    missing = run_cli("galip.evaluate", ["data=shapes"], trained_run)
    assert missing.returncode == 2 and "ckpt=PATH is required" in missing.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["data=coco"], "data/coco/train/filenames.pickle (get it from"),
        (
            ["data=random", "metrics.fid.enabled=true", "metrics.fid.extractor=judge"],
            "metrics.fid.extractor=judge is not built in (inception, dfgan_inception)",
        ),
        (
            [
                "data=shapes",
                "metrics.fid.enabled=false",
                "metrics.clipsim.enabled=false",
                "metrics.extra.judge=null",
            ],
            "nothing to evaluate",
        ),
    ],
)
def test_evaluate_mistakes_are_one_line_before_anything_is_built(trained_run, args, says):
    """Missing data is named before any CLIP or Inception weights are looked for; an extractor the data has
    no network for, or nothing to compute, is a line too (exit 2), never a traceback or an empty result."""
    proc = run_cli("galip.evaluate", [f"ckpt={trained_run / 'generator.safetensors'}", *args], trained_run)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("galip: ")]
    assert len(lines) == 1 and says in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sample_notebook_runs_top_to_bottom(trained_run, monkeypatch):
    """notebooks/sample.ipynb on the embedded world's model, executed as a user would (nbclient, CPU)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = Path(__file__).resolve().parent.parent / "notebooks" / "sample.ipynb"
    monkeypatch.setenv("GALIP_GENERATOR", str(trained_run / "generator.safetensors"))
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(trained_run)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # samples, prompt interpolation, noise interpolation
    assert "judge/acc" in str(outputs[-1]["data"]["text/plain"])
