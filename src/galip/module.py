"""GALIPModule: one adversarial training step that reads like the paper's eq. (1)–(2).

Manual optimisation, one D step then one G step per batch (TTUR: separate Adam optimizers). Lightning's
``global_step`` therefore counts two optimizer steps per batch; progress is reported in images seen (kimg).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from galip import losses
from galip.clip import FrozenCLIP
from galip.models import Discriminator, Generator

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class GALIPModule(L.LightningModule):
    """Trains Mate-G and Mate-D around one shared frozen CLIP.

    Args:
        clip: the frozen CLIP (registered here once; G holds a reference to the same object).
        generator, discriminator: the learnable networks.
        tap_blocks: 0-based CLIP blocks whose patch tokens D reads (paper 1, 4, 8).
        optimizer_g, optimizer_d: factories taking parameters (Hydra ``_partial_`` optimizers).
        sim_weight: λ of the CLIP-similarity term in L_G (paper 4).
        magp_k, magp_p: MAGP weight and power (paper 2, 6).
        grad_clip: optional max grad norm (applied through ``self.clip_gradients``; the Trainer's own
            ``gradient_clip_val`` is refused under manual optimisation).
        ema_half_life_kimg: half-life of an exponential moving average of G's weights, in thousands of
            images (not in the paper; StyleGAN/EDM practice). ``None`` disables it. Sampling uses the EMA.
        ema_rampup: EDM's ramp-up: the half-life is at most ``ema_rampup × images seen`` early in training.
    """

    def __init__(
        self,
        clip: FrozenCLIP,
        generator: Generator,
        discriminator: Discriminator,
        tap_blocks: Sequence[int] = (1, 4, 8),
        optimizer_g: OptimizerFactory | None = None,
        optimizer_d: OptimizerFactory | None = None,
        sim_weight: float = 4.0,
        magp_k: float = 2.0,
        magp_p: float = 6.0,
        grad_clip: float | None = None,
        ema_half_life_kimg: float | None = None,
        ema_rampup: float | None = 0.05,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.clip = clip
        self.generator = generator
        self.discriminator = discriminator
        self.tap_blocks = tuple(tap_blocks)
        self.optimizer_g = optimizer_g or _adam(1e-4)
        self.optimizer_d = optimizer_d or _adam(4e-4)
        self.sim_weight, self.magp_k, self.magp_p, self.grad_clip = sim_weight, magp_k, magp_p, grad_clip
        self.images_seen = 0
        self.ema_half_life_kimg, self.ema_rampup = ema_half_life_kimg, ema_rampup
        self.generator_ema = ema_copy(generator, clip) if ema_half_life_kimg else None

    # -- pieces ---------------------------------------------------------------------------------

    def sentence_vectors(self, batch: dict[str, Any]) -> torch.Tensor:
        """Cached sentence vectors when the batch has them, else the frozen text tower (no graph)."""
        if "sent_emb" in batch:
            return batch["sent_emb"].float()
        return self.clip.encode_text(batch["tokens"])

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.generator.nz, device=self.device)

    def real_taps(self, image: torch.Tensor) -> torch.Tensor:
        """Taps of real images: CLIP is frozen and MAGP differentiates w.r.t. the taps, so no graph here."""
        with torch.no_grad():
            taps, _ = self.clip.image_taps(image, self.tap_blocks, with_embedding=False)
        return taps

    def trainable_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    # -- Lightning ------------------------------------------------------------------------------

    def configure_optimizers(self):
        opt_g = self.optimizer_g(self.trainable_parameters(self.generator))
        opt_d = self.optimizer_d(self.trainable_parameters(self.discriminator))
        return [opt_g, opt_d]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        real, sent = batch["image"], self.sentence_vectors(batch)
        fake = self.generator(self.noise(real.shape[0]), sent)
        fake_taps, fake_emb = self.clip.image_taps(fake, self.tap_blocks, with_embedding=True)

        self.toggle_optimizer(opt_d)
        d_terms = self.discriminator_terms(self.real_taps(real), fake_taps.detach(), sent)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_terms["loss"])
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        # The G step reuses this batch's fake (one G forward per iteration) and D's fresh weights.
        self.toggle_optimizer(opt_g)
        g_terms = losses.generator_loss(
            self.discriminator(fake_taps, sent), losses.clip_similarity(fake_emb, sent), self.sim_weight
        )
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_terms["loss"])
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        self.images_seen += real.shape[0] * self.trainer.world_size
        self.update_ema(real.shape[0] * self.trainer.world_size)
        self.log_terms(d_terms, g_terms, batch_size=real.shape[0])

    def discriminator_terms(
        self, real_taps: torch.Tensor, fake_taps: torch.Tensor, sent: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """L_D: hinge on real / ½ fake / ½ mismatched pairs + MAGP on the real, matching pairs."""
        real_taps = real_taps.detach().requires_grad_(True)
        sent_in = sent.detach().requires_grad_(True)
        # The real branch (and so MAGP's double backward) runs in fp32 whatever the training precision.
        with torch.autocast(device_type=self.device.type, enabled=False):
            d_real = self.discriminator(real_taps.float(), sent_in.float())
            penalty = losses.magp(d_real, (real_taps, sent_in), self.magp_k, self.magp_p)
        d_mis = self.discriminator(real_taps.detach(), losses.mismatch(sent))
        d_fake = self.discriminator(fake_taps, sent)
        return losses.discriminator_loss(d_real, d_fake, d_mis, penalty)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Gradients are already unscaled here under fp16 (Lightning unscales before this hook).
        name = "d" if optimizer is self.trainer.optimizers[1] else "g"
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params]))
        self.log(f"grad_norm/{name}", norm, on_step=True, on_epoch=False)
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def log_terms(self, d_terms: dict, g_terms: dict, batch_size: int) -> None:
        values = {f"d/{k}": v.detach() for k, v in d_terms.items()}
        values.update({f"g/{k}": v.detach() for k, v in g_terms.items()})
        values["kimg"] = self.images_seen / 1000.0
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log_dict(
            {"d_loss": values["d/loss"], "g_loss": values["g/loss"]}, prog_bar=True, batch_size=batch_size
        )

    @torch.no_grad()
    def update_ema(self, batch_images: int) -> None:
        if self.generator_ema is None:
            return
        half_life = self.ema_half_life_kimg * 1000
        if self.ema_rampup:
            half_life = min(half_life, self.images_seen * self.ema_rampup)
        beta = 0.5 ** (batch_images / max(half_life, 1e-8))
        for p_ema, p in zip(self.generator_ema.parameters(), self.generator.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - beta)

    @property
    def sampling_generator(self) -> Generator:
        """The EMA generator when there is one, else the trained one."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    # -- sampling -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, captions: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] for captions and noise (one row each), G in eval mode, clamped."""
        sent = self.clip.encode_text(self.clip.tokenize(captions).to(self.device))
        generator = self.sampling_generator
        was_training = generator.training
        generator.eval()
        try:
            return generator(noise.to(self.device), sent).clamp(-1, 1)
        finally:
            generator.train(was_training)

    # -- checkpoints: the frozen CLIP is rebuilt from the config, not stored in every file -----

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("clip.")
        }
        checkpoint["images_seen"] = self.images_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"].update({f"clip.{k}": v for k, v in self.clip.state_dict().items()})
        self.images_seen = checkpoint.get("images_seen", 0)

    # -- bookkeeping ----------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        """Trainable vs frozen parameters (the paper's "0.08 B trainable" is ``trainable/total``)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.clip.parameters())
        return {
            "params/generator": sum(p.numel() for p in self.trainable_parameters(self.generator)),
            "params/discriminator": sum(p.numel() for p in self.trainable_parameters(self.discriminator)),
            "params/trainable": trainable,
            "params/frozen": frozen,
        }


def ema_copy(generator: Generator, clip: FrozenCLIP) -> Generator:
    """A frozen copy of G that shares (does not copy) the frozen CLIP."""
    ema = copy.deepcopy(generator, memo={id(clip): clip})
    return ema.requires_grad_(False).eval()


def _adam(lr: float) -> OptimizerFactory:
    return lambda params: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.9))
