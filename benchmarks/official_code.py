"""Run the official GALIP code (tobran/GALIP) on a CPU, for timing it next to galip: `speed.py --official-code`.

Nothing of the official code is kept here: this module imports it from a checkout the user makes themselves
and changes, at run time only, what stops it from running on a CPU without downloads:

* ``.cuda()`` on tensors (MAGP's ``grad_outputs``) returns the tensor itself;
* the CLIP is open_clip's ``ViT-B-32-quickgelu`` with **random weights** (nothing is downloaded), laid out as
  the OpenAI ``clip`` package lays it out: attention in the sequence-first layout (``batch_first=False``)
  that the official code feeds its blocks, and a text transformer that applies its causal mask itself;
* modules it imports but never calls in a training step (``clip``, ``easydict``, ``scipy``) are stand-ins
  when they are not installed.

What is timed is the official code's own: ``models/GALIP.py``'s NetG / NetD / NetC / CLIP encoders and
``lib/modules.py``'s ``train`` (one call per step, over a loader of one batch), fp32 (``mixed_precision``
off), Adam as its ``src/train.py`` builds it. Reals are 256 px, as its data pipeline gives them.

    git clone https://github.com/tobran/GALIP /tmp/GALIP
    python benchmarks/speed.py --official-code /tmp/GALIP --cases g1,g8,step8
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import subprocess
import sys
import types
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from torch import nn

OPTIONAL_IMPORTS = ("clip", "easydict", "scipy")  # imported by the official modules, not used in a step


class _StandIn(types.ModuleType):
    """A module whose every attribute is another stand-in: for imports the timed code never uses."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandIn(f"{self.__name__}.{name}")


def _import_official(checkout: Path) -> tuple[types.ModuleType, types.ModuleType]:
    code = checkout / "code" if (checkout / "code").is_dir() else checkout
    if not (code / "models" / "GALIP.py").is_file():
        raise FileNotFoundError(f"--official-code {checkout}: no models/GALIP.py (a tobran/GALIP checkout?)")
    for name in OPTIONAL_IMPORTS:
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = _StandIn(name)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the only .cuda() in a step: MAGP's grad_outputs
    sys.path.insert(0, str(code))
    modules = importlib.import_module("lib.modules")
    modules.tqdm = functools.partial(modules.tqdm, disable=True)  # train() draws a progress bar per call
    return importlib.import_module("models.GALIP"), modules


def revision(checkout: str | Path) -> str:
    """The checkout's commit, for the record (``?`` if it is not a git checkout)."""
    proc = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return proc.stdout.strip() or "?"


class _SequenceFirstText(nn.Module):
    """The text transformer as OpenAI's ``clip`` has it: [L, B, width] in and out, causal mask inside."""

    def __init__(self, transformer: nn.Module, attn_mask: torch.Tensor):
        super().__init__()
        self.resblocks = transformer.resblocks
        self.register_buffer("attn_mask", attn_mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=self.attn_mask)
        return x


def openai_layout_clip(seed: int = 0) -> nn.Module:
    """Random-weight ViT-B/32 (QuickGELU) with the attribute names and layout of ``clip.load``'s model."""
    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-32-quickgelu")  # no pretrained tag: random weights, offline
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            module.batch_first = False  # the official code runs the blocks on [L, B, width]
    clip = nn.Module()
    clip.visual = model.visual
    clip.transformer = _SequenceFirstText(model.transformer, model.attn_mask)
    clip.vocab_size = model.vocab_size
    clip.token_embedding, clip.positional_embedding = model.token_embedding, model.positional_embedding
    clip.ln_final, clip.text_projection = model.ln_final, model.text_projection
    return clip.eval().requires_grad_(False)


class OfficialRun:
    """The official modules, optimizers and training function, built as its ``src/train.py`` builds them."""

    def __init__(self, checkout: str | Path, seed: int = 0):
        galip_models, self.modules = _import_official(Path(checkout))
        clip = openai_layout_clip(seed)
        self.image_encoder = galip_models.CLIP_IMG_ENCODER(clip).eval()
        self.text_encoder = galip_models.CLIP_TXT_ENCODER(clip).eval()
        self.netG = galip_models.NetG(64, 100, 512, 256, 3, False, clip)
        self.netD = galip_models.NetD(64, 256, 3, False)
        self.netC = galip_models.NetC(64, 512, False)
        d_params = list(self.netD.parameters()) + list(self.netC.parameters())
        self.optimizerD = torch.optim.Adam(d_params, lr=0.0004, betas=(0.0, 0.9))
        self.optimizerG = torch.optim.Adam(self.netG.parameters(), lr=0.0001, betas=(0.0, 0.9))
        self.tokenize = open_clip.get_tokenizer("ViT-B-32-quickgelu")

    def batch(self, captions: list[str], image_size: int = 256) -> tuple:
        """One loader item as its TextImgDataset + DataLoader give it: images in [-1, 1], captions, tokens, keys."""
        n = len(captions)
        images = torch.rand(n, 3, image_size, image_size) * 2 - 1
        return images, captions, self.tokenize(captions), [f"key{i}" for i in range(n)]

    def step_fn(self, batch: tuple) -> Callable[[], None]:
        """One D+G iteration: the official ``train`` over a loader holding this one batch."""
        args = Namespace(
            batch_size=len(batch[1]),
            device=torch.device("cpu"),
            current_epoch=1,
            max_epoch=1,
            z_dim=100,
            multi_gpus=False,
            mixed_precision=False,
            sim_w=4.0,
            scaler_min=64,
        )
        loader = [batch]
        modules = self.modules

        def step() -> None:
            modules.train(
                loader,
                self.netG,
                self.netD,
                self.netC,
                self.text_encoder,
                self.image_encoder,
                self.optimizerG,
                self.optimizerD,
                None,
                None,
                args,
            )

        return step

    def sample_fn(self, batch: tuple) -> Callable[[], None]:
        """G's forward as the official ``sample`` runs it: eval mode, ``torch.no_grad``, ``eval=True``."""
        from lib.datasets import encode_tokens  # the official text path (no_grad + detach)

        sent, _ = encode_tokens(self.text_encoder, batch[2])
        noise = torch.randn(len(batch[1]), 100)
        self.netG.eval()

        def forward() -> None:
            with torch.no_grad():
                self.netG(noise, sent, eval=True)

        return forward
