"""Ways of running the step's convolutions that were measured for issue 7 and not kept (same maths each).

Each experiment times the ViT-B/32 geometry's convs at B=8, fp32, in isolation (median of 3 after a warm-up):

    python benchmarks/conv_alternatives.py layouts     # G's decoder convs: NCHW vs channels_last, fwd / bwd
    python benchmarks/conv_alternatives.py mixed       # forward in channels_last, backward in NCHW (one op)
    python benchmarks/conv_alternatives.py phase_fold  # the 128→224 block's resize + 3×3 conv as 7×7 phases
    python benchmarks/conv_alternatives.py d_gemm      # D's 3×3 convs on 7×7 maps as unfold + one GEMM

Results and the conclusions drawn from them: experiments/benchmarks.md (2026-12-02, "tried, not kept").
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from allocation import repeat_times

import galip  # noqa: F401  (sets huge pages, as every galip run does)

CL = torch.channels_last
B = 8
# G's decoder convs at the ViT-B/32 geometry with the default levers: (name, in, out, input size, kind)
DECODER = [
    ("b1c2 512@8", 512, 512, 8, "conv"),
    ("b2c1 512 8→16 folded", 512, 512, 8, "tconv"),
    ("b2c2 512@16", 512, 512, 16, "conv"),
    ("b3c1 512 16→32 folded", 512, 512, 16, "tconv"),
    ("b3c2 512@32", 512, 512, 32, "conv"),
    ("b4c1 512→256 32→64 folded", 512, 256, 32, "tconv"),
    ("b4c2 256@64", 256, 256, 64, "conv"),
    ("b5c1 256→128 64→128 folded", 256, 128, 64, "tconv"),
    ("b5c2 128@128", 128, 128, 128, "conv"),
    ("b6c1 128→64 @224 (after the resize)", 128, 64, 224, "conv"),
    ("b6c2 64@224", 64, 64, 224, "conv"),
]


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    return statistics.median(repeat_times(fn, repeats))


def conv(x, w, b, kind: str):
    if kind == "conv":
        return F.conv2d(x, w, b, padding=1)
    return F.conv_transpose2d(x, w, b, stride=2, padding=1)


def decoder_operands(c_in: int, c_out: int, size: int, kind: str, fmt=torch.contiguous_format):
    x = torch.randn(B, c_in, size, size).contiguous(memory_format=fmt).requires_grad_()
    shape = (c_out, c_in, 3, 3) if kind == "conv" else (c_in, c_out, 4, 4)
    w = (torch.randn(shape) * 0.01).contiguous(memory_format=fmt).requires_grad_()
    return x, w, torch.zeros(c_out, requires_grad=True)


def layouts() -> None:
    for name, c_in, c_out, size, kind in DECODER:
        for label, fmt in (("nchw", torch.contiguous_format), ("cl", CL)):
            x, w, b = decoder_operands(c_in, c_out, size, kind, fmt)
            with torch.no_grad():
                fwd = median_time(lambda: conv(x, w, b, kind))  # noqa: B023
            y = conv(x, w, b, kind)
            g = torch.randn_like(y)
            bwd = median_time(lambda: torch.autograd.grad(y, (x, w, b), g, retain_graph=True))  # noqa: B023
            print(f"{name:38s} {label:4s} fwd {fwd:.3f} s  bwd {bwd:.3f} s", flush=True)


class ForwardChannelsLast(torch.autograd.Function):
    """conv forward on channels_last copies, its backward on NCHW ones (oneDNN's faster kernel each way)."""

    @staticmethod
    def forward(ctx, x, w, b, kind):
        ctx.save_for_backward(x, w)
        ctx.kind = kind
        return conv(x.contiguous(memory_format=CL), w.contiguous(memory_format=CL), b, kind).contiguous()

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        transposed = ctx.kind == "tconv"
        stride = [2, 2] if transposed else [1, 1]
        bias_sizes = [w.shape[1] if transposed else w.shape[0]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad.contiguous(), x.contiguous(), w.contiguous(), bias_sizes, stride, [1, 1], [1, 1],
            transposed, [0, 0], 1, [True, True, True],
        )  # fmt: skip
        return gx, gw, gb, None


def mixed() -> None:
    total = {"plain": 0.0, "mixed": 0.0}
    for name, c_in, c_out, size, kind in DECODER:
        x, w, b = decoder_operands(c_in, c_out, size, kind)
        err = (conv(x, w, b, kind) - ForwardChannelsLast.apply(x, w, b, kind)).abs().max().item()
        row = {}
        for label, fn in (("plain", conv), ("mixed", ForwardChannelsLast.apply)):

            def fwd_bwd(fn=fn, x=x, w=w, b=b, kind=kind):
                y = fn(x, w, b, kind)
                y.backward(torch.ones_like(y))

            row[label] = median_time(fwd_bwd)
            total[label] += row[label]
        print(f"{name:38s} fwd+bwd plain {row['plain']:.3f} s  mixed {row['mixed']:.3f} s  |Δ| {err:.1e}")
    print(f"all decoder convs: plain {total['plain']:.2f} s, mixed {total['mixed']:.2f} s")


def phase_groups(n_in: int, n_out: int):
    """Per axis, the output phases of a 3-tap conv after a nearest n_in→n_out resize, grouped by the input
    offsets they read; each with its fold matrix [n_offsets, 3] from the 3 taps to those offsets."""
    g = math.gcd(n_in, n_out)
    phases, period = n_out // g, n_in // g
    groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for p in range(phases):
        offsets: dict[int, list[int]] = {}
        for tap in range(3):
            offsets.setdefault(math.floor((p + tap - 1) * period / phases), []).append(tap)
        key = tuple(sorted(offsets))
        fold = torch.zeros(len(key), 3)
        for row, offset in enumerate(key):
            fold[row, offsets[offset]] = 1.0
        groups.setdefault(key, []).append((p, fold))
    return phases, period, groups


def phase_fold_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, n_out: int) -> torch.Tensor:
    """conv2d(resize_nearest(x, n_out), w, b, padding=1) as one strided conv per group of output phases."""
    n, _, n_in, _ = x.shape
    phases, period, groups = phase_groups(n_in, n_out)
    k = n_in // period
    padded = F.pad(x, (1, 1, 1, 1))
    out = x.new_empty(n, w.shape[0], k, phases, k, phases)
    for key_y, group_y in groups.items():
        for key_x, group_x in groups.items():
            kernel = torch.cat(
                [
                    torch.einsum("ad,ocde,be->ocab", fy.to(w), w, fx.to(w))
                    for _, fy in group_y
                    for _, fx in group_x
                ]
            )
            rows = slice(key_y[0] + 1, key_y[0] + 1 + period * (k - 1) + len(key_y))
            cols = slice(key_x[0] + 1, key_x[0] + 1 + period * (k - 1) + len(key_x))
            y = F.conv2d(padded[:, :, rows, cols], kernel, None, stride=period)
            y = y.view(n, len(group_y), len(group_x), w.shape[0], k, k)
            for i, (py, _) in enumerate(group_y):
                for j, (px, _) in enumerate(group_x):
                    out[:, :, :, py, :, px] = y[:, i, j]
    return out.view(n, w.shape[0], n_out, n_out) + b[:, None, None]


def phase_fold() -> None:
    x64, w64 = torch.randn(2, 5, 8, 8, dtype=torch.double), torch.randn(3, 5, 3, 3, dtype=torch.double)
    ref = F.conv2d(F.interpolate(x64, size=(14, 14), mode="nearest"), w64, None, padding=1)
    err = (phase_fold_conv(x64, w64, torch.zeros(3, dtype=torch.double), 14) - ref).abs().max().item()
    print(f"8→14 (the same 7/4 ratio), float64: max |Δ| {err:.1e}")
    x, w, b = decoder_operands(128, 64, 128, "conv")
    plain = lambda: F.conv2d(F.interpolate(x, size=(224, 224), mode="nearest"), w, b, padding=1)  # noqa: E731
    for label, fn in (("resize + conv", plain), ("phase fold", lambda: phase_fold_conv(x, w, b, 224))) * 2:
        with torch.no_grad():
            fwd = median_time(fn)

        def fwd_bwd(fn=fn):
            y = fn()
            y.backward(torch.ones_like(y))

        print(
            f"128→64, 128→224: {label:14s} fwd {fwd:.3f} s  fwd+bwd {median_time(fwd_bwd):.3f} s", flush=True
        )


def gemm_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n, _, h, width = x.shape
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(n * h * width, -1)  # [B·HW, C·9]
    return (cols @ w.flatten(1).t()).view(n, h, width, -1).permute(0, 3, 1, 2)


def d_gemm() -> None:
    for c_in, c_out in ((768, 768), (768, 512), (512, 512)):
        x = torch.randn(B, c_in, 7, 7, requires_grad=True)
        w = (torch.randn(c_out, c_in, 3, 3) * 0.01).requires_grad_()
        xc = x.detach().contiguous(memory_format=CL).requires_grad_()
        wc = w.detach().contiguous(memory_format=CL).requires_grad_()
        plain = lambda a, k: F.conv2d(a, k, padding=1)  # noqa: E731
        for label, fn, a, k in (
            ("conv nchw", plain, x, w),
            ("conv cl", plain, xc, wc),
            ("gemm", gemm_conv, x, w),
        ):

            def fwd_bwd(fn=fn, a=a, k=k):
                y = fn(a, k)
                torch.autograd.grad(y, (a, k), torch.ones_like(y))

            def double(fn=fn, a=a, k=k):  # MAGP's pattern: input gradient with a graph, then its backward
                (g,) = torch.autograd.grad(fn(a, k).pow(2).sum(), a, create_graph=True)
                torch.autograd.grad(g.pow(2).sum(), (k,))

            with torch.no_grad():
                fwd = median_time(lambda fn=fn, a=a, k=k: fn(a, k))
            print(
                f"{c_in}→{c_out} @7×7 {label:9s} fwd {fwd * 1e3:.1f} ms  fwd+bwd {median_time(fwd_bwd) * 1e3:.1f} ms"
                f"  double {median_time(double) * 1e3:.1f} ms",
                flush=True,
            )


EXPERIMENTS = {"layouts": layouts, "mixed": mixed, "phase_fold": phase_fold, "d_gemm": d_gemm}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    EXPERIMENTS[parser.parse_args().experiment]()
