"""``precision=bf16`` sampling: the same images up to bf16 rounding, and a bad precision is one clear error."""

from __future__ import annotations

import pytest
import torch

from galip.models import Generator
from galip.sampling import Sampler


@pytest.fixture(scope="module")
def generator(tiny_clip) -> Generator:
    torch.manual_seed(0)
    g = Generator(tiny_clip, ngf=16, prompt_blocks=[1, 2])
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # off the identity init, so every layer matters
    return g.eval()


def test_bf16_sampling_is_fp32_sampling_up_to_bf16_rounding(generator):
    prompts = ["a red circle", "a blue square"]
    fp32 = Sampler(generator).generate(prompts, n=2, seed=0)
    bf16 = Sampler(generator, precision="bf16").generate(prompts, n=2, seed=0)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert bf16.abs().max() <= 1
    assert (bf16 - fp32).abs().mean() < 0.02  # bf16 keeps 8 bits of mantissa: ~0.4 % per op
    assert not torch.equal(bf16, fp32)  # it did run in bf16


def test_unknown_precision_is_a_value_error(generator):
    with pytest.raises(ValueError, match="precision='fp16'"):
        Sampler(generator, precision="fp16")


def test_sample_cli_has_a_precision_option():
    from omegaconf import OmegaConf

    from tests.helpers import CONF_DIR

    assert OmegaConf.load(CONF_DIR / "sample.yaml").precision == "fp32"
