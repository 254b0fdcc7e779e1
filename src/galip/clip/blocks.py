"""Running one frozen CLIP-ViT block with gradients: open_clip's block, with its attention's projections
as plain 2-D matmuls.

``nn.MultiheadAttention(batch_first=True)`` transposes its [B, L, width] input to a strided [L, B, width]
view and projects that view, which PyTorch runs as L small batched matmuls with the weight broadcast over
them (``bmm``); on the contiguous [B·L, width] rows the same projection is one GEMM. `run_block` does the
block's maths itself in that layout: LayerNorm, QKV projection, ``scaled_dot_product_attention`` (the
kernel MultiheadAttention calls too), output projection, LayerScale, MLP. Anything that is not a plain
open_clip ``ResidualAttentionBlock`` runs as ``block(x)``, and so does every block without autograd
(MultiheadAttention then has its own fused inference path).

After ``set_gemm_attention(False)`` (benchmarks/speed.py without the lever ``gemm_attention``) a plain block
runs as the official code runs OpenAI's CLIP blocks, with and without autograd: on the sequence-first
[L, B, width] view, through MultiheadAttention's sequence-first path (its projections are then GEMMs on
contiguous rows, and it has no fused inference path), so that the benchmark's reproduction of the official
computation also times like it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_GEMM_ATTENTION = True


def set_gemm_attention(enabled: bool) -> None:
    """Process-wide: False makes `run_block` call every block itself."""
    global _GEMM_ATTENTION
    _GEMM_ATTENTION = enabled


def run_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` for a batch-first [B, L, width] input, the same values and gradients."""
    if not _GEMM_ATTENTION and _is_plain(block):
        return _sequence_first(block, x)
    if not (_GEMM_ATTENTION and torch.is_grad_enabled() and _is_plain(block)):
        return block(x)
    x = x + block.ls_1(_self_attention(block.attn, block.ln_1(x)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _sequence_first(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block on x's [L, B, width] view, as a sequence-first MultiheadAttention runs it."""
    x = x.transpose(0, 1)
    h = block.ln_1(x)
    attn = block.attn
    out = F.multi_head_attention_forward(
        h,
        h,
        h,
        attn.embed_dim,
        attn.num_heads,
        attn.in_proj_weight,
        attn.in_proj_bias,
        None,
        None,
        False,
        attn.dropout,
        attn.out_proj.weight,
        attn.out_proj.bias,
        training=attn.training,
        need_weights=False,
    )[0]
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x.transpose(0, 1)


def _self_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    b, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, L, 3·width]: one GEMM
    q, k, v = qkv.view(b, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # each [B, H, L, d]
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(b, length, width)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def _is_plain(block: nn.Module) -> bool:
    """An open_clip ResidualAttentionBlock whose attention is plain batch-first self-attention."""
    attn = getattr(block, "attn", None)
    return (
        all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))
        and not hasattr(block, "ln_1_kv")
        and isinstance(attn, nn.MultiheadAttention)
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and attn.bias_k is None
        and not attn.add_zero_attn
        and (attn.dropout == 0.0 or not attn.training)
    )
