"""The fixed-noise sample grids reach the loggers as images: W&B (offline run files) and TensorBoard (event file)."""

from __future__ import annotations

import struct
from pathlib import Path

from PIL import Image

from tests.helpers import run_train


def test_a_wandb_and_tensorboard_run_holds_the_grids_as_images(tmp_path):
    run_dir = tmp_path / "run"
    args = ["+experiment=smoke", "logger=[wandb,tensorboard]", f"hydra.run.dir={run_dir}"]
    proc = run_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grids = sorted((run_dir / "samples").glob("*.png"))
    assert grids

    # W&B offline: <run>/wandb/offline-run-*/files/media/images/samples/grid_<step>_<hash>.png, the grid itself
    media = sorted(run_dir.glob("wandb/offline-run-*/files/media/images/samples/grid_*.png"))
    assert len(media) == len(grids), sorted(p.relative_to(run_dir) for p in run_dir.rglob("*.png"))
    with Image.open(media[-1]) as logged, Image.open(grids[-1]) as written:
        assert logged.size == written.size
        assert logged.convert("RGB").tobytes() == written.convert("RGB").tobytes()

    # TensorBoard: an image summary under the same tag, as large as the grid, at the last batch's step (4 batches,
    # counted from 0 as the metrics are)
    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    images = image_summaries(events, "samples/grid")
    assert len(images) == len(grids)
    step, image = images[-1]
    assert step == 3
    with Image.open(grids[-1]) as written:
        assert (image.width, image.height) == written.size


def image_summaries(path: Path, tag: str) -> list:
    """(step, image summary) of ``tag`` in a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    data, found, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        found += [(event.step, v.image) for v in event.summary.value if v.tag == tag and v.HasField("image")]
    return found
