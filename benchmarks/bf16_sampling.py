"""What ``precision=bf16`` sampling trades on a CPU: the demo generator's images in bf16 against fp32.

Same prompts (the demo world's val captions), same noise; reports the pixel error of bf16 against fp32 (on
the 0..255 scale of the saved PNGs: mean and max absolute difference, PSNR) and the wall time of each at
``--batch``. The speed at the paper's geometry is ``speed.py --cases g8 --precision bf16`` (random weights).

    python benchmarks/bf16_sampling.py --images 64 --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from galip.sampling import Sampler
from galip.world.demo_generator import load_demo_generator
from galip.world.probe import val_captions


def timed(sampler: Sampler, sent: torch.Tensor, noise: torch.Tensor, batch: int, repeats: int):
    sampler.from_vectors(sent[:batch], noise[:batch], batch)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sampler.from_vectors(sent[:batch], noise[:batch], batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times), sampler.from_vectors(sent, noise, batch)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    generator = load_demo_generator()
    fp32 = Sampler(generator, "cpu")
    bf16 = Sampler(generator, "cpu", precision="bf16")
    sent = fp32.sentence_vectors(val_captions(args.images, seed=args.seed))
    noise = fp32.noise(args.images, args.seed)
    t32, x32 = timed(fp32, sent, noise, args.batch, args.repeats)
    t16, x16 = timed(bf16, sent, noise, args.batch, args.repeats)
    err = (x16 - x32).abs() * 127.5  # [-1, 1] -> 0..255
    mse = ((x16 - x32) * 127.5).pow(2).mean().item()
    psnr = 10 * torch.log10(torch.tensor(255.0**2 / mse)).item() if mse > 0 else float("inf")
    print(
        f"threads {torch.get_num_threads()}, {args.images} images, batch {args.batch}, median of {args.repeats}"
    )
    print("| precision | s per batch | images/s | mean abs error (0..255) | max abs error | PSNR (dB) |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| fp32 | {t32:.4f} | {args.batch / t32:.1f} | – | – | – |")
    print(
        f"| bf16 | {t16:.4f} | {args.batch / t16:.1f} | {err.mean().item():.2f} | {err.max().item():.1f} "
        f"| {psnr:.1f} |"
    )
    print(f"bf16 speed-up: {t32 / t16:.2f}x")


if __name__ == "__main__":
    main()
