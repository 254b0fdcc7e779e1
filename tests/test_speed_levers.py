"""The speed levers change how GALIP runs, never what it computes (issue: speed, identical maths).

Each lever is checked against the plain computation: the batched Affine MLPs against each Affine's own MLPs,
the fused deep-fusion op against autograd's finite differences and the four plain ops, the optimised G
(batched + fused + channels_last) against the plain G for images and gradients, and the benchmark's
official-computation step against the module's step for the weights after one update.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from galip.models import Generator
from galip.models.generator import set_execution
from galip.models.layers import Affine, Conditioning, DFBlock, GBlock, _DeepFusion, condition

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import speed

SMALL_G = {"ngf": 8, "code_ch": 8, "mid_ch": 4, "n_fusion_blocks": 2, "prompt_blocks": (1, 2)}


def _randomise_affines(module: torch.nn.Module, std: float = 0.3) -> None:
    """Affines start as the identity (zero second layers): give them weights that make them matter."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "linear2" in name:
                p.normal_(0.0, std)


def test_conditioning_matches_each_affines_own_mlps():
    torch.manual_seed(0)
    affines = [Affine(12, c) for c in (4, 8, 4, 16, 8)]  # several widths, repeated ones grouped
    for a in affines:
        _randomise_affines(a)
    cond = torch.randn(3, 12)
    batched = Conditioning(affines, cond)
    for a in affines:
        for got, want in zip(batched.scale_shift(a), a.scale_shift(cond), strict=True):
            assert got.shape == want.shape == (3, a.fc_gamma.linear2.out_features, 1, 1)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_condition_is_plain_cond_when_not_batched_or_without_affines():
    cond = torch.randn(2, 5)
    assert condition(DFBlock(5, 3), cond, batched=False) is cond
    assert condition(torch.nn.Conv2d(3, 3, 1), cond, batched=True) is cond
    assert isinstance(condition(DFBlock(5, 3), cond, batched=True), Conditioning)


def test_deep_fusion_backward_passes_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.double, requires_grad=True)
    params = [torch.randn(2, 3, 1, 1, dtype=torch.double, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(_DeepFusion.apply, (x, *params))


def test_deep_fusion_equals_the_four_plain_ops():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    g0, b0, g1, b1 = (torch.randn(2, 3, 1, 1, requires_grad=True) for _ in range(4))
    plain = F.leaky_relu(g1 * F.leaky_relu(g0 * x + b0, 0.2) + b1, 0.2)
    fused = _DeepFusion.apply(x, g0, b0, g1, b1)
    torch.testing.assert_close(fused, plain)
    upstream = torch.randn_like(plain)
    want = torch.autograd.grad(plain, (x, g0, b0, g1, b1), upstream)
    got = torch.autograd.grad(fused, (x, g0, b0, g1, b1), upstream)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_deep_fusion_leaves_its_input_untouched():
    x = torch.randn(1, 2, 3, 3)
    before = x.clone()
    _DeepFusion.apply(x, *(torch.randn(1, 2, 1, 1) for _ in range(4)))
    assert torch.equal(x, before)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gblock_fused_equals_plain(channels_last):
    torch.manual_seed(0)
    block = GBlock(10, 6, 4, size=8)
    _randomise_affines(block)
    plain = copy.deepcopy(block)
    for m in plain.modules():
        if isinstance(m, DFBlock):
            m.fused = False
    if channels_last:
        block = block.to(memory_format=torch.channels_last)
    x, y = torch.randn(2, 6, 4, 4), torch.randn(2, 10)
    torch.testing.assert_close(block(x, condition(block, y, True)), plain(x, y), rtol=1e-5, atol=1e-5)


def _generator_pair(clip):
    torch.manual_seed(0)
    plain = Generator(clip, **SMALL_G, batched_affines=False, fused_fusion=False)
    _randomise_affines(plain, std=0.1)
    fast = set_execution(copy.deepcopy(plain), batched_affines=True, fused_fusion=True)
    return plain, fast.to(memory_format=torch.channels_last)


def test_optimised_generator_gives_the_plain_generators_image_and_gradients(tiny_clip):
    plain, fast = _generator_pair(tiny_clip)
    assert all(m.fused for m in fast.modules() if isinstance(m, DFBlock))
    assert not any(m.fused for m in plain.modules() if isinstance(m, DFBlock))
    torch.manual_seed(1)
    z, s = torch.randn(3, plain.nz), torch.randn(3, tiny_clip.geometry.embed_dim)
    want, got = plain(z, s), fast(z, s)
    assert got.shape == want.shape == (3, 3, 64, 64)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (want - plain(z, s.roll(1, 0))).abs().max() > 1e-3  # the text does reach the image

    upstream = torch.randn_like(want)
    want.backward(upstream)
    got.backward(upstream)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_optimised_generator_in_inference_mode(tiny_clip):
    plain, fast = _generator_pair(tiny_clip)
    z, s = torch.randn(2, plain.nz), torch.randn(2, tiny_clip.geometry.embed_dim)
    with torch.inference_mode():
        torch.testing.assert_close(fast.eval()(z, s), plain.eval()(z, s), rtol=1e-4, atol=1e-5)


def test_execution_choices_are_not_architecture(tiny_clip):
    """Same parameters and state-dict keys, and nothing about execution in the rebuild config."""
    plain, fast = _generator_pair(tiny_clip)
    assert list(plain.state_dict()) == list(fast.state_dict())
    assert "batched_affines" not in fast.config and "fused_fusion" not in fast.config


# ---------------------------------------------------------------------------------------------
# The benchmark: the official computation and the module's step are the same update
# ---------------------------------------------------------------------------------------------


def _one_update(levers):
    torch.manual_seed(0)
    module = speed.build_module("tiny", torch.device("cpu"), levers)
    _randomise_affines(module.generator, std=0.05)
    # SGD, so the update is continuous in the gradients (Adam's first step is lr·sign(g): float noise in a
    # near-zero gradient would flip it).
    module.optimizer_g = module.optimizer_d = lambda params: torch.optim.SGD(params, lr=0.5)
    batch = speed.make_batch(module, 4, torch.device("cpu"))
    losses = speed.case_fn("step", module, batch, levers)()
    return module, losses


def test_official_step_and_optimised_step_make_the_same_update():
    official, official_losses = _one_update(())
    ours, our_losses = _one_update(speed.DEFAULT_LEVERS + ("cached_text",))
    assert official_losses["d_loss"] == pytest.approx(our_losses["d_loss"], rel=1e-4)
    assert official_losses["g_loss"] == pytest.approx(our_losses["g_loss"], rel=1e-4)
    for net in ("generator", "discriminator"):
        a, b = getattr(official, net).state_dict(), getattr(ours, net).state_dict()
        assert list(a) == list(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=f"{net}.{key}")
    moved = [k for k, v in ours.generator.state_dict().items() if "linear2" in k]
    assert moved  # the step did change the Affines (it is not comparing two untouched models)


def test_levers_parse_and_ladder():
    assert speed.parse_levers("none") == ()
    assert speed.parse_levers("default") == speed.DEFAULT_LEVERS
    assert speed.parse_levers("fused_fusion, channels_last") == ("fused_fusion", "channels_last")
    with pytest.raises(ValueError, match="unknown"):
        speed.parse_levers("fused_fusion,warp_drive")
    steps = speed.ladder("step")
    assert steps[0] == () and steps[-1] == speed.LADDER and len(steps) == len(speed.LADDER) + 1
    assert all(not set(levers) & speed.STEP_ONLY for levers in speed.ladder("g"))


def test_ladder_table_reports_speedup_over_the_official_row():
    def row(levers, median):
        return {
            "case": "step8",
            "levers": list(levers),
            "batch": 8,
            "median_s": median,
            "min_s": median,
            "images_per_s": 8 / median,
            "cpu_s": median,
            "peak_mem_mib": 1.0,
            "mem_delta_mib": 1.0,
            "loadavg_1min": [0.0, 0.0],
        }

    table = speed.markdown_table(
        [row((), 30.0), row(("module_step",), 20.0), row(speed.DEFAULT_LEVERS, 10.0)]
    )
    lines = table.splitlines()[2:]
    assert "none (official computation)" in lines[0] and "| 1.00 |" in lines[0]
    assert "+ module_step" in lines[1] and "| 1.50 |" in lines[1]
    assert "| default |" in lines[2] and "| 3.00 |" in lines[2]


# ---------------------------------------------------------------------------------------------
# Huge pages: set by `import galip`, before torch's first large allocation; the user's value wins
# ---------------------------------------------------------------------------------------------


def _thp_after_import(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    code = "import os, galip; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_galip_turns_huge_pages_on_unless_told_otherwise():
    assert _thp_after_import(None) == "1"
    assert _thp_after_import("0") == "0"
