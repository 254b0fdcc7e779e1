"""galip: GALIP (Generative Adversarial CLIPs) text-to-image synthesis with PyTorch Lightning + Hydra."""

import os
from importlib.metadata import PackageNotFoundError, version

# PyTorch's CPU allocator asks Linux for transparent huge pages on large tensors when this is set. GALIP's
# decoder makes ~100 MB feature maps; without huge pages, faulting in each fresh map costs more than the
# arithmetic done on it (G forward at the paper's geometry, 2-core CPU: 10.0 s -> 7.2 s; a D+G step
# 39.3 s -> 32.0 s; experiments/benchmarks.md). Read by torch once, at its first large allocation, so
# it is set here, before any model is built. THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
