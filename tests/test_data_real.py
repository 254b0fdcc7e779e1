"""Real-data pipelines on tiny trees made here: CUB/COCO folder layouts, the shard converter, streaming
with corrupt samples, and the sentence-vector cache."""

from __future__ import annotations

import io
import json
import logging
import pickle
import random
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from galip.data import (
    DatasetMissing,
    PaperLayoutDataModule,
    SkipCounter,
    WebDataModule,
    check_batch,
    expand_urls,
    shard_dataset,
    text_fingerprint,
)
from galip.data.make_shards import convert, shard_key
from galip.data.make_shards import main as make_shards_main
from galip.data.sentences import SentenceTable, cache_path, sent_member
from galip.data.shards import add_sentence_vectors
from galip.data.transforms import bbox_crop
from galip.data.webdataset import quote_shard_patterns
from tests.helpers import (
    TINY_CLIP_CFG,
    captions_of,
    corrupt_shard,
    make_coco,
    make_cub,
    run_train,
    write_split,
)


# ---------------------------------------------------------------------------------------------
# Tiny trees in the paper's layout
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def tokenizer(tiny_clip):
    return tiny_clip.tokenizer


@pytest.fixture
def cub(tmp_path) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path / "birds"
    return root, make_cub(root)


def datamodule(tokenizer, dataset: str, root: Path, **kwargs) -> PaperLayoutDataModule:
    kwargs = {"image_size": 32, "batch_size": 2, "num_workers": 0, **kwargs}
    return PaperLayoutDataModule(tokenizer, dataset, root, **kwargs)


# ---------------------------------------------------------------------------------------------
# CUB / COCO folders
# ---------------------------------------------------------------------------------------------
def test_bbox_crop_matches_the_official_formula():
    image = Image.new("RGB", (200, 100))
    # r = int(0.75 * 40) = 30, centre (int(140 / 2), int(70 / 2)) = (70, 35): box (40, 5, 100, 65)
    assert bbox_crop(image, (50, 20, 40, 30)).size == (60, 60)
    # clipped to the image: centre (10, 10), r = 15 -> (0, 0, 25, 25)
    assert bbox_crop(image, (0, 0, 20, 20)).size == (25, 25)


def test_cub_loads_with_shapes_captions_and_bbox_crops(cub, tokenizer):
    root, splits = cub
    dm = datamodule(tokenizer, "cub", root)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 4 train images, batch 2, drop_last
    for batch in batches:
        check_batch(batch)
        assert batch["image"].shape == (2, 3, 32, 32)
        for key, caption, tokens in zip(batch["key"], batch["caption"], batch["tokens"], strict=True):
            assert caption in captions_of(key)
            assert torch.equal(tokens, tokenizer([caption])[0].long())
    assert sorted(k for b in batches for k in b["key"]) == sorted(splits["train"])
    # Evaluation: the bounding-box crop keeps the red bird mostly in view (the whole image is mostly blue).
    val = next(iter(dm.val_dataloader()))
    assert val["key"] == splits["test"]
    red = (val["image"][:, 0] > 0.3) & (val["image"][:, 2] < 0)
    assert (red.float().mean(dim=(1, 2)) > 0.3).all()


def test_training_draws_every_caption_and_evaluation_fixes_one(cub, tokenizer):
    root, _ = cub
    dm = datamodule(tokenizer, "cub", root)
    train, test = dm.datasets["train"], dm.datasets["test"]
    random.seed(0)
    assert {train[0]["caption"] for _ in range(40)} == set(captions_of(train.keys[0]))
    assert len({test[1]["caption"] for _ in range(10)}) == 1
    assert torch.equal(test[1]["image"], test[1]["image"])  # centre crop, no flip


@pytest.mark.parametrize("jpg_level", [True, False])
def test_coco_layout_with_or_without_the_jpg_level(tmp_path, tokenizer, jpg_level):
    splits = make_coco(tmp_path / "coco", jpg_level)
    dm = datamodule(tokenizer, "coco", tmp_path / "coco", batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch)
    assert batch["image"].shape == (3, 3, 32, 32)
    assert sorted(batch["key"]) == splits["train"]
    assert all(c in captions_of(k) for k, c in zip(batch["key"], batch["caption"], strict=True))
    assert next(iter(dm.val_dataloader()))["key"] == splits["test"]  # test = val2014


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("text/002.Bird_1/Bird_1_001_101.txt", "caption file"),
        ("CUB_200_2011/images/001.Bird_0/Bird_0_004_104.jpg", "image"),
        ("train/filenames.pickle", "split list"),
        ("CUB_200_2011/bounding_boxes.txt", "bounding boxes"),
    ],
)
def test_a_missing_file_is_one_line_naming_it_and_its_source(cub, tokenizer, remove, named):
    root, _ = cub
    (root / remove).unlink()
    with pytest.raises(DatasetMissing) as info:
        datamodule(tokenizer, "cub", root)
    message = str(info.value)
    assert "\n" not in message and named in message
    assert str(root / remove) in message and "DF-GAN" in message


def test_a_missing_root_or_an_empty_split_is_an_error(tmp_path, tokenizer):
    with pytest.raises(DatasetMissing, match="coco"):
        datamodule(tokenizer, "coco", tmp_path / "nowhere")
    root = tmp_path / "birds"
    make_cub(root)
    write_split(root, "test", [])
    with pytest.raises(DatasetMissing, match="empty"):
        datamodule(tokenizer, "cub", root)


def test_split_lists_may_not_unpickle_objects(cub, tokenizer):
    root, _ = cub
    (root / "train" / "filenames.pickle").write_bytes(pickle.dumps([Path("x")]))
    with pytest.raises(pickle.UnpicklingError, match="list of strings"):
        datamodule(tokenizer, "cub", root)


def test_train_entry_point_stops_with_one_line_when_data_is_missing(tmp_path):

    args = ["+experiment=cub", "clip=tiny", "trainer=cpu", f"data.root={tmp_path / 'nowhere'}"]
    proc = run_train([*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("galip: data missing:")]
    assert len(lines) == 1 and str(tmp_path / "nowhere") in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # no empty run directory left behind


# ---------------------------------------------------------------------------------------------
# Converter -> shards -> stream
# ---------------------------------------------------------------------------------------------
def test_converted_cub_streams_back_the_same_images_and_captions(cub, tokenizer, tmp_path):
    root, splits = cub
    written = convert("cub", root, tmp_path / "shards", max_per_shard=3)
    assert [p.name for p in written["train"]] == ["00000.tar", "00001.tar"]
    manifest = json.loads((tmp_path / "shards" / "train" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 4 and manifest["splits"]["train"]["captions"] == 12
    assert manifest["source"].startswith("cub:")

    urls = expand_urls(str(tmp_path / "shards" / "train" / "{00000..00001}.tar"))
    streamed = list(shard_dataset(urls, tokenizer, 32, transform="paper-eval"))
    folder = datamodule(tokenizer, "cub", root).datasets["train"]
    folder.train = False
    assert [s["key"] for s in streamed] == [shard_key(k) for k in splits["train"]]
    for i, sample in enumerate(streamed):
        assert sample["caption"] in captions_of(splits["train"][i])
        assert torch.equal(sample["image"], folder[i]["image"])  # same bytes, same bbox crop, same view


def test_converter_command_line_on_a_folder_of_pairs(tmp_path, tokenizer, capsys):
    pairs = tmp_path / "pairs"
    for i, name in enumerate(["a/one.jpg", "a/two.png", "b/three.jpg"]):
        path = pairs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 30), (10 * i, 100, 50)).save(path)
        path.with_suffix(".txt").write_text(f"picture number {i}\nanother caption {i}\n")
    assert make_shards_main(["folder", "--root", str(pairs), "--out", str(tmp_path / "out")]) == 0
    assert "data.shards=" in capsys.readouterr().out
    samples = list(shard_dataset(str(tmp_path / "out" / "train" / "00000.tar"), tokenizer, 16))
    assert [s["key"] for s in samples] == ["a_one", "a_two", "b_three"]
    assert all(s["image"].shape == (3, 16, 16) for s in samples)
    (pairs / "b" / "three.txt").unlink()  # skipped and counted (tests/test_bad_inputs.py), or with --strict:
    assert make_shards_main(["folder", "--root", str(pairs), "--out", str(tmp_path / "out"), "--strict"]) == 2
    assert "three.jpg: caption not found (no three.txt)" in capsys.readouterr().err


def test_brace_patterns_are_quoted_for_hydra():
    argv = ["x.py", "data.shards=/d/{00000..00009}.tar", "data.val_shards=/d/{a,b}.tar", "model.x={a:1}"]
    assert quote_shard_patterns(argv)[1:] == [
        "data.shards='/d/{00000..00009}.tar'",
        "data.val_shards='/d/{a,b}.tar'",
        "model.x={a:1}",
    ]
    assert quote_shard_patterns(["data.shards='/d/{0..1}.tar'"]) == ["data.shards='/d/{0..1}.tar'"]


def test_webdatamodule_checks_shards_and_workers(tmp_path, tokenizer, cub):
    root, _ = cub
    convert("cub", root, tmp_path / "shards", max_per_shard=2)  # 2 train shards
    pattern = str(tmp_path / "shards" / "train" / "{00000..00002}.tar")
    with pytest.raises(DatasetMissing, match=r"00002\.tar \(1 of 3 missing\)"):
        WebDataModule(tokenizer, shards=pattern)
    with pytest.raises(DatasetMissing, match="data.shards is not set"):
        WebDataModule(tokenizer, shards=None)
    dm = WebDataModule(tokenizer, shards=str(tmp_path / "shards" / "train"), num_workers=3, batch_size=2)
    assert len(dm.urls) == 2  # a folder means its *.tar
    with pytest.raises(ValueError, match="shards cannot feed"):
        dm.train_dataloader()


# ---------------------------------------------------------------------------------------------
# Corrupt data
# ---------------------------------------------------------------------------------------------
def test_corrupt_samples_are_skipped_counted_and_carried_on_the_batches(tmp_path, tokenizer):
    shard = corrupt_shard(tmp_path / "00000.tar")
    counter = SkipCounter()
    samples = list(shard_dataset(str(shard), tokenizer, 16, handler=counter))
    assert [s["key"] for s in samples] == [f"good{i}" for i in range(4)]
    assert counter.count == 2 and counter.by_type["CorruptSample"] == 2
    assert [s["skipped"] for s in samples] == [2, 0, 0, 0]


def test_an_unreadable_shard_is_reported_by_name_and_the_stream_goes_on(tmp_path, tokenizer, caplog):
    good = corrupt_shard(tmp_path / "good.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:3000])  # ends in the middle of a member
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="galip.data.shards"):
        samples = list(
            shard_dataset([str(cut), str(good), str(tmp_path / "absent.tar")], tokenizer, 16, handler=counter)
        )
    assert [s["key"] for s in samples][-4:] == [f"good{i}" for i in range(4)]
    assert counter.bad_shards == {str(cut), str(tmp_path / "absent.tar")}
    assert str(cut) in caplog.text and "unreadable shard" in caplog.text


def test_training_on_a_corrupt_shard_logs_data_skipped(tmp_path, compose):
    from galip.train import train

    for i in range(2):
        corrupt_shard(tmp_path / f"{i:05d}.tar")
    cfg = compose(
        [
            "+experiment=cc12m",
            "clip=tiny",
            "trainer=cpu",
            "logger=csv",
            f"data.shards='{tmp_path}/{{00000..00001}}.tar'",
            "data.num_workers=2",
            "data.batch_size=2",
            "data.shuffle_buffer=0",
            "data.epoch_samples=16",
            "kimg=null",
            "trainer.max_epochs=1",
            "trainer.log_every_n_steps=1",
            "callbacks.sample_grid.every_n_kimg=0",
            "callbacks.checkpoint.every_n_kimg=null",
        ]
    )
    metrics = train(cfg)
    # 16 samples, 2 workers: each worker reads one shard from its start (2 skips), then 8 good samples,
    # which takes it into a second pass over a shard (2 more skips): 4 skips per worker.
    assert metrics["data/skipped"] == 8
    rows = (tmp_path / "out" / "csv").rglob("metrics.csv")
    assert any("data/skipped" in p.read_text().splitlines()[0] for p in rows)


# ---------------------------------------------------------------------------------------------
# Sentence vectors
# ---------------------------------------------------------------------------------------------
def fresh(clip, captions: list[str]) -> torch.Tensor:
    return clip.encode_text(clip.tokenize(captions))


def fake_trainer(clip) -> SimpleNamespace:
    return SimpleNamespace(lightning_module=SimpleNamespace(clip=clip), world_size=1)


def test_folder_cache_equals_fresh_vectors_and_reaches_the_batch(cub, tiny_clip, tokenizer):
    root, splits = cub
    dm = datamodule(tokenizer, "cub", root)
    paths = dm.encode_sentences(tiny_clip, batch_size=5)
    fingerprint = text_fingerprint(tiny_clip)
    assert paths == [cache_path(root / "sent_emb", s, fingerprint) for s in ("train", "test")]
    table = SentenceTable.load(paths[0])
    assert table.keys == splits["train"] and table.fingerprint == fingerprint
    expected = fresh(tiny_clip, [c for k in splits["train"] for c in captions_of(k)])
    torch.testing.assert_close(table.vectors, expected, rtol=1e-5, atol=1e-6)

    dm.trainer = fake_trainer(tiny_clip)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch)
    torch.testing.assert_close(batch["sent_emb"], fresh(tiny_clip, batch["caption"]), rtol=1e-5, atol=1e-6)


def test_an_emptied_caption_file_is_left_out_of_the_cache_as_training_skips_it(
    cub, tiny_clip, tokenizer, caplog
):
    """encode_text does what the loader does with a caption file that has no caption: leaves it out and says
    so (one warning with the count), instead of stopping; training on the cache then skips and counts it."""
    root, splits = cub
    emptied = splits["train"][1]
    (root / "text" / f"{emptied}.txt").write_text("\n \n")
    dm = datamodule(tokenizer, "cub", root, batch_size=len(splits["train"]))
    with caplog.at_level(logging.WARNING, logger="galip.data.paper_layout"):
        train_cache, _ = dm.encode_sentences(tiny_clip)
    table = SentenceTable.load(train_cache)
    assert table.keys == [k for k in splits["train"] if k != emptied]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"cub train: 1 of {len(splits['train'])} caption files have no readable caption" in warning
    assert emptied in warning

    dm.trainer = fake_trainer(tiny_clip)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert emptied not in batch["key"] and batch["skipped"] == 1
    torch.testing.assert_close(batch["sent_emb"], fresh(tiny_clip, batch["caption"]), rtol=1e-5, atol=1e-6)


def test_another_clip_never_reads_the_cache_and_edited_captions_are_caught(cub, tiny_clip, tokenizer):
    from galip.clip import load_clip

    root, splits = cub
    dm = datamodule(tokenizer, "cub", root)
    dm.encode_sentences(tiny_clip)
    torch.manual_seed(1)
    other = load_clip(name=None, model_cfg=TINY_CLIP_CFG)
    assert text_fingerprint(other) != text_fingerprint(tiny_clip)
    dm.trainer = fake_trainer(other)
    dm.setup("fit")
    assert "sent_emb" not in next(iter(dm.train_dataloader()))

    dm.trainer = fake_trainer(tiny_clip)
    dm.setup("fit")
    (root / "text" / f"{splits['train'][0]}.txt").write_text("a new caption\n")
    with pytest.raises(ValueError, match="stale"):
        dm.datasets["train"][0]


def test_shard_sentence_members_equal_fresh_vectors(cub, tiny_clip, tokenizer, tmp_path):
    root, _ = cub
    shards = convert("cub", root, tmp_path / "shards")["train"]
    add_sentence_vectors(shards[0], tiny_clip, batch_size=4)
    ext = sent_member(text_fingerprint(tiny_clip))
    manifest = json.loads((shards[0].parent / "manifest.json").read_text())
    assert manifest["sentence_vectors"][ext]["dim"] == tiny_clip.geometry.embed_dim
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        first = np.load(io.BytesIO(tar.extractfile(names[3]).read()))
    key = names[0].split(".")[0]
    assert sorted(names[:3]) == [f"{key}.{e}" for e in ("jpg", "json", "txt")]
    assert names[3] == f"{key}.{ext}"  # right after its sample's own members, so webdataset groups it in
    assert first.shape == (3, tiny_clip.geometry.embed_dim)

    samples = list(shard_dataset(str(shards[0]), tokenizer, 32, transform="paper-train", sent_ext=ext))
    assert len(samples) == 4
    got = torch.stack([s["sent_emb"] for s in samples])
    torch.testing.assert_close(got, fresh(tiny_clip, [s["caption"] for s in samples]), rtol=1e-5, atol=1e-6)
    plain = list(shard_dataset(str(shards[0]), tokenizer, 32, sent_ext="sent-000000000000.npy"))
    assert all("sent_emb" not in s for s in plain)  # another CLIP's member name: computed fresh instead


def test_encode_text_command_writes_the_cache_training_finds(cub, tmp_path, monkeypatch):
    """The command builds CLIP exactly as training does (same seed), so the fingerprints agree."""
    import lightning as L
    from hydra.utils import instantiate

    from galip.data.encode_text import compose_train_config
    from galip.data.encode_text import main as encode_main

    root, _ = cub
    monkeypatch.chdir(tmp_path)
    overrides = ["+experiment=cub", "clip=tiny", f"data.root={root}", "paths.output_dir=unused"]
    assert encode_main(["--batch-size", "7", *overrides]) == 0
    cfg = compose_train_config(overrides)
    L.seed_everything(cfg.seed)
    clip = instantiate(cfg.clip)
    assert cache_path(root / "sent_emb", "train", text_fingerprint(clip)).is_file()
    assert encode_main([*overrides[:2], f"data.root={tmp_path / 'nowhere'}"]) == 2


def test_encode_text_runs_as_a_module(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "galip.data.encode_text",
            "+experiment=coco",
            "clip=tiny",
            f"data.root={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("galip: data missing:"), proc.stderr[-2000:]
