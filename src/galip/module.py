"""GALIPModule: one adversarial training step that reads like the paper's eq. (1)–(2).

Manual optimisation, one D step then one G step per batch (TTUR: separate Adam optimizers). Lightning's
``global_step`` therefore counts two optimizer steps per batch; progress is reported in images seen (kimg).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

import galip
from galip import augment, d_inputs, losses
from galip.clip import FrozenCLIP
from galip.models import Discriminator, Generator

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class GALIPModule(L.LightningModule):
    """Trains Mate-G and Mate-D around one shared frozen CLIP.

    Args:
        clip: the frozen CLIP (registered here once; G holds a reference to the same object).
        generator, discriminator: the learnable networks, or factories that build them (Hydra ``_partial_``
            targets): ``generator(clip=clip)`` and ``discriminator(**galip.d_inputs.discriminator_shape(…))``.
        tap_blocks: 0-based CLIP blocks whose patch tokens D reads (paper 1, 4, 8).
        d_input: what D reads (Table 3 ablations): ``"clip"`` the frozen CLIP taps of ``tap_blocks`` (GALIP),
            ``"pixels"`` the images themselves (the DF-GAN-style baseline). See `galip.d_inputs`.
        optimizer_g, optimizer_d: factories taking parameters (Hydra ``_partial_`` optimizers).
        loss: the loss weights (`LOSS`): ``sim_weight`` λ of the CLIP-similarity term in L_G (paper 4),
            ``magp_k`` and ``magp_p`` MAGP's weight and power (paper 2, 6).
        grad_clip: optional max grad norm (applied through ``self.clip_gradients``; the Trainer's own
            ``gradient_clip_val`` is refused under manual optimisation).
        ema_half_life_kimg: half-life of an exponential moving average of G's weights, in thousands of
            images (not in the paper; StyleGAN/EDM practice). ``None`` disables it. Sampling uses the EMA.
        ema_rampup: EDM's ramp-up: the half-life is at most ``ema_rampup × images seen`` early in training.
        nonfinite: what a NaN/Inf loss term or gradient does: ``"stop"`` raises `NonFiniteError` naming the
            term (or parameter) and the batch; ``"skip"`` drops that optimizer step and counts it
            (``health/skipped_steps``).
        channels_last: keep G's weights (and so its feature maps) in channels_last memory format: the same
            maths; on a CPU it speeds up G's forward (sampling) but slows a training step down
            (experiments/benchmarks.md), so it is off by default here and on in `galip.sampling`.
        augment_translation: DiffAugment-style random shift (up to this fraction of the image size) of the
            real and fake images before D and the CLIP term see them (`galip.augment`; not in the paper).
            0 = off, as in the official code.
    """

    def __init__(
        self,
        clip: FrozenCLIP,
        generator: Generator | Callable[..., nn.Module],
        discriminator: Discriminator | Callable[..., nn.Module],
        tap_blocks: Sequence[int] = (1, 4, 8),
        d_input: str = "clip",
        optimizer_g: OptimizerFactory | None = None,
        optimizer_d: OptimizerFactory | None = None,
        loss: Mapping[str, float] | None = None,
        grad_clip: float | None = None,
        ema_half_life_kimg: float | None = None,
        ema_rampup: float | None = 0.05,
        nonfinite: str = "stop",
        channels_last: bool = False,
        augment_translation: float = 0.0,
    ):
        super().__init__()
        self.automatic_optimization = False
        if not isinstance(generator, nn.Module):
            generator = generator(clip=clip)
        if not isinstance(discriminator, nn.Module):
            discriminator = discriminator(**d_inputs.discriminator_shape(d_input, clip, len(tap_blocks)))
        if channels_last:
            generator = generator.to(memory_format=torch.channels_last)
        self.clip = clip
        self.generator = generator
        self.discriminator = discriminator
        self.tap_blocks = tuple(tap_blocks)
        self.d_input = d_inputs.d_input(d_input, clip, self.tap_blocks)
        self.augment_translation = augment_translation
        self.optimizer_g = optimizer_g or ttur_adam(1e-4)
        self.optimizer_d = optimizer_d or ttur_adam(4e-4)
        weights = loss_weights(loss)
        self.sim_weight, self.magp_k, self.magp_p = (
            weights["sim_weight"],
            weights["magp_k"],
            weights["magp_p"],
        )
        self.grad_clip = grad_clip
        self.images_seen = 0
        self.ema_half_life_kimg, self.ema_rampup = ema_half_life_kimg, ema_rampup
        self.generator_ema = ema_copy(generator, clip) if ema_half_life_kimg else None
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.nonfinite, self.skipped_steps = nonfinite, 0
        # Set by the entry point; stored in every checkpoint so a file says how it was made.
        self.run_config: dict[str, Any] | None = None
        self._noise_rng: torch.Generator | None = None
        self._rng_to_restore: dict[str, Any] | None = None

    # -- pieces ---------------------------------------------------------------------------------

    def sentence_vectors(self, batch: dict[str, Any]) -> torch.Tensor:
        """Cached sentence vectors when the batch has them, else the frozen text tower (no graph)."""
        if "sent_emb" in batch:
            return batch["sent_emb"].float()
        return self.clip.encode_text(batch["tokens"])

    def noise(self, n: int) -> torch.Tensor:
        """Training noise from a per-rank stream: ranks draw different z (the official code seeds every GPU
        the same, so its ranks generate identical noise), and the stream is checkpointed for exact resume."""
        return torch.randn(n, self.generator.nz, device=self.device, generator=self.noise_rng())

    def noise_rng(self) -> torch.Generator:
        if self._noise_rng is None or self._noise_rng.device != self.device:
            # torch.initial_seed() is the run's seed on every rank (seed_everything); the rank offsets it.
            seed = (torch.initial_seed() + 1_000_003 * self.global_rank) % 2**63
            self._noise_rng = torch.Generator(device=self.device).manual_seed(seed)
        return self._noise_rng

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        """DiffAugment translation of what D and the CLIP term see (`galip.augment`); offsets come from the
        checkpointed noise stream, so an augmented run resumes exactly too."""
        return augment.translate(image, self.augment_translation, self.noise_rng())

    def real_taps(self, image: torch.Tensor) -> torch.Tensor:
        """D's input for real images (CLIP taps, or pixels): no graph, MAGP differentiates w.r.t. it."""
        return self.d_input.real(image)

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
        real, fake = self.augment(real), self.augment(fake)  # identity unless augment_translation > 0
        fake_taps, fake_emb = self.d_input.fake(fake)  # D's input for the fakes + CLIP embedding for L_G
        real_taps = self.real_taps(real)

        d_terms = self.optimize(
            opt_d, "d", lambda: self.discriminator_terms(real_taps, fake_taps.detach(), sent)
        )
        # The G step reuses this batch's fake (one G forward per iteration) and D's fresh weights.
        g_terms = self.optimize(
            opt_g,
            "g",
            lambda: losses.generator_loss(
                self.discriminator(fake_taps, sent), losses.clip_similarity(fake_emb, sent), self.sim_weight
            ),
        )

        self.images_seen += real.shape[0] * self.trainer.world_size
        self.update_ema(real.shape[0] * self.trainer.world_size)
        self.log_terms(d_terms, g_terms, batch_size=real.shape[0])

    def optimize(
        self, optimizer: torch.optim.Optimizer, name: str, terms_fn: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """One optimizer step on ``terms_fn()["loss"]``, with only ``optimizer``'s parameters trainable."""
        self.toggle_optimizer(optimizer)
        terms = terms_fn()
        optimizer.zero_grad(set_to_none=True)
        if self.finite_terms(terms, name):
            self.manual_backward(terms["loss"])
            optimizer.step()  # gradients are checked in on_before_optimizer_step
        self.untoggle_optimizer(optimizer)
        return terms

    # -- health: NaN/Inf stops (or skips) with the culprit named -------------------------------

    def finite_terms(self, terms: dict[str, torch.Tensor], name: str) -> bool:
        bad = [f"{name}/{k}" for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
        return not bad or self.nonfinite_found(f"loss term {', '.join(bad)}")

    def finite_grads(self, optimizer: torch.optim.Optimizer, norms: torch.Tensor, params: list) -> bool:
        if torch.isfinite(norms).all() or self.grad_scaler_active():
            return True  # a GradScaler skips inf/NaN steps itself and lowers its scale: that is normal
        names = {id(p): n for n, p in self.named_parameters()}
        bad = [names.get(id(p), "?") for p, v in zip(params, norms, strict=True) if not torch.isfinite(v)]
        if not self.nonfinite_found(f"gradient of {', '.join(bad[:3])}" + (" …" if len(bad) > 3 else "")):
            optimizer.zero_grad(set_to_none=True)  # params without grads are left alone by the step
            return False
        return True

    def nonfinite_found(self, what: str) -> bool:
        """Raise (``nonfinite="stop"``) or count the skipped step and return False (``"skip"``)."""
        where = f"batch {self.trainer.fit_loop.epoch_loop.total_batch_idx + 1}, step {self.global_step}"
        if self.nonfinite == "stop":
            raise NonFiniteError(f"non-finite {what} at {where} (model.nonfinite=skip skips such steps)")
        self.skipped_steps += 1
        self.print(f"galip: skipping the step: non-finite {what} at {where}")
        return False

    def grad_scaler_active(self) -> bool:
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def discriminator_terms(
        self, real_taps: torch.Tensor, fake_taps: torch.Tensor, sent: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """L_D (eq. 1): hinge on real / ½ fake / ½ mismatched pairs + MAGP on the real, matching pairs.

        D(x, s) = assess(features(x), s): the real and mismatched pairs share one pass of D's feature
        extractor, as in the official code (the same values and gradients as two passes, for less compute).
        MAGP differentiates D(x, s) w.r.t. the CLIP taps of x and the sentence vector s.
        """
        real_taps = real_taps.detach().requires_grad_(True)
        sent_in = sent.detach().requires_grad_(True)
        # The real branch (and so MAGP's double backward) runs in fp32 whatever the training precision.
        with torch.autocast(device_type=self.device.type, enabled=False):
            real_features = self.discriminator.features(real_taps.float())
            d_real = self.discriminator.assess(real_features, sent_in.float())
            penalty = losses.magp(d_real, [real_taps, sent_in], self.magp_k, self.magp_p)
        d_mismatch = self.discriminator.assess(real_features, losses.mismatch(sent))
        d_fake = self.discriminator(fake_taps, sent)
        return losses.discriminator_loss(d_real, d_fake, d_mismatch, penalty)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Gradients are already unscaled here under fp16 (Lightning unscales before this hook).
        name = "d" if optimizer is self.trainer.optimizers[1] else "g"
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms = torch.stack([p.grad.detach().float().norm() for p in params])
        self.log(f"grad_norm/{name}", torch.linalg.vector_norm(norms), on_step=True, on_epoch=False)
        if self.finite_grads(optimizer, norms, params) and self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def log_terms(self, d_terms: dict, g_terms: dict, batch_size: int) -> None:
        values = {f"d/{k}": v.detach() for k, v in d_terms.items()}
        values.update({f"g/{k}": v.detach() for k, v in g_terms.items()})
        values["kimg"] = self.images_seen / 1000.0
        values["health/skipped_steps"] = float(self.skipped_steps)
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
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["rng_states"] = self.rng_states()
        checkpoint["galip_version"] = galip.__version__
        if self.run_config is not None:
            checkpoint["config"] = self.run_config
        run_id = wandb_run_id(self.loggers)
        if run_id is not None:
            checkpoint["wandb_run_id"] = run_id

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"].update({f"clip.{k}": v for k, v in self.clip.state_dict().items()})
        self.images_seen = checkpoint.get("images_seen", 0)
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        # Applied at the first resumed batch: building the data iterator in between draws from the RNG.
        self._rng_to_restore = checkpoint.get("rng_states")

    def rng_states(self) -> dict[str, Any]:
        states = {
            "torch": torch.get_rng_state(),
            "numpy": numpy_rng_state(),
            "python": random.getstate(),
            "noise": self.noise_rng().get_state(),
        }
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        return states

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is None:
            return
        states, self._rng_to_restore = self._rng_to_restore, None
        torch.set_rng_state(states["torch"])
        set_numpy_rng_state(states["numpy"])
        random.setstate(states["python"])
        self.noise_rng().set_state(states["noise"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])

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


LOSS = {"sim_weight": 4.0, "magp_k": 2.0, "magp_p": 6.0}  # the paper's λ, MAGP k and p


def loss_weights(loss: Mapping[str, float] | None) -> dict[str, float]:
    """`LOSS` with ``loss``'s values; a key that is not a loss weight is an error naming the known ones."""
    unknown = sorted(set(loss or {}) - set(LOSS))
    if unknown:
        raise ValueError(f"model.loss: unknown keys {unknown}; known: {sorted(LOSS)}")
    return {k: float(v) for k, v in {**LOSS, **(loss or {})}.items()}


class NonFiniteError(RuntimeError):
    """A loss term or gradient became NaN/Inf (the message names it, with the batch and step)."""


def numpy_rng_state() -> dict[str, Any]:
    """NumPy's global RNG state as tensors and plain numbers: checkpoints then load with ``weights_only``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def set_numpy_rng_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached"]))


def wandb_run_id(loggers: Sequence[Any]) -> str | None:
    """The W&B run id of the first WandbLogger, so a resumed run continues the same W&B run."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            return logger.version
    return None


def ema_copy(generator: Generator, clip: FrozenCLIP) -> Generator:
    """A frozen copy of G that shares (does not copy) the frozen CLIP."""
    ema = copy.deepcopy(generator, memo={id(clip): clip})
    return ema.requires_grad_(False).eval()


def ttur_adam(lr: float, fused: bool = True) -> OptimizerFactory:
    """The paper's Adam (β = (0, 0.9)) as a factory; ``fused=False`` is torch's default per-parameter loop."""
    return lambda params: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.9), fused=fused)
