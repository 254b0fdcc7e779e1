"""Running one frozen CLIP block: open_clip's block, with its attention's projections as plain 2-D matmuls.

``nn.MultiheadAttention(batch_first=True)`` transposes its [B, L, width] input to a strided [L, B, width]
view and projects that view, which PyTorch runs as L small batched matmuls with the weight broadcast over
them (``bmm``); on the contiguous [B·L, width] rows the same projection is one GEMM. `run_block` does the
block's maths itself in that layout: LayerNorm, QKV projection, ``scaled_dot_product_attention`` (the
kernel MultiheadAttention calls too), output projection, LayerScale, MLP. Anything that is not a plain
open_clip ``ResidualAttentionBlock`` runs as ``block(x)``, and so does every block without autograd where
oneDNN's GEMM does not apply (MultiheadAttention then has its own fused inference path).

On the CPU in fp32 the block's four projections go to oneDNN's GEMM (`frozen_linear`), which runs these
shapes (a few hundred rows, 512-3072 wide) ~30 % faster than the MKL sgemm behind ``F.linear``
(experiments/benchmarks.md); the blocks then take this path without autograd too, instead of
MultiheadAttention's fused inference path, whose projections are MKL's. ``set_onednn_linear(False)`` (the
benchmark without the lever ``onednn_linear``) keeps ``F.linear``. Same maths: only the GEMM's summation
order differs.

After ``set_gemm_attention(False)`` (benchmarks/speed.py without the lever ``gemm_attention``) a plain block
runs as the official code runs OpenAI's CLIP blocks, with and without autograd: on the sequence-first
[L, B, width] view, through MultiheadAttention's sequence-first path (its projections are then GEMMs on
contiguous rows, and it has no fused inference path), so that the benchmark's reproduction of the official
computation also times like it.

``causal=True`` runs a text-tower block: attention under the causal mask open_clip's text tower uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_GEMM_ATTENTION = True
_ONEDNN_LINEAR = True
_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def set_gemm_attention(enabled: bool) -> None:
    """Process-wide: False makes `run_block` call every block itself."""
    global _GEMM_ATTENTION
    _GEMM_ATTENTION = enabled


def set_onednn_linear(enabled: bool) -> None:
    """Process-wide: False makes `frozen_linear` plain ``F.linear``."""
    global _ONEDNN_LINEAR
    _ONEDNN_LINEAR = enabled


def run_block(block: nn.Module, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """``block(x)`` for a batch-first [B, L, width] input, the same values and gradients."""
    plain = _is_plain(block)
    if plain and not _GEMM_ATTENTION:
        return _sequence_first(block, x, causal)
    if not (plain and (torch.is_grad_enabled() or _onednn(x, block.attn.in_proj_weight))):
        return block(x, attn_mask=causal_mask(x.shape[1], x)) if causal else block(x)
    x = x + block.ls_1(_self_attention(block.attn, block.ln_1(x), causal))
    return x + block.ls_2(_mlp(block.mlp, block.ln_2(x)))


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for weights that take no gradient, run by oneDNN on the CPU in fp32."""
    if not _onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_linear(x, weight, bias)


class _OneDNNLinear(torch.autograd.Function):
    """Its input's gradient is `frozen_linear` of the weight's transposed view (a GEMM oneDNN reads in
    place), so a double backward goes through it too; the weight and bias take none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return frozen_linear(grad, weight.t(), None), None, None


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    return (
        _ONEDNN_LINEAR
        and _HAS_ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not weight.requires_grad
        and (bias is None or not bias.requires_grad)
        and not torch.is_autocast_enabled("cpu")  # autocast's bf16 GEMMs are F.linear's
        and not torch.compiler.is_compiling()  # inductor lowers this op only for packed constant weights
    )


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's Linear-act-Linear MLP with `frozen_linear`; any other MLP as it is."""
    if not (
        isinstance(mlp, nn.Sequential) and [n for n, _ in mlp.named_children()] == ["c_fc", "gelu", "c_proj"]
    ):
        return mlp(x)
    x = frozen_linear(x, mlp.c_fc.weight, mlp.c_fc.bias)
    return frozen_linear(mlp.gelu(x), mlp.c_proj.weight, mlp.c_proj.bias)


def causal_mask(length: int, like: torch.Tensor) -> torch.Tensor:
    """open_clip's text mask: [length, length], -inf above the diagonal, on ``like``'s device and dtype."""
    return torch.full((length, length), float("-inf"), device=like.device, dtype=like.dtype).triu_(1)


def _sequence_first(block: nn.Module, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """The block on x's [L, B, width] view, as a sequence-first MultiheadAttention runs it."""
    mask = causal_mask(x.shape[1], x) if causal else None
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
        attn_mask=mask,
    )[0]
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x.transpose(0, 1)


def _self_attention(attn: nn.MultiheadAttention, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
    b, length, width = x.shape
    heads = attn.num_heads
    qkv = frozen_linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, L, 3·width]: one GEMM
    q, k, v = qkv.view(b, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # each [B, H, L, d]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = out.transpose(1, 2).reshape(b, length, width)
    return frozen_linear(out, attn.out_proj.weight, attn.out_proj.bias)


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
