"""Where a D+G training step spends its time.

Two views of one step after ``--warmup`` steps (1: the first, which also counts the FLOPs; more to see the
steady state, e.g. ``--warmup 16``, once the heap has stopped growing):

* ``--phases`` (the default view): the module's own pieces in `GALIPModule.training_step`'s order, each timed
  by the wall clock and its FLOPs counted (convolutions forward and backward, matmuls, attention: what
  ``torch.utils.flop_counter`` knows), so each phase's GFLOP/s can be set against the CPU's measured sgemm
  rate. The backward of the G step is split by hooks on the fake's CLIP taps and on the fake image: D (input
  gradients only), then the frozen CLIP for fakes, then G;
* ``--ops``: a ``torch.profiler`` table of aten ops (self CPU time).

    python benchmarks/profile_step.py                                   # galip's default levers, B=8, ViT-B/32
    python benchmarks/profile_step.py --ops --levers none               # the reproduction of the official step
    python benchmarks/profile_step.py --levers default,cached_text --batch 8 --geometry tiny
    python benchmarks/profile_step.py --official-code /tmp/GALIP       # the official code's step: FLOPs, time
    python benchmarks/profile_step.py --warmup 16                      # steps 17-19: the steady state

``--phases`` needs ``module_step`` among the levers (it runs the module's pieces). In one process huge pages
follow the environment (`import galip` sets THP_MEM_ALLOC_ENABLE=1 unless it is set), not ``--levers``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed

PHASES = (
    ("text", "sentence vectors (frozen text tower, no graph)"),
    ("g_forward", "G forward (with graph)"),
    ("clip_fake_forward", "frozen CLIP on fakes: taps + embedding (with graph)"),
    ("clip_real_forward", "frozen CLIP on reals: taps up to the last tap block (no graph)"),
    ("d_forward_magp", "D step: D on real/mismatch/fake + MAGP's gradient (create_graph)"),
    ("d_backward", "D step: backward (incl. MAGP's double backward)"),
    ("adam_d", "D step: Adam"),
    ("g_loss_forward", "G step: D on fakes + CLIP similarity"),
    ("d_backward_for_g", "G step backward: through D to the fake taps"),
    ("clip_fake_backward", "G step backward: through the frozen CLIP to the fake pixels"),
    ("g_backward", "G step backward: G (weights and inputs)"),
    ("adam_g", "G step: Adam"),
)


ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)  # not in torch's flop registry


class FlopCount(TorchDispatchMode):
    """FLOPs of every op torch's flop counter knows, booked to the current phase."""

    def __init__(self):
        super().__init__()
        self.phase, self.flops = "", Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops[self.phase] += count(*args, **kwargs, out_val=out)
        elif func._overloadpacket is ONEDNN_LINEAR:  # galip.clip.blocks.frozen_linear
            self.flops[self.phase] += 2 * args[0].numel() * args[1].shape[0]  # x [M, K] · weight [N, K]ᵀ
        return out


class Clock:
    """Wall time per phase; ``mark`` closes the running phase and opens the next one."""

    def __init__(self, counter: FlopCount | None = None):
        self.counter, self.seconds = counter, defaultdict(float)
        self.phase, self.start = None, time.perf_counter()

    def mark(self, phase: str | None) -> None:
        now = time.perf_counter()
        if self.phase is not None:
            self.seconds[self.phase] += now - self.start
        self.phase, self.start = phase, now
        if self.counter is not None:
            self.counter.phase = phase or ""


def phased_step(module, batch: dict, opt_g, opt_d, clock: Clock) -> None:
    """`GALIPModule.training_step`'s pieces in its order (no augmentation, EMA or logging), with marks."""
    from galip import losses

    clock.mark("text")
    real, sent = batch["image"], module.sentence_vectors(batch)
    clock.mark("g_forward")
    fake = module.generator(module.noise(real.shape[0]), sent)
    clock.mark("clip_fake_forward")
    fake_taps, fake_emb = module.d_input.fake(fake)
    clock.mark("clip_real_forward")
    real_taps = module.real_taps(real)

    clock.mark("d_forward_magp")
    module.toggle_optimizer(opt_d)
    d_terms = module.discriminator_terms(real_taps, fake_taps.detach(), sent)
    opt_d.zero_grad(set_to_none=True)
    clock.mark("d_backward")
    d_terms["loss"].backward()
    clock.mark("adam_d")
    opt_d.step()
    module.untoggle_optimizer(opt_d)

    clock.mark("g_loss_forward")
    module.toggle_optimizer(opt_g)
    g_terms = losses.generator_loss(
        module.discriminator(fake_taps, sent), losses.clip_similarity(fake_emb, sent), module.sim_weight
    )
    opt_g.zero_grad(set_to_none=True)
    fake_taps.register_hook(lambda grad: clock.mark("clip_fake_backward"))
    fake.register_hook(lambda grad: clock.mark("g_backward"))
    clock.mark("d_backward_for_g")
    g_terms["loss"].backward()
    clock.mark("adam_g")
    opt_g.step()
    module.untoggle_optimizer(opt_g)
    clock.mark(None)


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This CPU's fp32 matmul rate at the current thread count: the practical peak the phases are set against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * n**3 / (time.perf_counter() - start) / 1e9


def phases(module, batch: dict, steps: int, warmup: int = 1) -> str:
    opt_g, opt_d = module.configure_optimizers()
    module.train()
    module.trainer = speed.PlainLoop([opt_g, opt_d])
    counter = FlopCount()
    with counter:  # the first warm-up step counts the FLOPs (the dispatch mode costs time; nothing is timed)
        phased_step(module, batch, opt_g, opt_d, Clock(counter))
    for _ in range(warmup - 1):
        phased_step(module, batch, opt_g, opt_d, Clock())
    runs = []
    for _ in range(steps):
        clock = Clock()
        phased_step(module, batch, opt_g, opt_d, clock)
        runs.append(clock.seconds)
    peak = sgemm_gflops()
    seconds = {name: sorted(run[name] for run in runs)[len(runs) // 2] for name, _ in PHASES}
    total_s, total_f = sum(seconds.values()), sum(counter.flops.values())
    rows = [
        f"threads {torch.get_num_threads()}; sgemm 2048³ on them: {peak:.0f} GFLOP/s; median of {steps} step(s) "
        f"after {warmup}",
        "",
        "| phase | what | s | share | GFLOP | GFLOP/s | of sgemm |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, what in (*PHASES, ("total", "one D+G step")):
        s = total_s if name == "total" else seconds[name]
        f = (total_f if name == "total" else counter.flops[name]) / 1e9
        rate = f / s if s > 0 else 0.0
        rows.append(
            f"| {name} | {what} | {s:.3f} | {s / total_s:.0%} | {f:.1f} | {rate:.0f} | {rate / peak:.0%} |"
        )
    return "\n".join(rows)


def official(checkout: str, batch_size: int, steps: int, warmup: int = 1) -> str:
    """FLOPs and wall time of the official code's own step (`official_code.OfficialRun`), no phases."""
    import official_code

    run = official_code.OfficialRun(checkout)
    step = run.step_fn(run.batch([speed.CAPTIONS[i % len(speed.CAPTIONS)] for i in range(batch_size)]))
    counter = FlopCount()
    with counter:
        step()
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds, flops = sorted(times)[len(times) // 2], sum(counter.flops.values()) / 1e9
    peak = sgemm_gflops()
    return (
        f"official code ({official_code.revision(checkout)}), batch {batch_size}, threads {torch.get_num_threads()}: "
        f"one D+G step {seconds:.3f} s (median of {steps} after {warmup}), {flops:.1f} GFLOP, {flops / seconds:.0f} GFLOP/s "
        f"= {flops / seconds / peak:.0%} of sgemm 2048³ ({peak:.0f} GFLOP/s)"
    )


def ops(step, rows: int) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
    return f"one step {elapsed:.2f} s\n" + prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=rows
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levers", default="default", help="as speed.py; 'default,x' adds x to the defaults")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--geometry", choices=("vit_b32", "tiny", "demo"), default="vit_b32")
    p.add_argument("--ops", action="store_true", help="a torch.profiler table of aten ops instead of phases")
    p.add_argument(
        "--steps",
        type=int,
        default=3,
        help="timed steps, their median (per phase with --phases; --ops profiles one)",
    )
    p.add_argument(
        "--warmup", type=int, default=1, help="steps before the timed ones (the first counts FLOPs)"
    )
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--official-code", default=None, metavar="PATH", help="a tobran/GALIP checkout: its own step"
    )
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps: at least 1 each (the first warm-up step counts the FLOPs)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.official_code:
        print(official(args.official_code, args.batch, args.steps, args.warmup))
        return
    parts = args.levers.split(",")
    levers = speed.parse_levers(parts[0]) + speed.parse_levers(",".join(parts[1:]) or "none")
    if not args.ops and "module_step" not in levers:
        p.error("--phases runs the module's pieces: add module_step to --levers, or use --ops")
    device = torch.device("cpu")
    torch.manual_seed(0)
    module = speed.build_module(args.geometry, device, levers)
    batch = speed.make_batch(module, args.batch, device)
    if "cached_text" in levers:
        batch["sent_emb"] = module.clip.encode_text(batch["tokens"])
    print(f"levers {list(levers)}, batch {args.batch}, geometry {args.geometry}")
    if args.ops:
        step = speed.case_fn("step", module, batch, levers)
        for _ in range(args.warmup):
            step()
        print(ops(step, args.rows))
    else:
        print(phases(module, batch, args.steps, args.warmup))


if __name__ == "__main__":
    main()
