"""The speed levers change how GALIP runs, never what it computes (issue: speed, identical maths).

Each lever is checked against the plain computation: the batched Affine MLPs against each Affine's own MLPs,
the fused deep-fusion op against autograd's finite differences and the four plain ops, the optimised G
(batched + fused + folded upsample + channels_last) against the plain G for images and gradients, the folded
upsample-conv against the upsample and conv it replaces, and the benchmark's
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
from benchmarks import speed

from galip.clip import blocks
from galip.clip.blocks import _is_plain, frozen_linear, run_block, set_gemm_attention, set_onednn_linear
from galip.clip.taps import patch_tokens, set_patch_gemm
from galip.clip.text import _causal_argmax_tower, sentence_vectors, set_text_prefix
from galip.models import Discriminator, Generator
from galip.models.generator import set_execution
from galip.models.layers import (
    Affine,
    Conditioning,
    DFBlock,
    GBlock,
    _DeepFusion,
    condition,
    resize_nearest,
    upsample2x_conv3x3,
)
from galip.module import GALIPModule
from tests.helpers import one_batch_trainer

SMALL_G = {"ngf": 8, "code_ch": 8, "mid_ch": 4, "n_fusion_blocks": 2, "prompt_blocks": (1, 2)}


@pytest.fixture(autouse=True)
def _clip_switches_back_on():
    """speed.build_module sets the process-wide CLIP switches for its levers: leave them at the defaults."""
    yield
    set_gemm_attention(True)
    set_onednn_linear(True)
    set_text_prefix(True)
    set_patch_gemm(True)


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


def _plain_copy(block: torch.nn.Module) -> torch.nn.Module:
    plain = copy.deepcopy(block)
    for m in plain.modules():
        if isinstance(m, DFBlock):
            m.fused = False
        elif isinstance(m, GBlock):
            m.folded = False
    return plain


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("in_ch", "out_ch", "in_size", "size"),
    [
        (6, 4, 4, 8),
        (4, 4, 4, 8),
        (6, 4, 7, 8),
        (6, 4, 8, 8),
        (6, 4, 4, 7),
    ],  # 2×, 2× identity shortcut, 7->8, none, 1.75×
)
def test_gblock_fused_and_folded_equals_plain(channels_last, in_ch, out_ch, in_size, size):
    torch.manual_seed(0)
    block = GBlock(10, in_ch, out_ch, size=size)
    _randomise_affines(block)
    with torch.no_grad():
        block.c1.bias.normal_()
    plain = _plain_copy(block)
    assert block.folded and not plain.folded
    if channels_last:
        block = block.to(memory_format=torch.channels_last)
    x, y = torch.randn(2, in_ch, in_size, in_size, requires_grad=True), torch.randn(2, 10)
    want, got = plain(x, y), block(x, condition(block, y, True))
    assert got.shape == want.shape == (2, out_ch, size, size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, *plain.parameters()], upstream)
    got_grads = torch.autograd.grad(got, [x, *block.parameters()], upstream)
    names = ["x", *(n for n, _ in plain.named_parameters())]
    for name, g, w in zip(names, got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_upsample2x_conv3x3_is_the_conv_of_the_nearest_upsample():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5, dtype=torch.double)
    w, b = torch.randn(4, 3, 3, 3, dtype=torch.double), torch.randn(4, dtype=torch.double)
    want = F.conv2d(resize_nearest(x, 10), w, b, padding=1)
    torch.testing.assert_close(upsample2x_conv3x3(x, w, b), want)
    # each output phase reads its own 2×2 window: a one-hot input shows the folded taps are where they belong
    one = torch.zeros(1, 1, 3, 3, dtype=torch.double)
    one[0, 0, 1, 1] = 1.0
    kernel = torch.arange(9, dtype=torch.double).view(1, 1, 3, 3)
    torch.testing.assert_close(
        upsample2x_conv3x3(one, kernel, None), F.conv2d(resize_nearest(one, 6), kernel, padding=1)
    )
    xg = x[:1, :2, :3, :3].clone().requires_grad_()
    wg, bg = w[:2, :2].clone().requires_grad_(), b[:2].clone().requires_grad_()
    assert torch.autograd.gradcheck(upsample2x_conv3x3, (xg, wg, bg))


def test_discriminator_in_channels_last_gives_the_same_logits_and_magp_gradients():
    """Values, first gradients and the double backward of a MAGP-style penalty agree across layouts."""
    torch.manual_seed(0)
    fast = Discriminator(width=16, grid=7, embed_dim=8, n_taps=3, out_ch=12, hidden=6)
    with torch.no_grad():
        for name, p in fast.named_parameters():
            if name.endswith(("gamma", "beta")):
                p.fill_(0.5)  # the gates start at 0: open them so every conv matters
    plain = copy.deepcopy(fast)
    plain.channels_last = False
    assert fast.channels_last
    taps, sent = torch.randn(2, 3, 16, 7, 7, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    grads = []
    for d in (plain, fast):
        logits = d(taps, sent)
        g_taps, g_sent = torch.autograd.grad(logits.sum(), (taps, sent), create_graph=True)
        penalty = (g_taps.pow(2).sum() + g_sent.pow(2).sum()).sqrt()
        grads.append([logits, g_taps, *torch.autograd.grad(penalty, list(d.parameters()))])
    assert fast.features(taps).is_contiguous(memory_format=torch.channels_last)
    assert plain.features(taps).is_contiguous()
    names = ["logits", "grad taps", *(n for n, _ in plain.named_parameters())]
    for name, want, got in zip(names, *grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def _generator_pair(clip):
    torch.manual_seed(0)
    plain = Generator(clip, **SMALL_G, execution="official")
    _randomise_affines(plain, std=0.1)
    fast = set_execution(copy.deepcopy(plain), "fast")
    return plain, fast.to(memory_format=torch.channels_last)


def test_optimised_generator_gives_the_plain_generators_image_and_gradients(tiny_clip):
    plain, fast = _generator_pair(tiny_clip)
    assert all(m.fused for m in fast.modules() if isinstance(m, DFBlock))
    assert not any(m.fused for m in plain.modules() if isinstance(m, DFBlock))
    assert all(m.folded for m in fast.modules() if isinstance(m, GBlock))
    assert not any(m.folded for m in plain.modules() if isinstance(m, GBlock))
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


def test_rgb_conv_in_channels_last_returns_the_image_in_the_callers_layout(tiny_clip, monkeypatch):
    plain, fast = _generator_pair(tiny_clip)
    fast = fast.to(memory_format=torch.contiguous_format)  # NCHW maps, only the RGB conv goes channels_last
    seen = []
    monkeypatch.setattr(
        fast.decoder.to_rgb,
        "forward",
        lambda x: (
            seen.append(x) or F.conv2d(x, fast.decoder.to_rgb.weight, fast.decoder.to_rgb.bias, padding=1)
        ),
    )
    z, s = torch.randn(2, plain.nz), torch.randn(2, tiny_clip.geometry.embed_dim)
    got = fast(z, s)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    assert got.is_contiguous()
    torch.testing.assert_close(got, plain(z, s), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("image_block_cl", [True, False])
def test_image_block_in_channels_last_gives_the_same_image_and_gradients(tiny_clip, image_block_cl):
    """NCHW maps until the last GBlock, which (switch on) reads a channels_last copy; the image comes back in
    NCHW and every gradient, the earlier blocks' included, is the plain generator's."""
    plain, fast = _generator_pair(tiny_clip)
    fast = set_execution(
        fast.to(memory_format=torch.contiguous_format), {"image_block_channels_last": image_block_cl}
    )
    layouts = []
    for block in fast.decoder.blocks:
        block.register_forward_pre_hook(
            lambda _, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
    torch.manual_seed(1)
    z, s = torch.randn(3, plain.nz), torch.randn(3, tiny_clip.geometry.embed_dim)
    want, got = plain(z, s), fast(z, s)
    assert layouts == [False] * (len(fast.decoder.blocks) - 1) + [image_block_cl]
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    upstream = torch.randn_like(want)
    want.backward(upstream)
    got.backward(upstream)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
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
    assert not {"execution", "batched_affines", "fused_fusion", "folded_upsample"} & set(fast.config)


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


def test_the_benchmark_step_is_the_modules_own_step(monkeypatch):
    """With module_step on, speed.py runs GALIPModule.training_step itself, not a copy of it."""
    calls = []
    original = GALIPModule.training_step

    def spy(self, batch, batch_idx):
        calls.append(batch_idx)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(GALIPModule, "training_step", spy)
    module = speed.build_module("tiny", torch.device("cpu"), speed.DEFAULT_LEVERS)
    assert isinstance(module, GALIPModule) and "training_step" not in vars(type(module))
    batch = speed.make_batch(module, 2, torch.device("cpu"))
    losses = speed.case_fn("step", module, batch, speed.DEFAULT_LEVERS)()
    assert calls == [0] and set(losses) == {"d_loss", "g_loss"}


def test_the_benchmark_step_makes_the_update_of_a_step_under_the_trainer():
    """`speed.PlainLoop` stands in for Lightning's Trainer faithfully: one benchmark step and one Trainer.fit batch
    of the same module on the same batch leave the same weights."""
    bench, bench_losses = _one_update(speed.DEFAULT_LEVERS)
    torch.manual_seed(0)  # the module, its Affines and the batch of _one_update, drawn again
    module = speed.build_module("tiny", torch.device("cpu"), speed.DEFAULT_LEVERS)
    _randomise_affines(module.generator, std=0.05)
    module.optimizer_g = module.optimizer_d = lambda params: torch.optim.SGD(params, lr=0.5)
    batch = speed.make_batch(module, 4, torch.device("cpu"))
    trainer = one_batch_trainer()
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert module.last_losses == pytest.approx(bench_losses, rel=1e-6)  # BenchModule keeps them
    for net in ("generator", "discriminator"):
        ours, lightning = getattr(bench, net).state_dict(), getattr(module, net).state_dict()
        for key, value in lightning.items():
            torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-7, msg=f"{net}.{key}")
    assert any("linear2" in k and not torch.equal(v, 0 * v) for k, v in module.generator.state_dict().items())


def test_fused_adam_makes_the_update_of_the_plain_adam():
    """The fused_adam lever (and conf/optim/ttur.yaml's fused: true) changes how Adam runs, not the update."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32, 3, 3), (64,), (1,), (7, 5)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    results = []
    for kwargs in ({"foreach": False}, {"fused": True}):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = torch.optim.Adam(params, lr=1e-3, betas=(0.0, 0.9), **kwargs)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    for plain, fused, p0 in zip(*results, start, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)
        assert not torch.equal(plain, p0)
    module = speed.build_module("tiny", torch.device("cpu"), ("fused_adam",))
    opt_g, opt_d = module.configure_optimizers()
    assert opt_g.param_groups[0]["fused"] and opt_d.param_groups[0]["fused"]
    opt_g, _ = speed.build_module("tiny", torch.device("cpu"), ()).configure_optimizers()
    assert not opt_g.param_groups[0]["fused"]  # the official computation: Adam's defaults


def test_levers_parse_and_ladder():
    assert speed.parse_levers("none") == ()
    assert speed.parse_levers("default") == speed.DEFAULT_LEVERS
    assert speed.parse_levers("default,compile") == (*speed.DEFAULT_LEVERS, "compile")
    assert sorted(speed.parse_levers("fused_fusion,default")) == sorted(speed.DEFAULT_LEVERS)  # none twice
    assert speed.parse_levers("fused_fusion, channels_last") == ("fused_fusion", "channels_last")
    with pytest.raises(ValueError, match="unknown"):
        speed.parse_levers("fused_fusion,warp_drive")
    steps = speed.ladder("step")
    assert steps[0] == () and steps[-1] == speed.LADDER and len(steps) == len(speed.LADDER) + 1
    assert all(not set(levers) & speed.STEP_ONLY for levers in speed.ladder("g"))


def _row(case, median, levers=(), official=None, user=None, sys_=None):
    row = {
        "case": case,
        "levers": list(levers),
        "batch": 8,
        "median_s": median,
        "min_s": median,
        "times_s": [median],
        "images_per_s": 8 / median,
        "cpu_s": 2 * median,
        "peak_mem_mib": 1.0,
        "mem_delta_mib": 1.0,
        "loadavg_1min": [0.0, 0.0],
    }
    if official:
        row["official_code"] = official
    if user is not None:
        row |= {"user_s": user, "sys_s": sys_}
    return row


def test_ladder_table_reports_speedup_over_the_official_row():
    def row(levers, median):
        return _row("step8", median, levers)

    table = speed.markdown_table(
        [row((), 30.0), row(("module_step",), 20.0), row(speed.DEFAULT_LEVERS, 10.0)]
    )
    lines = table.splitlines()[2:]
    assert "none (galip's reproduction" in lines[0] and "| 1.00 |" in lines[0]
    assert "+ module_step" in lines[1] and "| 1.50 |" in lines[1]
    assert "| default |" in lines[2] and "| 3.00 |" in lines[2]

    # with rows of the official code itself, those are the baseline (the median of them)
    official = [_row("step8", t, official="official code (tobran/GALIP abc)") for t in (36.0, 44.0)]
    lines = speed.markdown_table([official[0], row((), 30.0), row(speed.DEFAULT_LEVERS, 10.0), official[1]])
    lines = lines.splitlines()[2:]
    assert "official code (tobran/GALIP abc)" in lines[0] and "| 1.11 |" in lines[0]
    assert "none (galip's reproduction" in lines[1] and "| 1.33 |" in lines[1]
    assert "| default |" in lines[2] and "| 4.00 |" in lines[2]


def test_table_against_the_official_code_with_galips_memory_settings_too():
    official = "official code (tobran/GALIP abc)"
    results = [
        _row("step8", 20.0, official=official, user=28.0, sys_=9.0),
        _row("step8", 15.0, speed.MEMORY_LEVERS, official=official, user=26.0, sys_=0.5),
        _row("step8", 10.0, speed.DEFAULT_LEVERS, user=18.0, sys_=0.25),
    ]
    lines = speed.markdown_table(results).splitlines()
    assert "| × official | × official, memory kept |" in lines[0] and "CPU s (user + sys)" in lines[0]
    assert lines[1].count("|") == lines[0].count("|")
    assert official in lines[2] and "memory settings" not in lines[2] and "| 1.00 | 0.75 |" in lines[2]
    assert "| 28.0 + 9.0 |" in lines[2]
    assert (
        "galip's memory settings (hugepages, keep_freed_memory)" in lines[3] and "| 1.33 | 1.00 |" in lines[3]
    )
    assert "| default |" in lines[4] and "| 2.00 | 1.50 |" in lines[4] and "| 18.0 + 0.2 |" in lines[4]
    # without kept rows there is no such column, and a result without the split shows its CPU total
    lines = speed.markdown_table([results[0], _row("step8", 10.0, speed.DEFAULT_LEVERS)]).splitlines()
    assert "memory kept" not in lines[0] and "| 2.00 |" in lines[3] and "| 20.0 |" in lines[3]


def test_official_memory_runs_the_official_rows_as_asked(monkeypatch):
    calls = []

    def fake_subprocess(case, args, levers, official_code=None):
        calls.append((case, tuple(levers), official_code))
        return _row(case, 1.0, levers, official=official_code and "official code (tobran/GALIP abc)")

    monkeypatch.setattr(speed, "run_case_subprocess", fake_subprocess)
    speed.main(
        ["--official-code", "/tmp/GALIP", "--official-memory", "both", "--levers", "none", "--cases", "g1"]
    )
    official = str(Path("/tmp/GALIP").resolve())
    assert calls == [("g1", (), official), ("g1", speed.MEMORY_LEVERS, official), ("g1", (), None)]
    assert speed.worker_env(speed.MEMORY_LEVERS)["GALIP_KEEP_FREED_MEMORY"] == "1"
    assert speed.worker_env(())["GALIP_KEEP_FREED_MEMORY"] == "0"
    assert speed.worker_env(())["THP_MEM_ALLOC_ENABLE"] == "0"


@pytest.mark.parametrize("extra", [[], ["--official-code", "/tmp/GALIP", "--in-process"]])
def test_official_memory_needs_the_official_code_in_fresh_processes(extra, capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(["--official-memory", "kept", *extra])
    assert "--official-memory" in capsys.readouterr().err


def test_a_case_reports_user_and_system_cpu_time():
    result = speed.run_case("g1", geometry="tiny", repeats=2, warmup=0, threads=1)
    assert result["user_s"] > 0 and result["sys_s"] >= 0
    assert result["cpu_s"] == pytest.approx(result["user_s"] + result["sys_s"])


def test_the_profile_times_the_steps_after_its_warmup(monkeypatch, capsys):
    from benchmarks import profile_step

    steps = []
    run = profile_step.phased_step
    monkeypatch.setattr(profile_step, "phased_step", lambda *a: steps.append(a[-1]) or run(*a))
    monkeypatch.setattr(profile_step, "sgemm_gflops", lambda: 100.0)
    profile_step.main(["--geometry", "tiny", "--batch", "2", "--warmup", "3", "--steps", "2"])
    assert len(steps) == 5  # the FLOP-counting step, two more untimed, then the two timed ones
    assert steps[0].counter is not None and all(clock.counter is None for clock in steps[1:])
    out = capsys.readouterr().out
    assert "median of 2 step(s) after 3" in out and "| total | one D+G step |" in out


@pytest.mark.parametrize("flag", ["--warmup", "--steps"])
def test_the_profile_refuses_fewer_than_one_step(flag, capsys):
    from benchmarks import profile_step

    with pytest.raises(SystemExit):
        profile_step.main([flag, "0"])
    assert "at least 1 each" in capsys.readouterr().err


def test_several_lever_sets():
    assert speed.parse_lever_sets("none/default") == [(), speed.DEFAULT_LEVERS]
    assert speed.parse_lever_sets("default") == [speed.DEFAULT_LEVERS]


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


@pytest.mark.parametrize("env_value, kept", [(None, True), ("0", False)])
def test_import_galip_keeps_freed_memory_unless_told_otherwise(env_value, kept):
    env = {k: v for k, v in os.environ.items() if k != "GALIP_KEEP_FREED_MEMORY"}
    if env_value is not None:
        env["GALIP_KEEP_FREED_MEMORY"] = env_value
    code = "import galip; print(galip.KEEPS_FREED_MEMORY)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(kept and sys.platform.startswith("linux"))


# ---------------------------------------------------------------------------------------------
# CLIP blocks with gradients: attention projections as 2-D matmuls
# ---------------------------------------------------------------------------------------------


def _same_values_and_input_gradients(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Assert both outputs and their gradients to ``x`` agree; the upstream gradient used."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(got, x, upstream)[0],
        torch.autograd.grad(want, x, upstream)[0],
        rtol=1e-5,
        atol=1e-5,
    )
    return upstream


@pytest.mark.parametrize("gemm", [True, False], ids=["gemm", "sequence_first"])
def test_run_block_is_the_open_clip_block_in_values_and_gradients(tiny_clip, gemm):
    set_gemm_attention(gemm)  # False: the official code's [L, B, width] layout (speed.py without the lever)
    block = tiny_clip.visual.transformer.resblocks[1]
    assert _is_plain(block)
    torch.manual_seed(0)
    x = torch.randn(3, 66, tiny_clip.geometry.width, requires_grad=True)  # 64 patches + CLS + a prompt
    upstream = _same_values_and_input_gradients(run_block(block, x), block(x), x)
    # the block's own weights get the same gradient too (the CLIP is frozen in GALIP, not in this function)
    weight = block.attn.in_proj_weight
    weight.requires_grad_(True)
    try:
        g_want = torch.autograd.grad(block(x).mul(upstream).sum(), weight)[0]
        g_got = torch.autograd.grad(run_block(block, x).mul(upstream).sum(), weight)[0]
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)
    finally:
        weight.requires_grad_(False)


def test_run_block_falls_back_to_the_block_itself():
    calls = []

    class Other(torch.nn.Module):
        def forward(self, x):
            calls.append(x)
            return x * 2

    x = torch.ones(1, 2, 4)
    assert torch.equal(run_block(Other(), x), x * 2) and len(calls) == 1


def test_run_block_can_be_switched_off(tiny_clip, monkeypatch):
    block = tiny_clip.visual.transformer.resblocks[0]
    seen = []
    monkeypatch.setattr(block, "forward", lambda x: seen.append(x) or x)
    x = torch.randn(1, 65, tiny_clip.geometry.width, requires_grad=True)
    run_block(block, x)
    with torch.no_grad():  # oneDNN's projections without autograd too
        run_block(block, x)
    assert not seen  # the block's own forward is not called on the fast path
    set_onednn_linear(False)
    with torch.no_grad():  # without autograd open_clip's block (and MultiheadAttention's fused path) runs
        assert run_block(block, x) is x and seen == [x]
    seen.clear()
    set_gemm_attention(False)  # the official code's layout: the block's maths on the [L, B, width] view
    try:
        run_block(block, x)
        with torch.no_grad():
            run_block(block, x)
        assert not seen
    finally:
        set_gemm_attention(True)


@pytest.fixture
def onednn_calls(monkeypatch):
    """The rows each oneDNN GEMM of `frozen_linear` ran."""
    calls = []
    original = blocks._onednn_linear

    def spy(x, weight, bias):
        calls.append(x.shape)
        return original(x, weight, bias)

    monkeypatch.setattr(blocks, "_onednn_linear", spy)
    return calls


def test_frozen_linear_is_f_linear_in_values_gradients_and_double_backward(onednn_calls):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    weight, bias = torch.randn(24, 16), torch.randn(24)
    upstream = torch.randn(2, 5, 24, requires_grad=True)
    results = []
    for linear in (F.linear, frozen_linear):
        y = linear(x, weight, bias)
        (dx,) = torch.autograd.grad(y, x, upstream, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.square().sum(), upstream)  # through the input gradient's own graph
        results.append((y, dx, ddx))
    # forward, the input gradient, and the double backward through the input gradient: all oneDNN's
    assert [tuple(shape) for shape in onednn_calls] == [(2, 5, 16), (2, 5, 24), (2, 5, 16)]
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_frozen_linear_is_f_linear_where_onednn_does_not_apply(onednn_calls):
    x, weight = torch.randn(3, 8), torch.randn(4, 8)
    torch.testing.assert_close(
        frozen_linear(x.double(), weight.double(), None), F.linear(x.double(), weight.double())
    )
    trained = weight.clone().requires_grad_(True)  # a weight that takes a gradient: autograd's own linear
    (grad,) = torch.autograd.grad(frozen_linear(x, trained, None).sum(), trained)
    assert torch.equal(grad, torch.ones(4, 3) @ x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert frozen_linear(x, weight, None).dtype == torch.bfloat16  # autocast's bf16 GEMM, as F.linear
    set_onednn_linear(False)
    frozen_linear(x, weight, None)
    assert onednn_calls == []


def test_frozen_linear_under_torch_compile_is_f_linear(onednn_calls):
    """Inductor lowers oneDNN's linear only for packed constant weights (speed.py's ``compile`` lever failed)."""
    x, weight, bias = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
    compiled = torch.compile(lambda x: frozen_linear(x, weight, bias), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), F.linear(x, weight, bias))
    assert onednn_calls == []


def _conv_tokens(conv: torch.nn.Conv2d, pixels: torch.Tensor) -> torch.Tensor:
    return conv(pixels).flatten(2).transpose(1, 2)


def test_patch_tokens_are_the_patch_convs_tokens_in_values_and_gradients(tiny_clip, onednn_calls):
    conv = tiny_clip.model.visual.conv1  # 8×8 patches, stride 8, frozen
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64, requires_grad=True)
    upstream = torch.randn(3, 64, tiny_clip.geometry.width)
    want = _conv_tokens(conv, pixels)
    got = patch_tokens(conv, pixels)
    assert [tuple(shape) for shape in onednn_calls] == [(3, 64, 3 * 8 * 8)]  # one GEMM on the patches
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(y, pixels, upstream)[0] for y in (got, want)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    channels_last = pixels.detach().to(memory_format=torch.channels_last)
    torch.testing.assert_close(patch_tokens(conv, channels_last), want, rtol=1e-5, atol=1e-5)


def test_a_trained_patch_conv_gets_the_convs_weight_gradient():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, 4, 4, bias=True)
    pixels = torch.randn(2, 3, 12, 8)
    grads = [
        torch.autograd.grad(f(conv, pixels).square().sum(), conv.parameters())
        for f in (patch_tokens, _conv_tokens)
    ]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "conv, size",
    [
        (torch.nn.Conv2d(3, 16, 4, 4), 14),  # patches that do not tile the image: the conv drops the rest
        (torch.nn.Conv2d(3, 16, 4, 2), 12),  # overlapping patches
        (torch.nn.Conv2d(3, 16, 4, 4, padding=1), 14),
    ],
    ids=["remainder", "overlap", "padded"],
)
def test_patch_tokens_run_any_other_conv_as_it_is(conv, size, onednn_calls):
    conv.requires_grad_(False)
    pixels = torch.randn(2, 3, size, size)
    assert torch.equal(patch_tokens(conv, pixels), _conv_tokens(conv, pixels))
    assert onednn_calls == []


def test_patch_tokens_switched_off_run_the_conv(tiny_clip, onednn_calls):
    conv = tiny_clip.model.visual.conv1
    pixels = torch.randn(2, 3, 64, 64)
    set_patch_gemm(False)
    assert torch.equal(patch_tokens(conv, pixels), _conv_tokens(conv, pixels))
    assert onednn_calls == []


@pytest.mark.parametrize("gemm", [True, False], ids=["gemm", "sequence_first"])
def test_a_causal_block_is_the_text_towers_block_with_its_mask(tiny_clip, gemm):
    set_gemm_attention(gemm)
    block = tiny_clip.model.transformer.resblocks[0]
    torch.manual_seed(0)
    x = torch.randn(3, 9, tiny_clip.geometry.width, requires_grad=True)
    mask = tiny_clip.model.attn_mask[:9, :9]
    want = block(x, attn_mask=mask)
    _same_values_and_input_gradients(run_block(block, x, causal=True), want, x)
    with torch.no_grad():
        torch.testing.assert_close(run_block(block, x, causal=True), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run_block(block, x), want, atol=1e-3)  # the mask matters


def _tokens_read(model, tokens) -> tuple[torch.Tensor, int]:
    """Sentence vectors, and how many tokens the tower's last LayerNorm saw per caption."""
    seen = []
    handle = model.ln_final.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    try:
        return sentence_vectors(model, tokens), seen[0]
    finally:
        handle.remove()


def test_the_text_tower_reads_the_captions_tokens_only_and_gives_open_clips_vectors(tiny_clip):
    model = tiny_clip.model
    tokens = tiny_clip.tokenize(
        ["a cat", "a small bird with a red head and a short pointed beak", "a dog on grass"]
    )
    assert _causal_argmax_tower(model)
    want = model.encode_text(tokens)
    got, length = _tokens_read(model, tokens)
    assert length == int(tokens.argmax(-1).max()) + 1 == 14  # the longest caption and its end token, not 77
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny_clip.encode_text(tokens), want, rtol=1e-5, atol=1e-5)
    set_text_prefix(False)  # the official code's pass: all 77
    assert _tokens_read(model, tokens)[1] == 77


def test_a_text_tower_pooled_otherwise_reads_the_whole_context(tiny_clip):
    model = copy.deepcopy(tiny_clip.model)
    tokens = tiny_clip.tokenize(["a cat"])
    model.text_pool_type = "last"  # the last position's feature depends on every token: nothing may be cut
    assert not _causal_argmax_tower(model)
    got, length = _tokens_read(model, tokens)
    assert length == 77 and torch.equal(got, model.encode_text(tokens))
    model.text_pool_type = "argmax"
    model.attn_mask = torch.zeros_like(model.attn_mask)  # attention that looks ahead: the padding matters
    assert not _causal_argmax_tower(model)


def test_every_block_of_the_papers_clip_takes_the_fast_path(vitb32_clip, tiny_clip, recwarn):
    """The fast attention path computes open_clip's block layout itself: an open_clip whose blocks differ
    must fail here (and FrozenCLIP warns at load time), not fall back silently in every run."""
    for clip in (vitb32_clip, tiny_clip):
        assert all(_is_plain(block) for block in clip.visual.transformer.resblocks)
    assert not [w for w in recwarn if "fast attention path" in str(w.message)]


def test_a_clip_off_the_fast_path_is_announced(tiny_clip):
    import copy

    from galip.clip import FrozenCLIP

    model = copy.deepcopy(tiny_clip.model)
    model.visual.transformer.resblocks[2].ln_1_kv = torch.nn.Identity()  # a cross-attention block: not plain
    with pytest.warns(UserWarning, match=r"CLIP blocks \[2\] .* without galip's fast attention path"):
        FrozenCLIP(model)


@pytest.mark.gpu
def test_one_training_step_on_cuda_in_bf16_is_finite(tiny_clip):
    """The same step on a GPU under bf16 autocast: finite losses and the fp32 MAGP (runs where CUDA is)."""
    module = speed.build_module("tiny", torch.device("cuda"), speed.DEFAULT_LEVERS)
    batch = speed.make_batch(module, 4, torch.device("cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = speed.case_fn("step", module, batch, speed.DEFAULT_LEVERS)()
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in losses.values())
