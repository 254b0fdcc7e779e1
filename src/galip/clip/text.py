"""The sentence vector of the frozen text tower, computed over the captions' own tokens only.

open_clip's text tower reads every caption as its full context (77 tokens for CLIP), most of it padding after
the end-of-text token, and pools the feature at that token. Its attention is causal, so a token's feature
depends on the tokens before it only: the padding changes nothing the pool reads. `sentence_vectors` runs
the tower on the first ``max(end-of-text position) + 1`` tokens of the batch (~16 of 77 for a COCO or CUB
caption) and gives the same vectors up to float summation order. Towers built otherwise (another pooling,
no causal mask) run as open_clip runs them, and so does everything after ``set_text_prefix(False)``
(benchmarks/speed.py without the lever ``text_prefix``: the official code's full-context pass).
"""

from __future__ import annotations

import torch
from torch import nn

from galip.clip.blocks import causal_mask, run_block

_TEXT_PREFIX = True


def set_text_prefix(enabled: bool) -> None:
    """Process-wide: False makes `sentence_vectors` open_clip's own ``encode_text`` on the full context."""
    global _TEXT_PREFIX
    _TEXT_PREFIX = enabled


def sentence_vectors(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` (projected end-of-text features, not normalised)."""
    if not (_TEXT_PREFIX and _causal_argmax_tower(model)):
        return model.encode_text(tokens, normalize=False)
    end = tokens.argmax(dim=-1)  # open_clip's "argmax" pool: the end-of-text token has the largest id
    length = int(end.max()) + 1
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :length]).to(cast) + model.positional_embedding[:length].to(cast)
    for block in model.transformer.resblocks:
        x = run_block(block, x, causal=True)
    x = model.ln_final(x)[torch.arange(x.shape[0], device=x.device), end]
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def _causal_argmax_tower(model: nn.Module) -> bool:
    """open_clip's CLIP text tower with a causal mask, pooled at the end-of-text token."""
    transformer = getattr(model, "transformer", None)
    mask = getattr(model, "attn_mask", None)
    return (
        all(hasattr(model, name) for name in ("token_embedding", "positional_embedding", "ln_final"))
        and hasattr(model, "text_projection")
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(transformer, "batch_first", False)
        and not getattr(transformer, "grad_checkpointing", True)
        and isinstance(mask, torch.Tensor)
        and torch.equal(mask, causal_mask(len(mask), mask))
    )
