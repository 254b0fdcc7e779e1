"""A newcomer's first hour, scripted: a fresh clone, every README command in a form this machine can run, and
each surprise a first user met (resume, prompts, typos, errors, noise, files in odd places).

Slow (a few minutes): ``make test-slow`` or ``pytest -m slow tests/test_newcomer_walk.py``. It runs on a
``git clone`` of this checkout's HEAD (so what is not committed is not there), with that clone's ``src/`` first
on the path; ``GALIP_WALK_TREE=1`` walks the working tree instead (to try uncommitted changes).
Commands that need data or weights this machine does not have must stop in one line with exit code 2.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# What a user cannot act on: library warnings, tracebacks (each would be a finding of this walk).
NOISE = re.compile(r"warn|traceback|deprecat", re.IGNORECASE)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if os.environ.get("GALIP_WALK_TREE"):
        dest = tmp_path_factory.mktemp("tree") / "galip"
        shutil.copytree(REPO / "src", dest / "src")
        shutil.copy(REPO / "README.md", dest / "README.md")
        return dest
    dest = tmp_path_factory.mktemp("walk") / "galip"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], check=True)
    return dest


class Walk:
    """Runs ``python -m …`` in the clone as a user would: from its root, offline, its ``src/`` first."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("GALIP_ROOT", "HYDRA_FULL_ERROR")},
            "PYTHONPATH": str(root / "src"),
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline",
        }

    def __call__(self, module: str, *args: str, code: int = 0, timeout: float = 600) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        console = proc.stdout + proc.stderr
        assert proc.returncode == code, (
            f"python -m {module} {' '.join(args)} -> {proc.returncode}\n{console[-3000:]}"
        )
        if code == 2:  # a user's mistake: one line that says what to do
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("galip: "), console[-3000:]
        return console

    def runs(self, task: str) -> list[Path]:
        return sorted(p for p in (self.root / "outputs" / task).glob("*") if p.is_dir())


def quiet(console: str) -> None:
    found = [line for line in console.splitlines() if NOISE.search(line)]
    assert not found, f"messages a user cannot act on: {found[:5]}"


def test_the_readme_modules_are_all_walked():
    """A command added to the README without a walk step fails here."""
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"python -m (galip[\w.]*)", readme))
    walked = set(re.findall(r'"(galip[\w.]*)"', Path(__file__).read_text()))
    assert named <= walked, f"README commands not walked: {sorted(named - walked)}"


def test_newcomer_walk(clone):
    walk = Walk(clone)
    py = "galip.train"

    # -- training: the smoke run, an override, a typo ----------------------------------------------
    console = walk(py, "+experiment=smoke")
    quiet(console)
    (run,) = walk.runs("smoke")
    assert f"run directory: {run}" in console.replace(str(clone) + "/", "") or str(run.name) in console
    assert "kimg 0.016/0.016" in console, "one progress bar over the run, in kimg"
    assert (run / "checkpoints" / "kimg000000.016.ckpt").is_file() and (
        run / "samples" / "kimg000000.016.png"
    ).is_file()
    assert oct((run / "generator.safetensors").stat().st_mode & 0o777) == "0o644"
    walk(py, "+experiment=smoke", "model.tap_blocks=[0,2,3]")
    out = walk(py, "+experiment=smoke", "+model.tap_block=[1]", code=2)
    assert "tap_blocks" in out
    assert len(walk.runs("smoke")) == 2, "a run stopped by a config error leaves no directory"

    # -- resume: a finished run says so; a longer one continues, the CSV keeps its rows --------------
    rundir = f"hydra.run.dir={run}"
    assert "larger kimg" in walk(py, "+experiment=smoke", rundir, "ckpt_path=last", code=2)
    walk(py, "+experiment=smoke", rundir, "ckpt_path=last", "kimg=0.032")
    with open(run / "csv" / "metrics.csv") as f:
        steps = sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("d/loss")})
    assert steps == list(range(8)), steps

    # -- the paper's datasets, absent here: one line each, nothing left behind -----------------------
    for experiment in ("cub", "coco"):
        assert "data" in walk(py, f"+experiment={experiment}", "clip=tiny", code=2)
    walk(py, "+experiment=cc12m", "clip=tiny", "data.shards=/nonexistent/{00000..00001}.tar", code=2)
    assert not walk.runs("cub") and not walk.runs("coco")
    walk("galip.data.make_shards", "cub", "--root", "data/birds", "--out", "shards/cub", code=2)
    walk("galip.data.encode_text", "+experiment=coco", "clip=tiny", code=2)
    walk("galip.metrics.reference_stats", "data=coco", "split=test", "out=coco_test.npz", code=2)

    # -- sampling and interpolation, from an export, a run directory and a moved .ckpt ----------------
    export = run / "generator.safetensors"
    walk("galip.sample", f"ckpt={export}", 'prompts=["a red circle", "a blue square"]', "n=2", "seed=0")
    walk("galip.sample", f"ckpt={run}", "prompts=a small yellow triangle on a grey background", "n=3")
    grids = sorted((clone / "outputs" / "sample").rglob("*.png"))
    assert grids, "samples go under outputs/sample/<time>/"
    moved = clone / "moved.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", moved)
    walk("galip.sample", f"ckpt={moved}", "prompts=a red circle", "n=1")
    walk("galip.sample", f"ckpt={export}", "prompts=", code=2)
    walk("galip.sample", f"ckpt={export}", "n=0", code=2)
    assert "cut" in walk("galip.sample", f"ckpt={export}", "prompts=" + " ".join(["red"] * 90), "n=1").lower()
    bad = clone / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    walk("galip.sample", f"ckpt={bad}", code=2)
    walk("galip.app", f"ckpt={bad}", code=2)  # the page itself: tests/test_app_browser.py
    walk("galip.interpolate", f"ckpt={export}", 'prompts=["a red circle", "a blue square"]', "steps=3")
    walk("galip.interpolate", f"ckpt={export}", "prompts=a red circle", "mode=noise", "steps=3")
    assert (clone / "outputs" / "interpolate").is_dir()
    stray = {p.name for p in clone.iterdir()} - {"outputs", "moved.ckpt", "bad.ckpt", ".cache"}
    assert stray <= {p.name for p in (REPO).iterdir()} | {"src", "README.md"}, (
        f"files in the working dir: {stray}"
    )

    # -- evaluation: missing data and an extractor that cannot work are one line ---------------------
    assert "data" in walk("galip.evaluate", f"ckpt={export}", "data=coco", code=2)
    walk("galip.evaluate", f"ckpt={export}", "data=coco", "metrics.fid.extractor=judge", code=2)

    # -- a sweep and its summary ----------------------------------------------------------------------
    walk(py, "-m", "+experiment=smoke", "+sweep=summary", "model.tap_blocks=[1],[1,2]", "kimg=0.004")
    (sweep,) = sorted((clone / "outputs").rglob("summary.md"))
    walk("galip.sweep_summary", str(sweep.parent))

    # -- the demo world, shortened: quiet console, grids, the judge's numbers, evaluate, the app's loader
    console = walk(py, "+experiment=demo", "kimg=0.64", "callbacks.sample_grid.every_n_kimg=0.32")
    quiet(console)
    (demo,) = walk.runs("demo")
    assert (demo / "evaluation.jsonl").is_file() and list((demo / "samples").glob("kimg*.png"))
    walk("galip.evaluate", f"ckpt={demo}", "data=shapes_demo", "n_samples=64")

    # -- the world's research commands: shipped artefacts are found, not rebuilt; short runs of the rest
    assert "not retrained" in walk("galip.world.pretrain_clip", "+experiment=shapes_demo_clip")
    assert "not retraining" in walk("galip.world.train_judge", "--data", "shapes_demo")
    walk(
        "galip.world.probe", "--data", "shapes_demo", "--generator", str(demo / "generator.safetensors"), "64"
    )
    walk(
        "galip.world.probe",
        "--data",
        "shapes_demo",
        "--judge-shapes",
        str(demo / "generator.safetensors"),
        "64",
    )
    walk("galip.world.probe", "missing.pt", code=2)
    walk("galip.world.oracle_decoder", "--data", "shapes_demo", "--steps", "4", "--eval-every", "4")
