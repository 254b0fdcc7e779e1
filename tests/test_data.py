"""Data layer: the batch contract, determinism and shard round trips (the embedded world as a data source)."""

import io
import os
import tarfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip
import pytest
import torch
from PIL import Image

from galip.data import (
    RandomCaptionDataModule,
    SkipCounter,
    Tokenized,
    check_batch,
    check_worker_count,
    collate,
    list_shards,
    shard_dataset,
    write_shards,
)
from galip.world.scenes import ShapesWorld


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


def test_collate_builds_the_batch_contract(tokenizer):
    samples = [Tokenized(ShapesWorld(length=4, image_size=32), tokenizer)[i] for i in range(4)]
    for s in samples:
        s["sent_emb"] = torch.randn(16)
    batch = collate(samples)
    check_batch(batch)
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["tokens"].shape == (4, 77) and batch["tokens"].dtype == torch.long
    assert batch["sent_emb"].shape == (4, 16)
    assert batch["labels"]["colour"].shape == (4, 3)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_random_caption_datamodule_is_deterministic(tokenizer):
    def first_val_batch(seed):
        dm = RandomCaptionDataModule(tokenizer, image_size=32, n_train=16, n_val=8, batch_size=4, seed=seed)
        dm.setup("fit")
        return dm, next(iter(dm.val_dataloader()))

    dm, a = first_val_batch(0)
    _, b = first_val_batch(0)
    _, c = first_val_batch(1)
    check_batch(a)
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert not torch.equal(a["image"], c["image"])
    train = list(dm.train_dataloader())
    assert len(train) == 4 and all(t["image"].shape == (4, 3, 32, 32) for t in train)
    assert torch.equal(dm.train_set[3]["image"], dm.train_set[3]["image"])
    assert not torch.equal(dm.train_set[0]["image"], dm.val_set[0]["image"])


def test_shard_round_trip(tmp_path, tokenizer):
    world = ShapesWorld(seed=0, split="train", length=10, image_size=32)
    paths = write_shards(world.shard_samples(), tmp_path, prefix="train", max_per_shard=4, image_format="png")
    assert len(paths) == 3 and list_shards(tmp_path, "train") == [str(p) for p in paths]
    read = list(shard_dataset([str(p) for p in paths], tokenizer, image_size=32))
    assert [s["key"] for s in read] == [world[i]["key"] for i in range(10)]
    for i, sample in enumerate(read):
        expected = world[i]
        assert sample["caption"] == expected["caption"]
        assert torch.equal(sample["image"], expected["image"])
        assert all(torch.equal(sample["labels"][k], v) for k, v in expected["labels"].items())
    manifest = (tmp_path / "manifest.json").read_text()
    assert '"count": 10' in manifest


def test_resampled_stream_is_a_function_of_seed_and_rank(tmp_path, tokenizer, monkeypatch):
    """The training stream's shard draws replay for a seed and differ between seeds and between ranks
    (webdataset's own resampling seeds from the clock and os.urandom)."""
    world = ShapesWorld(seed=0, split="train", length=12, image_size=16)
    paths = [str(p) for p in write_shards(world.shard_samples(), tmp_path, prefix="train", max_per_shard=1)]

    def keys(seed: int, rank: int) -> list[str]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = shard_dataset(paths, tokenizer, image_size=16, resampled=True, epoch_length=20, seed=seed)
        return [s["key"] for s in stream]

    first = keys(0, 0)
    assert len(first) == 20 and first == keys(0, 0)
    assert keys(1, 0) != first
    assert keys(0, 1) != first


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_sample_is_skipped_and_counted(tmp_path, tokenizer):
    good = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(good, format="PNG")
    path = tmp_path / "bad-000000.tar"
    with tarfile.open(path, "w") as tar:
        _add_member(tar, "a.jpg", b"this is not a jpeg")
        _add_member(tar, "a.txt", b"broken")
        _add_member(tar, "b.png", good.getvalue())
        _add_member(tar, "b.txt", b"a green square")
    counter = SkipCounter()
    read = list(shard_dataset(str(path), tokenizer, image_size=16, handler=counter))
    assert [s["caption"] for s in read] == ["a green square"]
    assert counter.count == 1


def test_too_many_workers_for_shards_is_a_clear_error():
    check_worker_count(4, 2, world_size=2)
    with pytest.raises(ValueError, match="shards cannot feed"):
        check_worker_count(2, 2, world_size=2)
