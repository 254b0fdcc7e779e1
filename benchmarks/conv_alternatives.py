"""Ways of running the step's convolutions that were measured for issue 7 and not kept (same maths each).

Each experiment times the ViT-B/32 geometry's convs at B=8, fp32, in isolation (median of 3 after a warm-up):

    python benchmarks/conv_alternatives.py layouts     # G's decoder convs: NCHW vs channels_last, fwd / bwd
    python benchmarks/conv_alternatives.py mixed       # forward in channels_last, backward in NCHW (one op)
    python benchmarks/conv_alternatives.py phase_fold  # the 128→224 block's resize + 3×3 conv as 7×7 phases
    python benchmarks/conv_alternatives.py d_gemm      # D's 3×3 convs on 7×7 maps as unfold + one GEMM
    python benchmarks/conv_alternatives.py rates       # GFLOP/s of each decoder conv, fwd and bwd, against sgemm
    python benchmarks/conv_alternatives.py winograd    # Winograd F(2×2,3×3) with its transforms in PyTorch ops
    python benchmarks/conv_alternatives.py nnpack      # NNPACK's conv forward (torch's private op) against oneDNN
    python benchmarks/conv_alternatives.py subpixel    # the folded 2× convs as one 2×2 conv over 4 output phases

Results and the conclusions drawn from them: experiments/benchmarks.md ("tried, not kept") and its log.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from allocation import repeat_times
from profile_step import sgemm_gflops

import galip  # noqa: F401  (sets huge pages, as every galip run does)
from galip.models.layers import upsample2x_conv3x3

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


def conv_flops(c_in: int, c_out: int, size: int, kind: str) -> float:
    """Multiply-adds × 2 of one forward: 9 taps per output pixel, or 16 per input pixel (the folded tconv)."""
    return 2.0 * B * c_in * c_out * size * size * (9 if kind == "conv" else 16)


def rates() -> None:
    """How close each of G's decoder convs runs to the CPU's peak, forward and backward (default layout)."""
    print(f"sgemm 2048³: {sgemm_gflops():.0f} GFLOP/s on {torch.get_num_threads()} threads")
    total_s = total_f = 0.0
    for name, c_in, c_out, size, kind in DECODER:
        x, w, b = decoder_operands(c_in, c_out, size, kind)
        with torch.no_grad():
            fwd = median_time(lambda: conv(x, w, b, kind))  # noqa: B023
        y = conv(x, w, b, kind)
        g = torch.randn_like(y)
        bwd = median_time(lambda: torch.autograd.grad(y, (x, w, b), g, retain_graph=True))  # noqa: B023
        f = conv_flops(c_in, c_out, size, kind) / 1e9
        total_s, total_f = total_s + fwd + bwd, total_f + 3 * f
        print(
            f"{name:38s} fwd {fwd:.3f} s {f / fwd:4.0f} GFLOP/s  bwd {bwd:.3f} s {2 * f / bwd:4.0f} GFLOP/s"
        )
    print(
        f"all decoder convs, fwd+bwd: {total_s:.2f} s, {total_f:.0f} GFLOP, {total_f / total_s:.0f} GFLOP/s"
    )


_WINOGRAD_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def _winograd_input_1d(d: torch.Tensor, dim: int, tiles: int) -> torch.Tensor:
    """Bᵀ of F(2,3) along ``dim``: 4-wide windows at stride 2 -> (d0-d2, d1+d2, d2-d1, d1-d3), stacked first."""
    d0, d1, d2, d3 = (d.narrow(dim, k, 2 * tiles - 1).unfold(dim, 1, 2).squeeze(-1) for k in range(4))
    return torch.stack((d0 - d2, d1 + d2, d2 - d1, d1 - d3))


def winograd_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """conv2d(x, w, padding=1) for a 3×3 ``w`` as Winograd F(2×2,3×3): 16 multiplies per 2×2 outputs instead
    of 36, as 16 GEMMs over channels; transforms in plain PyTorch ops, so autograd (and MAGP's double
    backward) goes through it."""
    n, c, h, width = x.shape
    th, tw = (h + 1) // 2, (width + 1) // 2
    xp = F.pad(x, (1, 2 * tw - width + 1, 1, 2 * th - h + 1)).permute(0, 2, 3, 1)  # [n, 2th+2, 2tw+2, c]
    u = _winograd_input_1d(_winograd_input_1d(xp, 1, th), 3, tw)  # [4, 4, n, th, tw, c]
    g = _WINOGRAD_G.to(w)
    v = torch.einsum("ai,ocij,bj->baco", g, w, g).reshape(16, c, -1)
    m = torch.bmm(u.reshape(16, n * th * tw, c), v).view(4, 4, n, th, tw, -1)
    o = torch.stack((m[:, 0] + m[:, 1] + m[:, 2], m[:, 1] - m[:, 2] - m[:, 3]), 1)  # Aᵀ along rows
    o = torch.stack((o[0] + o[1] + o[2], o[1] - o[2] - o[3]))  # and along columns: [2, 2, n, th, tw, c_out]
    return o.permute(2, 3, 1, 4, 0, 5).reshape(n, 2 * th, 2 * tw, -1)[:, :h, :width].permute(0, 3, 1, 2)


def winograd() -> None:
    x64, w64 = torch.randn(2, 5, 7, 8, dtype=torch.double), torch.randn(3, 5, 3, 3, dtype=torch.double)
    err = (winograd_conv(x64, w64) - F.conv2d(x64, w64, padding=1)).abs().max().item()
    print(f"float64 check: max |Δ| {err:.1e}")
    shapes = [
        (name, c_in, c_out, size, CL if size <= 8 else torch.contiguous_format)
        for name, c_in, c_out, size, kind in DECODER
        if kind == "conv"
    ]
    shapes += [("D 768@7 (B=8)", 768, 768, 7, CL), ("D 768→512 @7", 768, 512, 7, CL)]
    for name, c_in, c_out, size, fmt in shapes:
        x, w, _ = decoder_operands(c_in, c_out, size, "conv", fmt)
        row = []
        for fn in (lambda: F.conv2d(x, w, padding=1), lambda: winograd_conv(x, w)):  # noqa: B023

            def fwd_bwd(fn=fn):
                torch.autograd.grad(fn(), (x, w), torch.ones(B, c_out, size, size))  # noqa: B023

            row.append(median_time(fwd_bwd))
        err = (F.conv2d(x, w, padding=1) - winograd_conv(x, w)).abs().max().item()
        print(f"{name:38s} fwd+bwd direct {row[0]:.3f} s  winograd {row[1]:.3f} s  |Δ| {err:.1e}", flush=True)


def nnpack() -> None:
    """NNPACK's convs (torch's private op, forward only; it fails until `_nnpack_available` initialises it)."""
    print(f"NNPACK available: {torch._nnpack_available()}")
    for name, c_in, c_out, size, kind in DECODER:
        if kind != "conv":
            continue
        x, w, b = (t.detach() for t in decoder_operands(c_in, c_out, size, kind))
        exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
        row = []
        for fn in (
            lambda: F.conv2d(x, w, b, padding=1),  # noqa: B023
            lambda: torch._nnpack_spatial_convolution(x, w, b, (1, 1)),  # noqa: B023
        ):
            row.append((median_time(fn), fn()))
        (t_dnn, y_dnn), (t_nnp, y_nnp) = row
        err_dnn, err_nnp = ((y.double() - exact).abs().max().item() for y in (y_dnn, y_nnp))
        print(
            f"{name:38s} fwd oneDNN {t_dnn:.3f} s  NNPACK {t_nnp:.3f} s  |Δ| vs float64 {err_dnn:.1e} / {err_nnp:.1e}"
        )


def _phase_taps(weight: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-wide conv's taps along ``dim`` after a 2× nearest upsample, per output phase: even outputs read the
    inputs (i-1, i) with (w0, w1+w2), odd outputs (i, i+1) with (w0+w1, w2)."""
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack((w0, w1 + w2), dim), torch.stack((w0 + w1, w2), dim)


def subpixel_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """conv2d(2× nearest upsample of x, w, b, padding=1) as one stride-1 2×2 conv on x padded by 1, the four
    output phases' kernels stacked as 4·out channels (16 taps per input pixel, as the folded transposed conv),
    then the phases interleaved into the 2×-size map."""
    n, _, h, width = x.shape
    out_ch = w.shape[0]
    kernels = [k for rows in _phase_taps(w, 2) for k in _phase_taps(rows, 3)]  # (0,0) (0,1) (1,0) (1,1)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), torch.cat(kernels), b.repeat(4))  # [n, 4·out, h+1, w+1]
    out = y.new_empty(n, out_ch, h, 2, width, 2)
    for k, (row, col) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, :, row, :, col] = y[:, k * out_ch : (k + 1) * out_ch, row : row + h, col : col + width]
    return out.view(n, out_ch, 2 * h, 2 * width)


def subpixel() -> None:
    x64, w64 = torch.randn(2, 5, 6, 7, dtype=torch.double), torch.randn(3, 5, 3, 3, dtype=torch.double)
    b64 = torch.randn(3, dtype=torch.double)
    ref = F.conv2d(F.interpolate(x64, scale_factor=2.0, mode="nearest"), w64, b64, padding=1)
    print(f"float64 check: max |Δ| {(subpixel_conv(x64, w64, b64) - ref).abs().max().item():.1e}")
    for name, c_in, c_out, size, kind in DECODER:
        if kind != "tconv":
            continue
        x, _, b = decoder_operands(c_in, c_out, size, kind)
        w = (torch.randn(c_out, c_in, 3, 3) * 0.01).requires_grad_()
        row = []
        for fn in (lambda: upsample2x_conv3x3(x, w, b), lambda: subpixel_conv(x, w, b)):  # noqa: B023
            with torch.no_grad():
                row.append(median_time(fn))

            def fwd_bwd(fn=fn):
                y = fn()
                torch.autograd.grad(y, (x, w, b), torch.ones_like(y))  # noqa: B023

            row.append(median_time(fwd_bwd))
        print(
            f"{name:38s} transposed conv fwd {row[0]:.3f} s fwd+bwd {row[1]:.3f} s | "
            f"2×2 conv + interleave fwd {row[2]:.3f} s fwd+bwd {row[3]:.3f} s",
            flush=True,
        )


EXPERIMENTS = {
    "layouts": layouts,
    "mixed": mixed,
    "phase_fold": phase_fold,
    "d_gemm": d_gemm,
    "rates": rates,
    "winograd": winograd,
    "nnpack": nnpack,
    "subpixel": subpixel,
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    EXPERIMENTS[parser.parse_args().experiment]()
