"""Speed and peak memory of GALIP at the paper's geometry, with random weights (nothing downloaded).

Cases (``--cases``, comma separated; the number is the batch size):

* ``gN``    — generator forward, G in eval mode under ``torch.inference_mode`` (paper's sampling path);
* ``stepN`` — one full training iteration, D step then G step, with the same maths as
  ``GALIPModule.training_step`` but in a plain PyTorch loop (no Trainer): sentence vectors from the
  frozen text tower, fake = G(z, s), CLIP taps + embedding of the fake with graph, L_D = hinge real
  + ½ fake + ½ mismatch + MAGP, backward, Adam; L_G = adversarial − λ·sim, backward, Adam;
* ``cachedN`` — the same iteration with cached sentence vectors in the batch (``sent_emb``, as
  ``python -m galip.data.encode_text`` provides them): ``stepN − cachedN`` is the text tower's share.

Each case runs in a fresh subprocess (unless ``--in-process``) so its peak memory is its own: peak RSS
on CPU (``ru_maxrss`` is monotone over a process's life), ``torch.cuda.max_memory_allocated`` on CUDA.

    python benchmarks/speed.py                                   # ViT-B/32, CPU, g1,g8,step8
    python benchmarks/speed.py --geometry tiny --repeats 1       # seconds, for a smoke check
    python benchmarks/speed.py --device cuda --precision bf16 --out experiments/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

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


def build_module(geometry: str, device: torch.device):
    """A GALIPModule (default losses and optimizers) around a random-weight frozen CLIP, on ``device``."""
    from galip.clip import load_clip
    from galip.models import Discriminator, Generator
    from galip.module import GALIPModule

    spec = geometry_spec(geometry)
    clip = load_clip(**spec["clip"])  # no pretrained tag, no path: random weights, offline
    geo = clip.geometry
    generator = Generator(clip, **spec["generator"])
    discriminator = Discriminator(
        geo.width, geo.grid, geo.embed_dim, n_taps=len(spec["taps"]), **spec["discriminator"]
    )
    module = GALIPModule(clip, generator, discriminator, tap_blocks=spec["taps"])
    return module.to(device)


def make_batch(module, batch_size: int, device: torch.device) -> dict:
    """A data-module-shaped batch: images in [-1, 1] at CLIP's size, captions and their tokens."""
    size = module.clip.geometry.image_size
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    return {
        "image": torch.rand(batch_size, 3, size, size, device=device) * 2 - 1,
        "caption": captions,
        "tokens": module.clip.tokenize(captions).to(device),
    }


# ---------------------------------------------------------------------------------------------
# What is timed
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def only_trainable(optimizer: torch.optim.Optimizer, others: Iterable[torch.optim.Optimizer]):
    """Plain-PyTorch ``toggle_optimizer``/``untoggle_optimizer``: the other optimizers' params stop needing grad."""
    own = {p for group in optimizer.param_groups for p in group["params"]}
    frozen = [
        p for opt in others for g in opt.param_groups for p in g["params"] if p not in own and p.requires_grad
    ]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def training_step(module, batch: dict, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer) -> dict:
    """``GALIPModule.training_step`` line for line, with ``loss.backward()`` instead of ``manual_backward``.

    The pieces (sentence vectors, noise, real taps, L_D terms, L_G) are the module's own methods and
    ``galip.losses``; only the Trainer plumbing (optimizer toggling, logging) is replaced.
    """
    from galip import losses

    real, sent = batch["image"], module.sentence_vectors(batch)
    fake = module.generator(module.noise(real.shape[0]), sent)
    fake_taps, fake_emb = module.clip.image_taps(fake, module.tap_blocks, with_embedding=True)

    with only_trainable(opt_d, [opt_g]):
        d_terms = module.discriminator_terms(module.real_taps(real), fake_taps.detach(), sent)
        opt_d.zero_grad(set_to_none=True)
        d_terms["loss"].backward()
        opt_d.step()

    with only_trainable(opt_g, [opt_d]):
        g_terms = losses.generator_loss(
            module.discriminator(fake_taps, sent), losses.clip_similarity(fake_emb, sent), module.sim_weight
        )
        opt_g.zero_grad(set_to_none=True)
        g_terms["loss"].backward()
        opt_g.step()
    return {"d_loss": d_terms["loss"].item(), "g_loss": g_terms["loss"].item()}


def parse_case(case: str) -> tuple[str, int]:
    match = re.fullmatch(r"(g|step|cached)(\d+)", case)
    if not match or int(match.group(2)) < 1:
        raise ValueError(
            f"case {case!r}: expected gN (generator forward), stepN (D+G step) or cachedN (step with "
            "cached sentence vectors), N = batch size"
        )
    return match.group(1), int(match.group(2))


def case_fn(kind: str, module, batch: dict) -> Callable[[], None]:
    """A closure running one repeat of the case (inputs prepared outside the timed region)."""
    if kind == "g":
        module.generator.eval()
        sent = module.clip.encode_text(batch["tokens"])
        z = module.noise(len(batch["caption"]))

        def forward() -> None:
            with torch.inference_mode():
                module.generator(z, sent)

        return forward
    module.train()
    if kind == "cached":  # computed once, outside the timed region, as the cache does it
        batch = {**batch, "sent_emb": module.clip.encode_text(batch["tokens"])}
    opt_g, opt_d = module.configure_optimizers()
    return lambda: training_step(module, batch, opt_g, opt_d)


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
) -> dict:
    """Run one case in this process and return its measurements.

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
        return _measure(kind, batch_size, case, device, geometry, repeats, warmup, precision, seed)
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
) -> dict:
    dev = torch.device(device)
    torch.manual_seed(seed)
    module = build_module(geometry, dev)
    batch = make_batch(module, batch_size, dev)
    fn = case_fn(kind, module, batch)

    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
    else:
        base = _rss_mib()
    times, cpu_times, load_before = [], [], os.getloadavg()[0]
    for i in range(warmup + repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        with _autocast(dev, precision):
            fn()
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
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
        "loadavg_1min": [load_before, os.getloadavg()[0]],
        "images_per_s": batch_size / median if times else float("nan"),
        "peak_mem_mib": peak,
        "mem_delta_mib": peak - base,
        "mem_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "peak RSS",
    }


def run_case_subprocess(case: str, args: argparse.Namespace) -> dict:
    """Re-invoke this script for one case so the case's peak memory is measured in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--cases", case]
    cmd += ["--device", args.device, "--geometry", args.geometry, "--precision", args.precision]
    cmd += ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_JSON_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}")
    return json.loads(lines[-1][len(_JSON_TAG) :])


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


LEGEND = (
    "median/min s: wall seconds per repeat; images/s = batch / median; CPU s: median process CPU seconds per "
    "repeat, all threads (≈ wall × threads when the cores are free); peak memory: see above; growth: peak minus the "
    "memory held once the models were built (CLIP + G + D, and the batch); load avg: 1-min load average before → "
    "after the case."
)


def markdown_table(results: Sequence[dict]) -> str:
    rows = [
        "| case | what | batch | median s | min s | images/s | CPU s | peak memory (MiB) | growth (MiB) | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r['case']} | {r['what']} | {r['batch']} | {r['median_s']:.3f} | {r['min_s']:.3f} "
            f"| {r['images_per_s']:.2f} | {r['cpu_s']:.1f} | {r['peak_mem_mib']:.0f} | {r['mem_delta_mib']:.0f} "
            f"| {r['loadavg_1min'][0]:.1f}→{r['loadavg_1min'][1]:.1f} |"
        )
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
    p.add_argument("--geometry", choices=("vit_b32", "tiny"), default="vit_b32")
    p.add_argument(
        "--cases", default=",".join(DEFAULT_CASES), help="gN = G forward, stepN = D+G step, N = batch"
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
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    if args.precision == "bf16" and args.device == "cpu":
        print("note: bf16 autocast on CPU is rarely faster than fp32", file=sys.stderr)
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
            print(_JSON_TAG + json.dumps(run_case(case, **kwargs)), flush=True)
        return []

    results = []
    for case in cases:
        result = run_case(case, **kwargs) if args.in_process else run_case_subprocess(case, args)
        print(
            f"{case}: median {result['median_s']:.3f} s, times {[round(t, 3) for t in result['times_s']]}",
            file=sys.stderr,
        )
        results.append(result)
    print(markdown_table(results))
    if args.out is not None:
        write_report(args.out, args, argv, results)
    return results


if __name__ == "__main__":
    main()
