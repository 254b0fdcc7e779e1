"""Cached sentence vectors: the text tower is frozen, so each caption's ``s`` is computed once.

A cache belongs to one CLIP: it is keyed by `text_fingerprint`, a hash of the text tower's weights, so a
different CLIP (or a retrained tiny one) never reads stale vectors; it simply finds no cache and the
module runs the text tower as usual. Two stores:

* folder layouts (CUB/COCO): ``<cache_dir>/<split>-<fingerprint>.pt`` holding every caption of every
  key (`SentenceTable`), with the captions themselves so an edited ``text/*.txt`` is caught;
* shards: an extra member ``{key}.sent-<fingerprint>.npy`` per sample, float32 (n_captions, D), one row
  per line of ``{key}.txt`` (`sent_member`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

FINGERPRINT_CHARS = 12


def text_fingerprint(clip) -> str:
    """Hash of the weights that produce sentence vectors (everything but the image tower)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(clip.model.state_dict().items()):
        if name.startswith("visual.") or name.startswith("logit_"):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def training_clip_fingerprint(trainer) -> str | None:
    """The fingerprint of the CLIP a Trainer trains with (None outside a Trainer or without a CLIP)."""
    module = trainer.lightning_module if trainer is not None else None
    clip = getattr(module, "clip", None)
    return text_fingerprint(clip) if clip is not None else None


def sent_member(fingerprint: str) -> str:
    """The shard member extension that holds this CLIP's sentence vectors."""
    return f"sent-{fingerprint}.npy"


def cache_path(cache_dir: str | Path, split: str, fingerprint: str) -> Path:
    return Path(cache_dir) / f"{split}-{fingerprint}.pt"


@torch.no_grad()
def encode_captions(
    clip, captions: Sequence[str], batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    """Sentence vectors (N, D) float32 of `captions`, in batches (the text tower on clip's device)."""
    chunks = range(0, len(captions), batch_size)
    rows = [
        clip.encode_text(clip.tokenize(captions[i : i + batch_size])).float().cpu()
        for i in tqdm(chunks, desc="sentence vectors", unit="batch", disable=not progress)
    ]
    return torch.cat(rows) if rows else torch.empty(0, clip.geometry.embed_dim)


@dataclass
class SentenceTable:
    """Every caption's sentence vector for the keys of one split: rows ``offsets[i] : offsets[i] + n_i``."""

    fingerprint: str
    keys: list[str]
    captions: list[list[str]]
    vectors: torch.Tensor  # (total captions, D) float32

    def __post_init__(self):
        counts = torch.tensor([len(c) for c in self.captions], dtype=torch.long)
        self.offsets = torch.cumsum(counts, 0) - counts
        self.index = {key: i for i, key in enumerate(self.keys)}

    @classmethod
    def build(cls, clip, keys: list[str], captions: list[list[str]], batch_size: int = 256) -> SentenceTable:
        flat = [c for per_key in captions for c in per_key]
        vectors = encode_captions(clip, flat, batch_size, progress=True)
        return cls(text_fingerprint(clip), list(keys), [list(c) for c in captions], vectors)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"fingerprint": self.fingerprint, "keys": self.keys, "captions": self.captions}
        tmp = path.with_suffix(".tmp")
        torch.save({**state, "vectors": self.vectors}, tmp)
        tmp.replace(path)  # never leave a half-written cache behind
        return path

    @classmethod
    def load(cls, path: str | Path) -> SentenceTable:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(state["fingerprint"], state["keys"], state["captions"], state["vectors"])

    def lookup(self, key: str, captions: Sequence[str], index: int) -> torch.Tensor:
        """The vector of caption `index` of `key`; raises if the captions changed since encoding."""
        i = self.index.get(key)
        if i is None or self.captions[i] != list(captions):
            raise ValueError(
                f"sentence-vector cache is stale for {key!r} (captions changed or key new): "
                "rerun python -m galip.data.encode_text with the training overrides"
            )
        return self.vectors[self.offsets[i] + index]


def load_table(cache_dir: str | Path, split: str, fingerprint: str) -> SentenceTable | None:
    """The split's table for this CLIP, or None (logged) when it was never encoded."""
    path = cache_path(cache_dir, split, fingerprint)
    if not path.is_file():
        log.info(
            "no sentence-vector cache %s for this CLIP: the text tower runs every step "
            "(python -m galip.data.encode_text builds it)",
            path,
        )
        return None
    log.info("sentence vectors from %s", path)
    return SentenceTable.load(path)
