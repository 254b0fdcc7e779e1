"""Data sources. Every loader yields the same batch: {image, caption, tokens[, sent_emb]} (see `batch`)."""

from galip.data.batch import (
    CONTEXT_LENGTH,
    Tokenized,
    Tokenizer,
    check_batch,
    collate,
    pil_to_tensor,
    tensor_to_pil,
    tokenize_one,
)
from galip.data.paper_layout import DatasetMissing, PaperLayout, PaperLayoutDataModule, PaperLayoutDataset
from galip.data.random_captions import RandomCaptionDataModule, RandomCaptionDataset
from galip.data.sentences import SentenceTable, text_fingerprint
from galip.data.shards import (
    CorruptSample,
    SkipCounter,
    check_worker_count,
    decode_sample,
    list_shards,
    shard_dataset,
    shard_loader,
    skipped,
    write_shards,
)
from galip.data.webdataset import WebDataModule, expand_urls

__all__ = [
    "CONTEXT_LENGTH",
    "CorruptSample",
    "DatasetMissing",
    "PaperLayout",
    "PaperLayoutDataModule",
    "PaperLayoutDataset",
    "RandomCaptionDataModule",
    "RandomCaptionDataset",
    "SentenceTable",
    "SkipCounter",
    "Tokenized",
    "Tokenizer",
    "WebDataModule",
    "check_batch",
    "check_worker_count",
    "collate",
    "decode_sample",
    "expand_urls",
    "list_shards",
    "pil_to_tensor",
    "shard_dataset",
    "shard_loader",
    "skipped",
    "tensor_to_pil",
    "text_fingerprint",
    "tokenize_one",
    "write_shards",
]


# The embedded shapes world moved to its own package; a name of it looked up here says where it went.
_MOVED = (
    "BACKGROUNDS",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Obj",
    "Scene",
    "ShapesDataModule",
    "ShapesWorld",
    "sample_scene",
    "write_shapes_shards",
)


def __getattr__(name: str):
    if name == "shapes":
        raise AttributeError("galip.data.shapes moved to the embedded world's package: galip.world.scenes")
    if name in _MOVED:
        raise AttributeError(
            f"galip.data.{name} moved to the embedded world's package: galip.world.scenes.{name}"
        )
    raise AttributeError(f"module 'galip.data' has no attribute {name!r}")
