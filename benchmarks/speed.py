"""Speed and peak memory of GALIP at the paper's geometry, with random weights (nothing downloaded).

Cases (``--cases``, comma separated; the number is the batch size):

* ``gN``    — generator forward, G in eval mode under ``torch.inference_mode`` (paper's sampling path);
* ``stepN`` — one full training iteration, D step then G step: ``GALIPModule.training_step`` itself (with
  the ``module_step`` lever), run with no Trainer around it (`PlainLoop` stands in for the little of one it
  reads): sentence vectors from the frozen text tower, fake = G(z, s), CLIP taps + embedding of the fake
  with graph, L_D = hinge real + ½ fake + ½ mismatch + MAGP, backward, Adam; L_G = adversarial − λ·sim,
  backward, Adam;
* ``cachedN`` — the same iteration with cached sentence vectors in the batch (``sent_emb``, as
  ``python -m galip.data.encode_text`` provides them): ``stepN − cachedN`` is the text tower's share.

Levers (``--levers``, comma separated, ``none`` = the **official computation**, ``default`` = what galip
does out of the box; see ``LEVERS``). Without ``module_step`` a step is the official code's iteration:
real images with ``requires_grad`` so the D backward (and MAGP's double backward) runs through the frozen
CLIP to the real pixels, the real images' CLIP pass through all blocks, the sentence vector requiring grad,
and the G backward also filling D's gradients. ``--ladder`` measures every case with no lever, then adds
the levers one at a time, so each row's ratio to the first is measured in the same run.

``--official-code PATH`` (a checkout of tobran/GALIP) adds a row per case that runs **the official code itself**
(`official_code.py`: its modules and its ``train`` function, patched at run time to run on a CPU); the
``× official`` column then divides by that row. ``--levers none/default`` runs several lever sets, and
``--rounds 2`` runs the whole list twice, alternating, so a drifting machine hits every row alike:

    python benchmarks/speed.py --official-code /tmp/GALIP --levers none/default --cases g1,g8,step8 --rounds 2

``--official-memory both`` adds the official code run under galip's memory settings (``import galip``'s huge
pages and kept freed memory), and a ratio column against it: what galip gains in arithmetic alone.

Each case runs in a fresh subprocess (unless ``--in-process``) so its peak memory is its own: peak RSS
on CPU (``ru_maxrss`` is monotone over a process's life), ``torch.cuda.max_memory_allocated`` on CUDA.

    python benchmarks/speed.py                                   # ViT-B/32, CPU, g1,g8,step8
    python benchmarks/speed.py --geometry tiny --repeats 1       # seconds, for a smoke check
    python benchmarks/speed.py --device cuda --precision bf16 --out experiments/log/benchmarks.md
    python benchmarks/speed.py --ladder --cases g8,step8 --out experiments/log/benchmarks.md   # lever table
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

_JSON_TAG = "BENCH_JSON "
DEFAULT_CASES = ("g1", "g8", "step8")
CAPTIONS = (
    "a small bird with a red head and a short pointed beak",
    "this bird has white wings with black stripes and a yellow belly",
    "a man riding a wave on top of a surfboard",
    "a plate of food with broccoli and rice",
    "a red double decker bus driving down a city street",
    "two giraffes standing next to each other in a field",
    "a kitchen with wooden cabinets and a white refrigerator",
    "a cat sleeping on the keyboard of a laptop",
)

# What each lever changes; none of them changes the maths (tests/test_speed_levers.py).
LEVERS = {
    "module_step": "D+G step as GALIPModule runs it: real images' CLIP taps without graph (stopping at the "
    "last tap block), D frozen in the G backward, sentence vectors without grad",
    "hugepages": "THP_MEM_ALLOC_ENABLE=1: transparent huge pages for large CPU tensors (set by `import galip`)",
    "keep_freed_memory": "glibc malloc keeps freed memory (no mmap, no trim: galip.keep_freed_memory, called by "
    "`import galip`), so a step reuses the pages of the step before instead of faulting fresh ones in",
    "batched_affines": "all Affine MLPs of G in one matmul + one batched matmul per width",
    "fused_fusion": "each DFBlock's four elementwise ops as one autograd op",
    "folded_upsample": "each GBlock's fuse1 and shortcut before its nearest upsample, and c1 of a 2x upsample as "
    "one stride-2 transposed conv on the small map",
    "gemm_attention": "the frozen CLIP blocks that need gradients run their attention projections as one "
    "2-D matmul each (galip.clip.blocks), not nn.MultiheadAttention's broadcast bmm",
    "onednn_linear": "the frozen CLIP blocks' projections (with and without gradients) as oneDNN GEMMs, not "
    "F.linear's MKL sgemm (galip.clip.blocks.frozen_linear)",
    "text_prefix": "the text tower run over the batch's tokens up to the last end-of-text token, not the "
    "77-token context (its causal attention makes the rest padding; galip.clip.text)",
    "patch_gemm": "the frozen CLIP's patch embedding (a conv whose stride is its kernel) as one GEMM on the "
    "image cut into patches (galip.clip.taps): oneDNN's conv backward to the pixels is slow at stride 32",
    "small_convs_channels_last": "D's convs (7x7 maps) and G's conv to RGB in channels_last (oneDNN's NCHW "
    "kernels are slow there)",
    "image_block_channels_last": "G's last block (the one at the image size, its largest maps) in channels_last: "
    "oneDNN's NCHW path reorders each 100-200 MB map to its blocked layout and back around every conv",
    "channels_last": "G's weights and activations in channels_last memory format",
    "fused_adam": "Adam as one fused kernel per network (torch.optim.Adam(fused=True)), not a loop over "
    "its parameters",
    "cached_text": "sentence vectors precomputed (python -m galip.data.encode_text), not re-encoded per step",
    "compile": "torch.compile of G (compile time excluded: it happens in the warm-up; D is left eager, "
    "since MAGP's double backward does not go through compiled graphs)",
}
# galip's training defaults (cached_text needs the encode_text cache; compile is opt-in: minutes to compile
# on a CPU). channels_last is galip's default for sampling (galip.sampling), not for training on a CPU.
DEFAULT_LEVERS = (
    "module_step",
    "hugepages",
    "keep_freed_memory",
    "batched_affines",
    "fused_fusion",
    "folded_upsample",
    "small_convs_channels_last",
    "image_block_channels_last",
    "gemm_attention",
    "onednn_linear",
    "text_prefix",
    "patch_gemm",
    "fused_adam",
)
LADDER = (*DEFAULT_LEVERS, "cached_text", "channels_last")
# The levers that are process settings, not code: `--official-memory kept` runs the official code with them.
MEMORY_LEVERS = ("hugepages", "keep_freed_memory")
OFFICIAL_MEMORY = {"glibc": ((),), "kept": (MEMORY_LEVERS,), "both": ((), MEMORY_LEVERS)}
STEP_ONLY = frozenset({"module_step", "cached_text", "text_prefix", "patch_gemm", "fused_adam"})


def parse_lever_sets(text: str) -> list[tuple[str, ...]]:
    """``--levers``: one lever set, or several separated by ``/`` (``none/default``)."""
    return [parse_levers(part) for part in text.split("/")]


def parse_levers(text: str) -> tuple[str, ...]:
    """``none``, or comma-separated levers where ``default`` stands for `DEFAULT_LEVERS` (``default,compile``)."""
    if text == "none":
        return ()
    levers: list[str] = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        for lever in DEFAULT_LEVERS if token == "default" else (token,):
            if lever not in levers:
                levers.append(lever)
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        raise ValueError(f"--levers: unknown {unknown}; expected none, default or some of {list(LEVERS)}")
    return tuple(levers)


def ladder(kind: str) -> list[tuple[str, ...]]:
    """No lever, then the levers of ``LADDER`` added one at a time (step-only ones skipped for gN)."""
    steps = [lever for lever in LADDER if kind != "g" or lever not in STEP_ONLY]
    return [tuple(steps[:i]) for i in range(len(steps) + 1)]


# ---------------------------------------------------------------------------------------------
# Building the models
# ---------------------------------------------------------------------------------------------


def geometry_spec(geometry: str) -> dict:
    """CLIP constructor arguments, tap blocks and G / D sizes for a geometry."""
    if geometry == "vit_b32":
        # The paper's model (conf/model/galip.yaml): taps 1,4,8, prompts for blocks 1..8 (0-based), default sizes.
        return {
            "clip": {"name": "ViT-B-32-quickgelu"},
            "taps": (1, 4, 8),
            "generator": {"prompt_blocks": tuple(range(1, 9))},
            "discriminator": {},
        }
    if geometry == "tiny":
        from omegaconf import OmegaConf

        import galip

        cfg = OmegaConf.load(Path(galip.__file__).parent / "conf" / "clip" / "tiny.yaml")
        model_cfg = OmegaConf.to_container(cfg.model_cfg, resolve=True)
        # Model sizes as in conf/experiment/smoke.yaml: a plumbing check that takes seconds.
        return {
            "clip": {"name": None, "model_cfg": model_cfg},
            "taps": (1, 2, 3),
            "generator": {
                "ngf": 16,
                "code_ch": 16,
                "mid_ch": 8,
                "n_fusion_blocks": 2,
                "prompt_blocks": (1, 2),
            },
            "discriminator": {"out_ch": 64, "hidden": 32},
        }
    raise ValueError(f"--geometry {geometry!r}: expected vit_b32 or tiny")


def build_demo_module():
    """The CPU demo's module as `make demo` builds it (``+experiment=demo``: its CLIP, G, D and optimizers; the
    shipped CLIP's weights, though speed does not depend on them). Its levers are the config's (galip's defaults)."""
    from hydra.utils import instantiate

    from galip.config import compose
    from galip.loading import build_module as module_of_config

    cfg = compose("train", ["+experiment=demo", "paths.output_dir=outputs/speed_demo"])
    module = module_of_config(cfg, instantiate(cfg.clip))
    module.__class__ = bench_module_class()  # the same module, keeping its two losses instead of logging them
    module.image_size = int(cfg.data.image_size)  # the world's images: 32 px
    return module


def build_module(geometry: str, device: torch.device, levers: Sequence[str] = DEFAULT_LEVERS):
    """A GALIPModule (default losses and optimizers) around a random-weight frozen CLIP, on ``device``.

    ``geometry="demo"``: the demo config's module (`build_demo_module`); ``levers`` must then be the defaults."""
    if geometry == "demo":
        if tuple(levers) != DEFAULT_LEVERS:
            raise ValueError("--geometry demo runs the demo config as it is: --levers default only")
        return build_demo_module().to(device)
    from galip.clip import load_clip
    from galip.clip.blocks import set_gemm_attention, set_onednn_linear
    from galip.clip.taps import set_patch_gemm
    from galip.clip.text import set_text_prefix
    from galip.models import Discriminator, Generator
    from galip.module import ttur_adam

    set_gemm_attention("gemm_attention" in levers)  # process-wide: the row about to run
    set_onednn_linear("onednn_linear" in levers)
    set_text_prefix("text_prefix" in levers)
    set_patch_gemm("patch_gemm" in levers)

    spec = geometry_spec(geometry)
    clip = load_clip(**spec["clip"])  # no pretrained tag, no path: random weights, offline
    geo = clip.geometry
    generator = Generator(
        clip,
        **spec["generator"],
        execution={
            "batched_affines": "batched_affines" in levers,
            "fused_fusion": "fused_fusion" in levers,
            "folded_upsample": "folded_upsample" in levers,
            "image_block_channels_last": "image_block_channels_last" in levers,
            "rgb_channels_last": "small_convs_channels_last" in levers,
        },
    )
    discriminator = Discriminator(
        geo.width,
        geo.grid,
        geo.embed_dim,
        n_taps=len(spec["taps"]),
        **spec["discriminator"],
        channels_last="small_convs_channels_last" in levers,
    )
    fused = "fused_adam" in levers  # the official code: torch.optim.Adam's defaults (a loop on a CPU)
    module = bench_module_class()(
        clip,
        generator,
        discriminator,
        tap_blocks=spec["taps"],
        channels_last="channels_last" in levers,
        optimizer_g=ttur_adam(1e-4, fused),
        optimizer_d=ttur_adam(4e-4, fused),
    )
    return module.to(device)


def make_batch(module, batch_size: int, device: torch.device) -> dict:
    """A data-module-shaped batch: images in [-1, 1] at CLIP's size, captions and their tokens."""
    size = getattr(module, "image_size", module.clip.geometry.image_size)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    return {
        "image": torch.rand(batch_size, 3, size, size, device=device) * 2 - 1,
        "caption": captions,
        "tokens": module.clip.tokenize(captions).to(device),
    }


# ---------------------------------------------------------------------------------------------
# What is timed
# ---------------------------------------------------------------------------------------------


class PlainLoop:
    """The little of a Lightning ``Trainer`` that `GALIPModule.training_step` reads, so that the benchmark runs the
    module's own step with no Trainer around it: the two optimizers (raw: no hooks, so no gradient-norm logging),
    ``loss.backward()`` for ``manual_backward``, one rank."""

    barebones = True  # LightningModule.log returns at once: logging is not what is timed
    global_rank, world_size = 0, 1
    precision_plugin = None

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)  # read by toggle_optimizer / untoggle_optimizer
        self.strategy = self
        self._lightning_optimizers = self.optimizers  # what LightningModule.optimizers() returns

    def backward(self, loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> None:
        loss.backward(*args, **kwargs)


@functools.cache
def bench_module_class():
    """`GALIPModule` whose logging hook keeps the step's two losses (what the benchmark reports) instead."""
    from galip.module import GALIPModule

    class BenchModule(GALIPModule):
        def log_terms(self, d_terms: dict, g_terms: dict, batch_size: int) -> None:
            self.last_losses = {"d_loss": d_terms["loss"].item(), "g_loss": g_terms["loss"].item()}

    return BenchModule


def training_step(module, batch: dict, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer) -> dict:
    """``GALIPModule.training_step``, the module's own code, with `PlainLoop` as its Trainer."""
    module.trainer = PlainLoop([opt_g, opt_d])  # the order of configure_optimizers
    module.training_step(batch, 0)
    return module.last_losses


def official_step(module, batch: dict, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer) -> dict:
    """One iteration as the official code computes it (docs/official_code.md#training-step), on galip's modules.

    Same losses and updates as the module's step; the extra work is what the official code does for no
    gradient that is used: the real images require grad, so the D backward (and MAGP's double backward)
    runs through the frozen CLIP to the pixels, and their CLIP pass runs all blocks for an embedding nobody
    uses; the sentence vector requires grad; the G backward also fills D's gradients.
    """
    from galip import losses

    clip, taps = module.clip, module.tap_blocks
    with torch.no_grad():
        sent = clip.encode_text(batch["tokens"])
    real = batch["image"].detach().requires_grad_(True)
    sent = sent.requires_grad_(True)

    opt_d.zero_grad(set_to_none=True)
    real_taps, _ = clip.image_taps(real, taps, with_embedding=True)
    real_features = module.discriminator.features(real_taps)  # shared by the real and mismatched pairs
    d_real = module.discriminator.assess(real_features, sent)
    d_mis = module.discriminator.assess(real_features, losses.mismatch(sent))
    fake = module.generator(module.noise(real.shape[0]), sent)
    fake_taps, fake_emb = clip.image_taps(fake, taps, with_embedding=True)
    d_fake = module.discriminator(fake_taps.detach(), sent)
    penalty = losses.magp(d_real, (real_taps, sent), module.magp_k, module.magp_p)
    d_terms = losses.discriminator_loss(d_real, d_fake, d_mis, penalty)
    d_terms["loss"].backward()
    opt_d.step()

    opt_g.zero_grad(set_to_none=True)
    g_terms = losses.generator_loss(
        module.discriminator(fake_taps, sent), losses.clip_similarity(fake_emb, sent), module.sim_weight
    )
    g_terms["loss"].backward()
    opt_g.step()
    return {"d_loss": d_terms["loss"].item(), "g_loss": g_terms["loss"].item()}


def official_case_fn(
    kind: str, batch_size: int, checkout: str, geometry: str, device: torch.device, seed: int
) -> Callable[[], None]:
    """A repeat of the case run by the official code itself (`official_code.OfficialRun`)."""
    if kind == "cached" or geometry != "vit_b32" or device.type != "cpu":
        raise ValueError("--official-code runs gN and stepN at the vit_b32 geometry on the CPU")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import official_code

    run = official_code.OfficialRun(checkout, seed)
    batch = run.batch([CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)])
    return run.sample_fn(batch) if kind == "g" else run.step_fn(batch)


def official_code_label(checkout: str) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import official_code

    return f"official code (tobran/GALIP {official_code.revision(checkout)})"


def parse_case(case: str) -> tuple[str, int]:
    match = re.fullmatch(r"(g|step|cached)(\d+)", case)
    if not match or int(match.group(2)) < 1:
        raise ValueError(
            f"case {case!r}: expected gN (generator forward), stepN (D+G step) or cachedN (step with "
            "cached sentence vectors), N = batch size"
        )
    return match.group(1), int(match.group(2))


def case_fn(kind: str, module, batch: dict, levers: Sequence[str] = DEFAULT_LEVERS) -> Callable[[], None]:
    """A closure running one repeat of the case (inputs prepared outside the timed region)."""
    if "compile" in levers:
        module.generator = torch.compile(module.generator)
    if kind == "g":
        module.generator.eval()
        sent = module.clip.encode_text(batch["tokens"])
        z = module.noise(len(batch["caption"]))

        def forward() -> None:
            with torch.inference_mode():
                module.generator(z, sent)

        return forward
    module.train()
    if (
        kind == "cached" or "cached_text" in levers
    ):  # computed once, outside the timed region, as the cache does
        batch = {**batch, "sent_emb": module.clip.encode_text(batch["tokens"])}
    opt_g, opt_d = module.configure_optimizers()
    step = training_step if "module_step" in levers else official_step
    return lambda: step(module, batch, opt_g, opt_d)


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def run_case(
    case: str,
    device: str = "cpu",
    geometry: str = "vit_b32",
    repeats: int = 3,
    warmup: int = 1,
    precision: str = "fp32",
    threads: int | None = None,
    seed: int = 0,
    levers: Sequence[str] = DEFAULT_LEVERS,
    official_code: str | None = None,
) -> dict:
    """Run one case in this process and return its measurements.

    ``official_code``: a tobran/GALIP checkout; the case then runs the official code itself (`official_code.py`)
    and ``levers`` are ignored.

    ``levers`` (see ``LEVERS``) choose how the same maths is run; ``hugepages`` only takes effect in a fresh
    process (`run_case_subprocess` sets the environment variable torch reads at its first large allocation).

    ``peak_mem_mib`` is the process's peak RSS on CPU (monotone: in a process that ran something heavier
    before, it reports that) and ``torch.cuda.max_memory_allocated`` on CUDA. ``mem_delta_mib`` is the
    growth of that peak over the memory held once the models are built.
    """
    kind, batch_size = parse_case(case)
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: expected fp32 or bf16")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure(
            kind, batch_size, case, device, geometry, repeats, warmup, precision, seed, levers, official_code
        )
    finally:
        torch.set_num_threads(previous_threads)  # in-process callers (tests) keep their own setting


def _measure(
    kind: str,
    batch_size: int,
    case: str,
    device: str,
    geometry: str,
    repeats: int,
    warmup: int,
    precision: str,
    seed: int,
    levers: Sequence[str],
    official_code: str | None = None,
) -> dict:
    dev = torch.device(device)
    torch.manual_seed(seed)
    if official_code:
        levers = tuple(lever for lever in levers if lever in MEMORY_LEVERS)
        if "keep_freed_memory" in levers:
            import galip  # noqa: F401  (its import applies GALIP_KEEP_FREED_MEMORY, set by worker_env)
        fn = official_case_fn(kind, batch_size, official_code, geometry, dev, seed)
    else:
        module = build_module(geometry, dev, levers)
        fn = case_fn(kind, module, make_batch(module, batch_size, dev), levers)

    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    else:
        base = _rss_mib()
    times, cpu_times, user_times, sys_times, load_before = [], [], [], [], os.getloadavg()[0]
    for i in range(warmup + repeats):
        start, cpu_start = time.perf_counter(), os.times()
        with _autocast(dev, precision):
            fn()
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_end = os.times()
            user_times.append(cpu_end.user - cpu_start.user)
            sys_times.append(cpu_end.system - cpu_start.system)
            cpu_times.append(user_times[-1] + sys_times[-1])
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _peak_rss_mib()

    median = statistics.median(times) if times else float("nan")
    return {
        "case": case,
        "what": {
            "g": "G forward (eval, inference_mode)",
            "step": "D+G training step",
            "cached": "D+G step, cached sentence vectors",
        }[kind],
        "batch": batch_size,
        "levers": list(levers),
        "official_code": official_code_label(official_code) if official_code else None,
        "hugepages_env": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "keeps_freed_memory": getattr(sys.modules.get("galip"), "KEEPS_FREED_MEMORY", False),
        "geometry": geometry,
        "device": device,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": warmup,
        "times_s": times,
        "median_s": median,
        "min_s": min(times) if times else float("nan"),
        # CPU seconds of this process, all threads. Near wall × threads when the cores are ours; under other load,
        # OpenMP threads spin-waiting for a descheduled sibling inflate it as well as the wall time.
        "cpu_s": statistics.median(cpu_times) if cpu_times else float("nan"),
        # Of which user (the arithmetic) and system (the kernel: mostly faulting fresh pages in, on the CPU).
        "user_s": statistics.median(user_times) if user_times else float("nan"),
        "sys_s": statistics.median(sys_times) if sys_times else float("nan"),
        "loadavg_1min": [load_before, os.getloadavg()[0]],
        "images_per_s": batch_size / median if times else float("nan"),
        "peak_mem_mib": peak,
        "mem_delta_mib": peak - base,
        "mem_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "peak RSS",
    }


def worker_env(levers: Sequence[str]) -> dict[str, str]:
    """The environment of a row's process: its memory levers are settings read at the process's start."""
    return {
        **os.environ,
        "THP_MEM_ALLOC_ENABLE": "1" if "hugepages" in levers else "0",
        "GALIP_KEEP_FREED_MEMORY": "1" if "keep_freed_memory" in levers else "0",
    }


def run_case_subprocess(
    case: str, args: argparse.Namespace, levers: Sequence[str], official_code: str | None = None
) -> dict:
    """Re-invoke this script for one case so the case's peak memory is measured in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--cases", case]
    cmd += ["--levers", ",".join(levers) or "none"]
    if official_code:
        cmd += ["--official-code", official_code]
    cmd += ["--device", args.device, "--geometry", args.geometry, "--precision", args.precision]
    cmd += ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, env=worker_env(levers))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_JSON_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}")
    return json.loads(lines[-1][len(_JSON_TAG) :])


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


LEGEND = (
    "levers: see benchmarks/speed.py LEVERS (`+ x`: the row above plus lever x); × official: median of the "
    "same case's official-code rows in this run (without them: its no-lever rows, galip's reproduction of the "
    "official computation) / this median; "
    "× official, memory kept: the same against the official code run under galip's memory settings "
    "(`--official-memory`); "
    "median/min s: wall seconds per repeat; images/s = batch / median; CPU s: median process CPU seconds per "
    "repeat, all threads, user + system (user ≈ wall × threads when the cores are free and the arithmetic is all; "
    "system: the kernel, on a CPU mostly faulting fresh pages in); peak memory: see above; growth: peak minus the "
    "memory held once the models were built (CLIP + G + D, and the batch); load avg: 1-min load average before → "
    "after the case."
)


def lever_label(result: dict, previous: dict | None) -> str:
    """``none``, ``default``, the levers, or ``+ lever`` when the row adds one lever to the row above."""
    if result.get("official_code"):
        levers = result.get("levers")
        return result["official_code"] + (
            f" + galip's memory settings ({', '.join(levers)})" if levers else ""
        )
    levers = result.get("levers", list(DEFAULT_LEVERS))
    if not levers:
        return "none (galip's reproduction of the official computation)"
    if previous is not None and previous["case"] == result["case"]:
        added = [lever for lever in levers if lever not in previous.get("levers", [])]
        if len(added) == 1 and len(levers) == len(previous.get("levers", [])) + 1:
            return f"+ {added[0]}"
    return "default" if tuple(levers) == DEFAULT_LEVERS else ", ".join(levers)


def markdown_table(results: Sequence[dict]) -> str:
    """One row per result; ``× official`` compares with the median of the same case's official-code rows of
    this run (as the official code runs: glibc's and PyTorch's memory defaults), or (without them) of its
    no-lever rows; ``× official, memory kept`` (only when there are such rows) with the official code run under
    galip's memory settings (`--official-memory kept`)."""

    def baselines(pick: Callable[[dict], bool]) -> dict[str, float]:
        found = {}
        for case in {r["case"] for r in results}:
            rows = [r for r in results if r["case"] == case and pick(r)]
            if rows:
                found[case] = statistics.median(r["median_s"] for r in rows)
        return found

    official = baselines(lambda r: bool(r.get("official_code")) and not r.get("levers"))
    reproduction = baselines(lambda r: not r.get("official_code") and r.get("levers") == [])
    kept = baselines(lambda r: bool(r.get("official_code")) and bool(r.get("levers")))
    columns = [{**reproduction, **official}] + ([kept] if kept else [])

    header = "| case | levers | batch | median s | min s | × official |" + (
        " × official, memory kept |" if kept else ""
    )
    rows = [
        header + " images/s | CPU s (user + sys) | peak memory (MiB) | growth (MiB) | load avg |",
        "|---|---|---:|---:|---:|" + "---:|" * (len(columns) + 5),
    ]
    previous = None
    for r in results:
        ratios = "".join(
            f" {base[r['case']] / r['median_s']:.2f} |" if r["case"] in base else " – |" for base in columns
        )
        cpu = f"{r['user_s']:.1f} + {r['sys_s']:.1f}" if "user_s" in r else f"{r['cpu_s']:.1f}"
        rows.append(
            f"| {r['case']} | {lever_label(r, previous)} | {r['batch']} | {r['median_s']:.3f} | {r['min_s']:.3f} "
            f"|{ratios} {r['images_per_s']:.2f} | {cpu} | {r['peak_mem_mib']:.0f} "
            f"| {r['mem_delta_mib']:.0f} | {r['loadavg_1min'][0]:.1f}→{r['loadavg_1min'][1]:.1f} |"
        )
        previous = r
    return "\n".join(rows)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(args: argparse.Namespace, results: Sequence[dict]) -> list[str]:
    threads = results[0]["threads"] if results else torch.get_num_threads()
    env = [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.machine()}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores visible), torch threads: {threads}",
    ]
    if args.device == "cuda":
        env.append(f"- GPU: {torch.cuda.get_device_name()}")
    mem = results[0]["mem_kind"] if results else ""
    env.append(
        f"- geometry {args.geometry}, random weights, device {args.device}, precision {args.precision}, "
        f"median of {args.repeats} repeats after {args.warmup} warm-up; memory: {mem}"
        f"{', each case in a fresh process' if not args.in_process else ''}"
    )
    return env


def write_report(path: Path, args: argparse.Namespace, argv: Sequence[str], results: Sequence[dict]) -> None:
    """Append a dated section (command, environment, table) to ``path``, creating it if needed."""
    command = "python benchmarks/speed.py " + " ".join(shlex.quote(a) for a in argv)
    section = [f"### {args.geometry} on {args.device} ({args.precision})", "", "```", command, "```", ""]
    section += [*environment(args, results), "", markdown_table(results), "", LEGEND, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write("# GALIP benchmarks\n\n")
        f.write("\n".join(section) + "\n")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast (CUDA)")
    p.add_argument(
        "--geometry",
        choices=("vit_b32", "tiny", "demo"),
        default="vit_b32",
        help="demo: the CPU demo's config (+experiment=demo), e.g. --cases step32",
    )
    p.add_argument(
        "--cases", default=",".join(DEFAULT_CASES), help="gN = G forward, stepN = D+G step, N = batch"
    )
    p.add_argument(
        "--levers",
        default="default",
        help=f"none | default | comma list of {', '.join(LEVERS)}; several sets separated by / (none/default)",
    )
    p.add_argument(
        "--official-code",
        default=None,
        metavar="PATH",
        help="a tobran/GALIP checkout: each case also runs the official code itself (official_code.py)",
    )
    p.add_argument(
        "--official-memory",
        choices=tuple(OFFICIAL_MEMORY),
        default="glibc",
        help="the official code's rows as it runs (glibc: glibc's and PyTorch's memory defaults), under galip's "
        "memory settings (kept: huge pages, freed memory kept, as `import galip` sets them), or both",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="run the whole list of rows this many times, in turn"
    )
    p.add_argument(
        "--ladder", action="store_true", help="each case with no lever, then adding the levers one at a time"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="append the table (+ command, environment) here")
    p.add_argument(
        "--in-process", action="store_true", help="no subprocess per case (peak RSS is then shared)"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.lever_sets = parse_lever_sets(args.levers)
    except ValueError as e:
        p.error(str(e))
    args.lever_set = args.lever_sets[0]
    if args.official_code:
        args.official_code = str(Path(args.official_code).expanduser().resolve())
    if args.official_memory != "glibc" and not args.official_code:
        p.error(
            "--official-memory: it chooses how the official code's rows run; give --official-code PATH too"
        )
    if args.official_memory != "glibc" and args.in_process:
        p.error(
            "--official-memory kept needs a fresh process per row (memory settings are fixed at its start)"
        )
    if args.ladder and args.in_process:
        p.error("--ladder needs a fresh process per row (huge pages are fixed at a process's start)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if args.precision == "bf16" and args.device == "cpu" and not native_bf16:
        print(
            "note: this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 autocast is emulated",
            file=sys.stderr,
        )
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for case in cases:
        parse_case(case)  # fail before any model is built
    kwargs = {
        "device": args.device,
        "geometry": args.geometry,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "precision": args.precision,
        "threads": args.threads,
        "seed": args.seed,
    }
    if args.worker:
        for case in cases:
            result = run_case(case, levers=args.lever_set, official_code=args.official_code, **kwargs)
            print(_JSON_TAG + json.dumps(result), flush=True)
        return []

    runs = []
    for case in cases:
        if args.official_code and parse_case(case)[0] != "cached":
            runs += [(case, memory, args.official_code) for memory in OFFICIAL_MEMORY[args.official_memory]]
        lever_sets = ladder(parse_case(case)[0]) if args.ladder else args.lever_sets
        runs += [(case, levers, None) for levers in lever_sets]
    results = []
    for case, levers, official in runs * args.rounds:
        if args.in_process:
            result = run_case(case, levers=levers, official_code=official, **kwargs)
        else:
            result = run_case_subprocess(case, args, levers, official)
        what = ",".join(levers) or "none"
        if official:
            what = "official code" + (f" + {what}" if levers else "")
        print(
            f"{case} [{what}]: median {result['median_s']:.3f} s, times {[round(t, 3) for t in result['times_s']]}",
            file=sys.stderr,
        )
        results.append(result)
    print(markdown_table(results))
    if args.out is not None:
        write_report(args.out, args, argv, results)
    return results


if __name__ == "__main__":
    main()
