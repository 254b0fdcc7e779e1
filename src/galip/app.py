"""``python -m galip.app [ckpt=<export|.ckpt|run dir>]``: a web page to play with a trained generator.

Prompt -> images with the controls GANs are known for: the number of images, a seed per image (or a random one),
truncation ψ, prompt interpolation and noise interpolation (a strip, an animated GIF and a slider), PNG/GIF
downloads. Without ``ckpt=`` it serves the shipped demo generator (`galip.world.demo_generator`), so it works on a
fresh clone (``default_generator=`` names another). It binds to 127.0.0.1 unless told otherwise (``server_name=0.0.0.0``, ``share=true``: Gradio's
own launch options, which also read ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``).

`Playground` holds what the page does (plain functions of plain values, tested without a browser); `build_page`
lays it out with Gradio.
"""

from __future__ import annotations

import importlib.util
import pickle
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path

import hydra
import torch
from hydra.utils import get_method
from omegaconf import DictConfig
from PIL import Image
from torchvision.transforms.functional import to_pil_image

from galip.loading import load_generator
from galip.sampling import Sampler, lerp_weights, run_export_cli, save_gif, save_grid, slerp

INSTALL_HINT = "galip: the web page needs gradio: pip install 'galip[app]' (or pip install -e '.[app]')"
EXAMPLE_PROMPTS = (
    "a large red circle on a white background",
    "a small blue square on a black background",
    "a large yellow triangle on a grey background",
    "a small green cross on a white background",
)
DEFAULT = "galip.world.demo_generator.load_demo_generator"  # conf/app.yaml's default_generator
MAX_IMAGES = 16
DISPLAY_PX = 192  # small images are enlarged (nearest) for the page; the downloads keep G's own size
NOISE_NOTE = (
    "On the demo world G largely ignores its noise (the columns of its training grids agree), so the seed, ψ "
    "and noise interpolation change its images little; the prompt is what moves them."
)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_sampler(
    ckpt: str | Path | None, device: str = "auto", default: str = DEFAULT
) -> tuple[Sampler, str]:
    """The sampler of ``ckpt`` and a line that says what it is; ``ckpt=None`` calls ``default``, the dotted name
    of a function that returns a generator (the embedded world's, named rather than imported: the framework does
    not depend on the world wing). A file that is not one the project writes is a ValueError that says so."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if ckpt is None:
        return Sampler(get_method(default)(), device), "the shipped demo generator"
    try:
        generator = load_generator(ckpt)
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError) as err:  # torch.load of a foreign file
        raise ValueError(
            f"{ckpt} is not a galip generator export, training checkpoint or run directory ({err})"
        ) from None
    return Sampler(generator, device), str(ckpt)


# ---------------------------------------------------------------------------------------------
# What the page does
# ---------------------------------------------------------------------------------------------
@dataclass
class Playground:
    """The page's actions on plain values. Image ``i`` of a batch uses seed ``seed + i`` (the first noise of that
    seed: ``python -m galip.sample n=1 seed=…`` draws the same image), so the seed under an image reproduces it
    and can be an end of a noise interpolation."""

    sampler: Sampler
    source: str = ""
    out_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="galip-app-")))

    @property
    def device(self) -> str:
        return self.sampler.device.type

    def seed_noise(self, seeds: Sequence[int], truncation: float) -> torch.Tensor:
        return torch.cat([self.sampler.noise(1, int(s), truncation) for s in seeds])

    def generate(self, prompt: str, n: int, seed: int, truncation: float = 1.0):
        """``n`` images of one prompt, seeds ``seed … seed + n − 1`` -> (images, seeds, PNG paths, status line)."""
        n = int(n)
        if not 1 <= n <= MAX_IMAGES:
            raise ValueError(f"number of images {n}: choose 1 to {MAX_IMAGES}")
        prompt = typed(prompt, "the prompt")
        seeds = [int(seed) + i for i in range(n)]
        start = time.perf_counter()
        sent = self.sampler.sentence_vectors([prompt]).expand(n, -1)
        images = self.sampler.from_vectors(sent, self.seed_noise(seeds, truncation))
        took = time.perf_counter() - start
        files = [self._png(image, f"seed{s}") for image, s in zip(images, seeds, strict=True)]
        return images, seeds, files, self._status(n, took)

    def prompt_frames(self, prompt_a: str, prompt_b: str, weights, seed: int, truncation: float = 1.0):
        """Fixed noise, the sentence vector blended from ``prompt_a`` (weight 0) to ``prompt_b`` (weight 1)."""
        prompts = [typed(prompt_a, "the 'from' prompt"), typed(prompt_b, "the 'to' prompt")]
        sent = self.sampler.sentence_vectors(prompts).cpu()
        weights = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        mix = torch.lerp(sent[0], sent[1], weights[:, None])
        return self.sampler.from_vectors(mix, self.seed_noise([seed], truncation).expand(len(mix), -1))

    def noise_frames(self, prompt: str, seed_a: int, seed_b: int, weights, truncation: float = 1.0):
        """Fixed prompt, the noise slerped from seed ``seed_a``'s (weight 0) to seed ``seed_b``'s (weight 1)."""
        prompt = typed(prompt, "the prompt")
        weights = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        a, b = (self.seed_noise([s], truncation).expand(len(weights), -1) for s in (seed_a, seed_b))
        sent = self.sampler.sentence_vectors([prompt]).cpu().expand(len(weights), -1)
        return self.sampler.from_vectors(sent, slerp(a, b, weights))

    def strip(self, frames_of: Callable[[torch.Tensor], torch.Tensor], steps: int, stem: str):
        """``steps`` frames at evenly spaced weights -> (strip PNG, GIF, status line); small frames are enlarged
        (nearest) to at least 128 px, or a 32-px GIF is a speck on the page."""
        steps = int(steps)
        if not 2 <= steps <= 32:
            raise ValueError(f"steps {steps}: choose 2 to 32")
        start = time.perf_counter()
        frames = frames_of(lerp_weights(steps))
        took = time.perf_counter() - start
        frames = frames.repeat_interleave(max(1, 128 // frames.shape[-1]), -1)
        frames = frames.repeat_interleave(max(1, 128 // frames.shape[-2]), -2)
        strip = save_grid(frames, self._path(f"{stem}.png"), nrow=steps)
        return strip, save_gif(frames, self._path(f"{stem}.gif")), self._status(steps, took)

    def _status(self, count: int, seconds: float) -> str:
        return f"{count} image{'s' * (count != 1)} in {seconds:.2f} s on {self.device}"

    def _path(self, name: str) -> Path:
        """A fresh folder per request, so the page never shows a file a later request overwrote."""
        folder = Path(tempfile.mkdtemp(dir=self.out_dir))
        return folder / name

    def _png(self, image: torch.Tensor, stem: str) -> Path:
        path = self._path(f"{stem}.png")
        to_pil(image).save(path)
        return path


def typed(prompt: str | None, what: str) -> str:
    """A prompt from the page, stripped; an empty one is a ValueError that says which box is empty."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError(f"{what} is empty: type what to draw, e.g. '{EXAMPLE_PROMPTS[0]}'")
    return prompt


def to_pil(image: torch.Tensor) -> Image.Image:
    return to_pil_image(((image.clamp(-1, 1) + 1) * 127.5).round().byte())


def enlarged(image: Image.Image, size: int = DISPLAY_PX) -> Image.Image:
    """Small images shown large without blurring (nearest neighbour), to at least ``size`` pixels."""
    scale = max(1, size // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------
def _user_errors(fn: Callable) -> Callable:
    """A user's mistake (an empty prompt, a bad number) is a message on the page, not a stack trace."""
    import gradio as gr

    @wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except ValueError as err:
            raise gr.Error(str(err), print_exception=False) from None

    return wrapper


def build_page(play: Playground, examples: Sequence[str] = EXAMPLE_PROMPTS):
    """The Gradio page (``gr.Blocks``) around ``play``; ``launch`` it to serve."""
    import gradio as gr

    def pick_seed(seed, random_seed) -> int:
        return random.randrange(2**31) if random_seed else int(seed)

    @_user_errors
    def generate(prompt, n, seed, random_seed, truncation):
        seed = pick_seed(seed, random_seed)
        images, seeds, files, status = play.generate(prompt, n, seed, truncation)
        gallery = [(enlarged(to_pil(im)), f"seed {s}") for im, s in zip(images, seeds, strict=True)]
        return gallery, [str(f) for f in files], status, seed

    @_user_errors
    def prompt_strip(a, b, steps, seed, truncation):
        strip, gif, status = play.strip(
            lambda w: play.prompt_frames(a, b, w, seed, truncation), steps, "prompts"
        )
        return str(strip), str(gif), [str(strip), str(gif)], status

    @_user_errors
    def prompt_at(a, b, t, seed, truncation):
        return enlarged(to_pil(play.prompt_frames(a, b, [t], seed, truncation)[0]))

    @_user_errors
    def noise_strip(prompt, seed_a, seed_b, steps, truncation):
        frames = lambda w: play.noise_frames(prompt, seed_a, seed_b, w, truncation)  # noqa: E731
        strip, gif, status = play.strip(frames, steps, "noise")
        return str(strip), str(gif), [str(strip), str(gif)], status

    @_user_errors
    def noise_at(prompt, seed_a, seed_b, t, truncation):
        return enlarged(to_pil(play.noise_frames(prompt, seed_a, seed_b, [t], truncation)[0]))

    def psi_slider(elem_id: str):
        return gr.Slider(
            0, 1, value=1.0, step=0.05, label="truncation ψ (1 = none; toward 0 the noise shrinks to its mean)",
            elem_id=elem_id,
        )  # fmt: skip

    with gr.Blocks(title="galip: play with a generator", analytics_enabled=False) as page:
        gr.Markdown(
            f"## galip: text → image with a GALIP generator\nGenerator: **{play.source}**, "
            f"{play.sampler.generator.image_size} px, on {play.device}. {NOISE_NOTE}"
        )
        with gr.Tab("Generate"):
            with gr.Row():
                prompt = gr.Textbox(examples[0], label="prompt", elem_id="prompt", scale=4)
                go = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
            gr.Examples([[e] for e in examples], inputs=[prompt])
            with gr.Row():
                n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="number of images", elem_id="n")
                seed = gr.Number(0, precision=0, label="seed (image i uses seed + i)", elem_id="seed")
                random_seed = gr.Checkbox(False, label="random seed", elem_id="random_seed")
                psi = psi_slider("psi")
            gallery = gr.Gallery(
                label="images (the seed of each under it)", columns=8, elem_id="gallery", format="png"
            )
            status = gr.Markdown(elem_id="status")
            files = gr.File(label="download PNGs", file_count="multiple", elem_id="files")
            go.click(generate, [prompt, n, seed, random_seed, psi], [gallery, files, status, seed])
            prompt.submit(generate, [prompt, n, seed, random_seed, psi], [gallery, files, status, seed])

        with gr.Tab("Prompt interpolation"):
            with gr.Row():
                a = gr.Textbox(examples[0], label="from prompt", elem_id="prompt_a")
                b = gr.Textbox(examples[1], label="to prompt", elem_id="prompt_b")
            with gr.Row():
                p_seed = gr.Number(0, precision=0, label="seed", elem_id="p_seed")
                p_steps = gr.Slider(2, 32, value=8, step=1, label="steps")
                p_psi = psi_slider("p_psi")
            p_go = gr.Button("Interpolate", variant="primary", elem_id="p_go")
            with gr.Row():
                p_t = gr.Slider(0, 1, value=0, step=0.05, label="from → to", elem_id="p_t")
                p_image = gr.Image(label="at the slider", elem_id="p_image", format="png")
            p_strip = gr.Image(label="strip", elem_id="p_strip", format="png")
            p_gif = gr.Image(label="GIF", elem_id="p_gif")
            p_status = gr.Markdown()
            p_files = gr.File(label="download strip and GIF", file_count="multiple")
            p_go.click(prompt_strip, [a, b, p_steps, p_seed, p_psi], [p_strip, p_gif, p_files, p_status])
            p_t.change(prompt_at, [a, b, p_t, p_seed, p_psi], [p_image])

        with gr.Tab("Noise interpolation"):
            gr.Markdown("One prompt; the noise slerped from one seed's to another's. " + NOISE_NOTE)
            with gr.Row():
                q_prompt = gr.Textbox(examples[0], label="prompt", elem_id="q_prompt")
                q_a = gr.Number(0, precision=0, label="from seed")
                q_b = gr.Number(1, precision=0, label="to seed")
            with gr.Row():
                q_steps = gr.Slider(2, 32, value=8, step=1, label="steps")
                q_psi = psi_slider("q_psi")
            q_go = gr.Button("Interpolate", variant="primary")
            with gr.Row():
                q_t = gr.Slider(0, 1, value=0, step=0.05, label="from seed → to seed", elem_id="q_t")
                q_image = gr.Image(label="at the slider", format="png")
            q_strip = gr.Image(label="strip", format="png")
            q_gif = gr.Image(label="GIF")
            q_status = gr.Markdown()
            q_files = gr.File(label="download strip and GIF", file_count="multiple")
            q_go.click(noise_strip, [q_prompt, q_a, q_b, q_steps, q_psi], [q_strip, q_gif, q_files, q_status])
            q_t.change(noise_at, [q_prompt, q_a, q_b, q_t, q_psi], [q_image])
    return page


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def serve(cfg: DictConfig) -> None:
    sampler, source = load_sampler(cfg.ckpt, cfg.device, cfg.default_generator)
    page = build_page(Playground(sampler, source), list(cfg.examples) if cfg.examples else EXAMPLE_PROMPTS)
    page.launch(server_name=cfg.server_name, server_port=cfg.server_port, share=cfg.share)


@hydra.main(version_base="1.3", config_path="conf", config_name="app")
def main(cfg: DictConfig) -> None:
    if importlib.util.find_spec("gradio") is None:
        print(INSTALL_HINT, file=sys.stderr)
        sys.exit(2)
    run_export_cli(serve, cfg)


if __name__ == "__main__":
    main()
