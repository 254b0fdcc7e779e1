"""The fixed-noise sample grids reach the loggers as images: W&B (offline run files) and TensorBoard (event file)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests.helpers import run_train, tensorboard_events


def test_a_wandb_and_tensorboard_run_holds_the_grids_as_images(tmp_path):
    run_dir = tmp_path / "run"
    # 4 batches of 4, a grid every 8 images: after batches 2 and 4, the last one not drawn (or logged) again at the end
    every = "callbacks.sample_grid.every_n_kimg=0.008"
    args = ["+experiment=smoke", every, "logger=[wandb,tensorboard]", f"hydra.run.dir={run_dir}"]
    proc = run_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grids = sorted((run_dir / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["kimg000000.008.png", "kimg000000.016.png"]

    # W&B offline: <run>/wandb/offline-run-*/files/media/images/samples/grid_<step>_<hash>.png, the grid itself
    media = sorted(run_dir.glob("wandb/offline-run-*/files/media/images/samples/grid_*.png"))
    assert len(media) == len(grids), sorted(p.relative_to(run_dir) for p in run_dir.rglob("*.png"))
    with Image.open(media[-1]) as logged, Image.open(grids[-1]) as written:
        assert logged.size == written.size
        assert logged.convert("RGB").tobytes() == written.convert("RGB").tobytes()

    # TensorBoard: an image summary under the same tag, as large as the grid, at its batch's step
    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    values = summaries(events)
    images = [(step, v.image) for step, v in values if v.tag == "samples/grid" and v.HasField("image")]
    assert {step for step, v in values if v.tag == "kimg"} == {0, 1, 2, 3}  # the metrics' x-axis: batches
    assert len(images) == len(grids)
    assert [step for step, _ in images] == [1, 3]  # the batches' indices, as the metrics beside them
    _, image = images[-1]
    with Image.open(grids[-1]) as written:
        assert (image.width, image.height) == written.size


def summaries(path: Path) -> list:
    """(step, summary value) of every event in a TensorBoard file."""
    return [(event.step, value) for event in tensorboard_events(path) for value in event.summary.value]
