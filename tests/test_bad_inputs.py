"""Bad inputs of the kind a scrape produces: the converter keeps exactly the usable pairs and counts the rest by
reason, every image mode arrives as a correct RGB picture, and the CUB/COCO folder loader skips a corrupt JPEG.

Every bad file is made here, in tmp_path: zero bytes, text named ``.jpg``, truncated JPEGs, empty and
non-UTF-8 captions, images of every common mode, an EXIF rotation."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from galip.data import PaperLayoutDataModule, shard_dataset
from galip.data.make_shards import ImagePolicy, convert
from galip.data.make_shards import main as make_shards_main
from galip.data.shards import SkipCounter, _read_samples
from tests.helpers import jpeg, make_cub

RED, BLUE, GREY16 = (220, 20, 20), (20, 20, 220), 40000  # 40000 / 257 = 155.6: grey, not clipped white


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high, red on the left; EXIF 6 (turn 90° clockwise): upright, 20 x 40, red on top."""
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", quality=95, exif=exif.tobytes())


def transparent(mode: str) -> Image.Image:
    """Left half opaque red (LA: its grey, 80), right half fully transparent."""
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    image.paste((*RED, 255), (0, 0, 8, 16))
    return image if mode == "RGBA" else image.convert(mode)


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.paste(0, (8, 0, 16, 16))
    image.info["transparency"] = 0
    return image


# file -> bytes, for the usable pairs: every mode a photo folder holds
GOOD = {
    "modes/rgb.jpg": lambda: jpeg((48, 32)),
    "modes/grey.jpg": lambda: encoded(Image.new("L", (32, 32), 90), "JPEG"),
    "modes/cmyk.jpg": lambda: encoded(Image.new("RGB", (32, 32), RED).convert("CMYK"), "JPEG", quality=95),
    "modes/rgba.png": lambda: encoded(transparent("RGBA"), "PNG"),
    "modes/la.png": lambda: encoded(transparent("LA"), "PNG"),
    "modes/clear_palette.gif": lambda: encoded(palette_with_transparency(), "GIF", transparency=0),
    "modes/palette.png": lambda: encoded(
        Image.new("RGB", (16, 16), RED).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"
    ),
    "modes/grey16.png": lambda: encoded(Image.fromarray(np.full((16, 16), GREY16, np.uint16)), "PNG"),
    "modes/bilevel.bmp": lambda: encoded(Image.new("1", (16, 16), 1), "BMP"),
    "modes/photo.webp": lambda: encoded(Image.new("RGB", (16, 16), RED), "WEBP", lossless=True),
    "modes/scan.tiff": lambda: encoded(Image.new("RGB", (16, 16), RED), "TIFF"),
    "modes/rotated.jpg": rotated_jpeg,
    "modes/tiny.jpg": lambda: jpeg((1, 1)),
    "modes/large.jpg": lambda: jpeg((2400, 1800)),
    "mislabelled/png_named.jpg": lambda: encoded(Image.new("RGB", (16, 16), RED), "PNG"),
}
# file -> bytes, caption -> why it is skipped (None: the file is absent)
BAD = {
    "bad/no_caption.jpg": (lambda: jpeg((16, 16)), None, "missing_caption"),
    "bad/zero.jpg": (lambda: b"", "a picture", "undecodable_image"),
    "bad/text.jpg": (lambda: b"<html>403 Forbidden</html>", "a picture", "undecodable_image"),
    "bad/truncated.jpg": (lambda: jpeg((200, 200), (10, 10, 90, 90))[:600], "a picture", "undecodable_image"),
    "bad/empty_caption.jpg": (lambda: jpeg((16, 16)), " \r\n\r\n\t\n", "empty_caption"),
    "bad/latin1.jpg": (lambda: jpeg((16, 16)), "caf\xe9 au lait".encode("latin-1"), "unreadable_caption"),
    "bad/dup.jpg": (lambda: jpeg((16, 16)), "first of two", None),  # kept: the first with its key
    "bad/dup.png": (lambda: encoded(Image.new("RGB", (8, 8)), "PNG"), "first of two", "duplicate_key"),
}
CAPTION = "\ufeff  a picture of {name}  \r\n\r\n   another caption \r\n"  # BOM, CRLF, blank line, spaces


def make_photo_folder(root: Path) -> None:
    for name, data in GOOD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data())
        (root / name).with_suffix(".txt").write_bytes(CAPTION.format(name=Path(name).stem).encode())
    for name, (data, caption, _) in BAD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data())
        if caption is not None:
            text = caption if isinstance(caption, bytes) else caption.encode()
            (root / name).with_suffix(".txt").write_bytes(text)
    (root / "bad" / "orphan.txt").write_text("a caption whose image never arrived\n")


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    return dict(_read_samples(path))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The photo folder, converted once by the command line: (root, out, exit code, manifest, samples)."""
    tmp = tmp_path_factory.mktemp("photos")
    root, out = tmp / "my_pairs", tmp / "shards"
    make_photo_folder(root)
    code = make_shards_main(["folder", "--root", str(root), "--out", str(out), "--max-per-shard", "10"])
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    samples = {}
    for shard in sorted((out / "train").glob("*.tar")):
        samples.update(read_shard(shard))
    return root, out, code, manifest, samples


def pixels(samples, key: str) -> np.ndarray:
    image = Image.open(io.BytesIO(samples[key]["jpg"]))
    assert image.mode in ("RGB", "L"), (key, image.mode)  # what the reader turns into RGB unchanged
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------------------------------------
# A folder of pairs
# ---------------------------------------------------------------------------------------------
def test_a_messy_folder_converts_keeping_exactly_the_usable_pairs(converted):
    _, _, code, manifest, samples = converted
    assert code == 0
    split = manifest["splits"]["train"]
    kept = {f"{n.rsplit('.', 1)[0].replace('/', '_')}" for n in GOOD} | {"bad_dup"}
    assert set(samples) == kept
    assert split["count"] == len(kept) == sum(s["count"] for s in split["shards"])
    assert split["skipped"] == {
        "duplicate_key": 1,
        "empty_caption": 1,
        "missing_caption": 1,
        "missing_image": 1,  # orphan.txt
        "undecodable_image": 3,
        "unreadable_caption": 1,
    }


def test_the_first_skips_are_named_in_the_log_with_a_summary(tmp_path, caplog):
    make_photo_folder(tmp_path / "pairs")
    with caplog.at_level(logging.INFO, logger="galip.data.make_shards"):
        convert("folder", tmp_path / "pairs", tmp_path / "out")
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(named) == 5 and all(str(tmp_path / "pairs") in m for m in named)  # the first five
    assert any("text.jpg: image does not decode" in m for m in named)
    assert "kept 16 of 24 pairs; skipped: 1 duplicate_key, 1 empty_caption" in caplog.text


def test_captions_lose_bom_crlf_blank_lines_and_surrounding_space(converted):
    samples = converted[4]
    assert samples["modes_rgb"]["txt"].decode() == "a picture of rgb\nanother caption"
    assert samples["bad_dup"]["txt"].decode() == "first of two"


def test_every_image_mode_arrives_as_correct_rgb(converted):
    root, _, _, _, samples = converted
    # An upright 8-bit JPEG keeps its bytes; everything else is re-encoded as an RGB JPEG.
    assert samples["modes_rgb"]["jpg"] == (root / "modes/rgb.jpg").read_bytes()
    assert samples["modes_grey"]["jpg"] == (root / "modes/grey.jpg").read_bytes()
    for key in ("cmyk", "rgba", "la", "palette", "grey16", "bilevel", "photo", "scan", "rotated", "large"):
        assert Image.open(io.BytesIO(samples[f"modes_{key}"]["jpg"])).mode == "RGB", key
    near = lambda a, b: np.abs(a - np.array(b)).max() <= 12  # noqa: E731  (JPEG rounding)
    assert near(pixels(samples, "modes_cmyk")[16, 16], RED)
    assert near(pixels(samples, "modes_grey16")[8, 8], [156] * 3)  # scaled, not clipped to white
    assert near(pixels(samples, "modes_bilevel")[8, 8], [255] * 3)
    for key, opaque in (("modes_rgba", RED), ("modes_la", [80] * 3), ("modes_clear_palette", RED)):
        assert near(pixels(samples, key)[8, 2], opaque), key
        assert near(pixels(samples, key)[8, 13], [255] * 3), key  # transparent -> white
    assert near(pixels(samples, "modes_palette")[8, 2], RED) and near(
        pixels(samples, "modes_photo")[8, 8], RED
    )
    assert near(pixels(samples, "mislabelled_png_named")[8, 8], RED)
    assert pixels(samples, "modes_tiny").shape == (1, 1, 3)


def test_exif_rotation_is_applied_and_large_images_are_capped(converted):
    samples = converted[4]
    upright = pixels(samples, "modes_rotated")
    assert upright.shape == (40, 20, 3)  # turned: 20 wide, 40 high
    assert upright[5, 10, 0] > 150 and upright[35, 10, 2] > 150  # red on top, blue below
    assert pixels(samples, "modes_large").shape == (1024, 1365, 3)  # shorter side at --max-side


def test_a_jpeg_at_a_multiple_of_the_cap_is_capped_too(tmp_path):
    """A JPEG may decode at 1/2 scale to exactly --max-side: it is still one to shrink, not to keep."""
    (tmp_path / "a.jpg").write_bytes(jpeg((96, 64)))
    member = ImagePolicy(max_side=32).member(tmp_path / "a.jpg")
    assert Image.open(io.BytesIO(member)).size == (48, 32)


def test_every_kept_sample_streams_through_the_reader(converted, tiny_clip):
    _, out, _, manifest, _ = converted
    counter = SkipCounter()
    urls = [str(p) for p in sorted((out / "train").glob("*.tar"))]
    streamed = list(shard_dataset(urls, tiny_clip.tokenizer, 16, handler=counter, transform="paper-eval"))
    assert counter.count == 0 and len(streamed) == manifest["splits"]["train"]["count"]
    assert all(s["image"].shape == (3, 16, 16) for s in streamed)


def test_strict_stops_at_the_first_unusable_pair_and_leaves_no_shards(tmp_path, capsys):
    make_photo_folder(tmp_path / "pairs")
    args = ["folder", "--root", str(tmp_path / "pairs"), "--out", str(tmp_path / "out"), "--strict"]
    assert make_shards_main([*args, "--max-per-shard", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("galip: --strict: ") and "bad/dup.png" in err[-1] and "Traceback" not in err
    assert not list((tmp_path / "out").rglob("*.tar"))  # bad/ sorts first, after some shards were written


def test_a_folder_with_nothing_usable_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "a.jpg").write_bytes(b"")
    (tmp_path / "pairs" / "a.txt").write_text("a caption")
    assert make_shards_main(["folder", "--root", str(tmp_path / "pairs"), "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("galip:")]
    assert len(err) == 1 and "no usable pair" in err[0] and "(skipped: 1 undecodable_image)" in err[0]


# ---------------------------------------------------------------------------------------------
# Tables: csv, tsv, parquet
# ---------------------------------------------------------------------------------------------
def table_rows(root: Path) -> list[tuple[str, str | None]]:
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.jpg").write_bytes(jpeg((16, 16)))
    (root / "img" / "b.png").write_bytes(encoded(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"))
    (root / "img" / "cut.jpg").write_bytes(jpeg((200, 200), (10, 10, 90, 90))[:600])
    return [
        ("img/a.jpg", "a blue square"),
        ("img/a.jpg", "  the same square,\r\nseen twice "),  # a second caption of a.jpg
        ("img/b.png", "\ufeffa clear pane"),
        ("img/cut.jpg", "half a picture"),
        ("img/absent.jpg", "never downloaded"),
        ("img/a.jpg", ""),  # an empty cell adds nothing
        (str(root / "img" / "b.png"), None),  # absolute path, null caption
    ]


def check_table_output(out: Path) -> None:
    manifest = json.loads((out / "train" / "manifest.json").read_text())["splits"]["train"]
    assert manifest["count"] == 2 and manifest["captions"] == 3
    assert manifest["skipped"] == {"empty_caption": 1, "missing_image": 1, "undecodable_image": 1}
    samples = read_shard(out / "train" / "00000.tar")
    assert samples["img_a"]["txt"].decode() == "a blue square\nthe same square, seen twice"
    assert samples["img_b"]["txt"].decode() == "a clear pane"
    assert np.asarray(Image.open(io.BytesIO(samples["img_b"]["jpg"]))).min() > 240  # transparent -> white


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet"])
def test_tables_of_image_paths_and_captions(tmp_path, kind):
    rows = table_rows(tmp_path)
    path = tmp_path / f"pairs.{kind}"
    if kind == "parquet":
        pq = pytest.importorskip("pyarrow.parquet")
        pa = pytest.importorskip("pyarrow")
        pq.write_table(pa.table({"file": [r[0] for r in rows], "text": [r[1] for r in rows]}), path)
    else:
        sep = "," if kind == "csv" else "\t"
        lines = [f"file{sep}text"] + [f'{image}{sep}"{caption or ""}"' for image, caption in rows]
        path.write_bytes(("\ufeff" + "\r\n".join(lines)).encode())
    args = [kind, "--root", str(path), "--out", str(tmp_path / "out"), "--image-col", "file"]
    assert make_shards_main([*args, "--caption-col", "text"]) == 0
    check_table_output(tmp_path / "out")


def test_a_table_caption_that_is_not_utf8_is_skipped(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg((16, 16)))
    (tmp_path / "b.jpg").write_bytes(jpeg((16, 16)))
    (tmp_path / "t.csv").write_bytes(b"image,caption\na.jpg,caf\xe9\nb.jpg,fine\n")
    convert("csv", tmp_path / "t.csv", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())["splits"]["train"]
    assert manifest["count"] == 1 and manifest["skipped"] == {"unreadable_caption": 1}


def test_table_errors_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "t.csv").write_text("url,caption\nhttp://x/a.jpg,a\n")
    assert make_shards_main(["csv", "--root", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "has no column 'image' (it has 'url', 'caption')" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    assert make_shards_main(["parquet", "--root", str(tmp_path / "t.parquet"), "--out", str(tmp_path)]) == 2
    assert "pip install 'galip[parquet]'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# CUB / COCO: converted, and read from their folders
# ---------------------------------------------------------------------------------------------
def test_cub_conversion_skips_and_counts_a_corrupt_image_and_a_missing_caption(tmp_path):
    splits = make_cub(tmp_path / "birds")
    images = tmp_path / "birds" / "CUB_200_2011" / "images"
    (images / f"{splits['train'][1]}.jpg").write_bytes(jpeg((160, 120))[:500])
    (tmp_path / "birds" / "text" / f"{splits['test'][0]}.txt").unlink()
    written = convert("cub", tmp_path / "birds", tmp_path / "out")
    assert set(written) == {"train", "test"}
    train = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())["splits"]["train"]
    test = json.loads((tmp_path / "out" / "test" / "manifest.json").read_text())["splits"]["test"]
    assert (train["count"], train["skipped"]) == (3, {"undecodable_image": 1})
    assert (test["count"], test["skipped"]) == (1, {"missing_caption": 1})


def test_the_cub_folder_loader_skips_a_corrupt_jpeg_and_counts_it(tmp_path, tiny_clip, caplog):
    splits = make_cub(tmp_path / "birds")
    images = tmp_path / "birds" / "CUB_200_2011" / "images"
    (images / f"{splits['train'][2]}.jpg").write_bytes(b"\x89PNG this is not a picture")
    dm = PaperLayoutDataModule(tiny_clip.tokenizer, "cub", tmp_path / "birds", 32, 2, num_workers=0)
    dataset = dm.datasets["train"]
    with caplog.at_level(logging.WARNING, logger="galip.data.shards"):
        stand_in = dataset[2]
    assert (stand_in["key"], stand_in["skipped"]) == (splits["train"][3], 1)  # the next readable one
    assert splits["train"][2] in caplog.text
    assert dataset[1]["skipped"] == 0 and dataset[3]["skipped"] == 0  # the stand-in itself counts nothing
    batches = list(dm.train_dataloader())
    assert [b["image"].shape[0] for b in batches] == [2, 2]  # full batches
    assert sum(b["skipped"] for b in batches) == 1  # what SkippedSamples logs as data/skipped
