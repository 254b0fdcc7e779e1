"""galip: GALIP (Generative Adversarial CLIPs) text-to-image synthesis with PyTorch Lightning + Hydra."""

import os
from importlib.metadata import PackageNotFoundError, version

# PyTorch's CPU allocator asks Linux for transparent huge pages on large tensors when this is set. GALIP's
# decoder makes ~100 MB feature maps; without huge pages, faulting in each fresh map costs more than the
# arithmetic done on it (G forward at the paper's geometry, 2-core CPU: 10.0 s -> 7.2 s; a D+G step
# 39.3 s -> 32.0 s; experiments/benchmarks.md). Read by torch once, at its first large allocation, so
# it is set here, before any model is built. THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for the next allocation instead of returning it to Linux.

    By default glibc serves each allocation above 32 MB with a fresh mmap and unmaps it on free, so every
    training step faults in (and the kernel zeroes) all its large feature maps again. With mmap off and
    trimming off, a step reuses the pages of the step before: the same arithmetic, no faults after the first
    step (a D+G step at the paper's geometry, B=8, 2 threads: 13.2 s -> 10.5 s; experiments/benchmarks.md).
    The process's memory then stays at its peak. Returns whether it was applied (glibc on Linux only).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))
    except (OSError, AttributeError):  # not glibc
        return False


# GALIP_KEEP_FREED_MEMORY=0 in the environment turns it off.
KEEPS_FREED_MEMORY = os.environ.get("GALIP_KEEP_FREED_MEMORY", "1") != "0" and keep_freed_memory()

try:
    __version__ = version("galip")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"


def load_generator(path, device="cpu", **clip_overrides):
    """A :class:`galip.sampling.Sampler` for a trained generator: a ``generator.safetensors`` export, a training
    ``.ckpt`` or a run directory (`galip.loading`)."""
    from galip.sampling import Sampler

    return Sampler.from_file(path, device=device, **clip_overrides)


__all__ = ["__version__", "load_generator"]
