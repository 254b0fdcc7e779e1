"""galip: GALIP (Generative Adversarial CLIPs) text-to-image synthesis with PyTorch Lightning + Hydra."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("galip")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"


def load_generator(path, device="cpu", **clip_overrides):
    """A :class:`galip.sampling.Sampler` for a generator export (``generator.safetensors``)."""
    from galip.sampling import Sampler

    return Sampler.from_export(path, device=device, **clip_overrides)


__all__ = ["__version__", "load_generator"]
