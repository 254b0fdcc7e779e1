"""GALIP's losses against hand-computed numbers and a direct autograd computation of MAGP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from galip import losses
from galip.models import Discriminator

# ---------------------------------------------------------------------------------------------
# Hinge terms and totals
# ---------------------------------------------------------------------------------------------


def test_hinge_real_hand_computed():
    # relu(1 - x) = [0, 0.5, 2.5]
    assert losses.hinge_real(torch.tensor([2.0, 0.5, -1.5])).item() == pytest.approx((0 + 0.5 + 2.5) / 3)


def test_hinge_fake_hand_computed():
    # relu(1 + x) = [0, 1, 2.5]
    assert losses.hinge_fake(torch.tensor([-2.0, 0.0, 1.5])).item() == pytest.approx((0 + 1 + 2.5) / 3)


def test_generator_adversarial_is_minus_mean():
    assert losses.generator_adversarial(torch.tensor([1.0, 2.0, 6.0])).item() == pytest.approx(-3.0)


def test_discriminator_loss_weighting():
    real = torch.tensor([2.0, 0.5, -1.5])  # hinge_real = 1.0
    fake = torch.tensor([-2.0, 0.0, 1.0])  # hinge_fake = (0 + 1 + 2) / 3 = 1.0
    mis = torch.tensor([-0.5, -3.0, 0.5])  # hinge_fake = (0.5 + 0 + 1.5) / 3 = 2/3
    penalty = torch.tensor(0.25)
    terms = losses.discriminator_loss(real, fake, mis, penalty)
    assert terms["real"].item() == pytest.approx(1.0)
    assert terms["fake"].item() == pytest.approx(1.0)
    assert terms["mismatch"].item() == pytest.approx(2 / 3)
    assert terms["magp"].item() == pytest.approx(0.25)
    assert terms["loss"].item() == pytest.approx(1.0 + 0.5 * (1.0 + 2 / 3) + 0.25)


def test_generator_loss_is_adv_minus_lambda_sim():
    fake = torch.tensor([1.0, 2.0, 3.0])  # adv = -2
    sim = torch.tensor(0.5)
    terms = losses.generator_loss(fake, sim)
    assert terms["adv"].item() == pytest.approx(-2.0)
    assert terms["sim"].item() == pytest.approx(0.5)
    assert terms["loss"].item() == pytest.approx(-2.0 - 4.0 * 0.5)  # default λ = 4 (paper)
    assert losses.generator_loss(fake, sim, sim_weight=1.5)["loss"].item() == pytest.approx(-2.0 - 1.5 * 0.5)


def test_clip_similarity_against_manual_cosine():
    a = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    # cosines: 1 and 1/sqrt(2)
    assert losses.clip_similarity(a, b).item() == pytest.approx((1 + 2**-0.5) / 2)
    x, y = torch.randn(5, 16), torch.randn(5, 16)
    manual = ((x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))).mean()
    torch.testing.assert_close(losses.clip_similarity(x, y), manual)


def test_clip_similarity_is_fp32_and_scale_invariant():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    sim = losses.clip_similarity(x.half(), y.bfloat16())
    assert sim.dtype == torch.float32
    torch.testing.assert_close(losses.clip_similarity(3 * x, y), losses.clip_similarity(x, y))


def test_mismatch_is_roll_by_one_and_detached():
    s = torch.arange(12, dtype=torch.float32).view(4, 3).requires_grad_(True)
    m = losses.mismatch(s)
    # official: cat(s[1:], s[:1]) -> ŝ_i = s_{i+1}
    torch.testing.assert_close(m, torch.cat([s[1:], s[:1]]).detach())
    assert not m.requires_grad


# ---------------------------------------------------------------------------------------------
# MAGP
# ---------------------------------------------------------------------------------------------


def small_d() -> Discriminator:
    torch.manual_seed(0)
    d = Discriminator(width=8, grid=4, embed_dim=6, n_taps=2, out_ch=12, hidden=4)
    with torch.no_grad():  # open the gates so every input path matters
        for block in d.extractor.blocks:
            block.gamma.fill_(0.7)
            block.beta.fill_(0.3)
        d.extractor.main.gamma.fill_(0.5)
    return d


def inputs(batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, 2, 8, 4, 4, generator=gen).requires_grad_(True)
    sent = torch.randn(batch, 6, generator=gen).requires_grad_(True)
    return feats, sent


def direct_magp(d, feats, sent, k: float = 2.0, p: float = 6.0) -> torch.Tensor:
    """Written out independently: per-sample norm of the concatenated input gradients of ΣD."""
    logits = d(feats, sent)
    g_feats, g_sent = torch.autograd.grad(logits.sum(), (feats, sent), create_graph=True)
    per_sample = torch.cat([g_feats.reshape(len(feats), -1), g_sent.reshape(len(sent), -1)], dim=1)
    norms = per_sample.pow(2).sum(dim=1).sqrt()
    return k * norms.pow(p).mean()


def test_magp_linear_critic_hand_computed():
    """D(f, s) = <w, f> + <u, s>: every per-sample gradient is (w, u), so MAGP = k·(|w|² + |u|²)^(p/2)."""
    w, u = torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([0.5, -0.5])
    f = torch.randn(3, 4, requires_grad=True)
    s = torch.randn(3, 2, requires_grad=True)
    logits = f @ w + s @ u
    norm_sq = (1 + 4 + 0 + 1) + (0.25 + 0.25)  # 6.5
    assert losses.magp(logits, (f, s), k=2.0, p=6.0).item() == pytest.approx(2.0 * norm_sq**3, rel=1e-5)
    assert losses.magp(f @ w + s @ u, (f, s), k=1.0, p=2.0).item() == pytest.approx(norm_sq, rel=1e-5)


def test_magp_equals_direct_autograd():
    d = small_d()
    feats, sent = inputs()
    got = losses.magp(d(feats, sent), (feats, sent), k=2.0, p=6.0)
    ref = direct_magp(d, feats, sent)
    assert ref.item() > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("k", "p"), [(1.0, 2.0), (0.5, 3.0)])
def test_magp_k_and_p(k, p):
    d = small_d()
    feats, sent = inputs(seed=2)
    got = losses.magp(d(feats, sent), (feats, sent), k=k, p=p)
    torch.testing.assert_close(got, direct_magp(d, feats, sent, k=k, p=p), rtol=1e-5, atol=0)


def test_magp_depends_on_both_inputs():
    """Dropping the sentence gradient from the norm changes the value: both inputs are in the concatenation."""
    d = small_d()
    feats, sent = inputs()
    logits = d(feats, sent)
    (g_feats,) = torch.autograd.grad(logits.sum(), (feats,), retain_graph=True)
    feats_only = 2.0 * g_feats.flatten(1).norm(dim=1).pow(6).mean()
    both = losses.magp(logits, (feats, sent))
    assert both.item() > feats_only.item()


@pytest.mark.parametrize("scale", [1024.0, 65536.0])
def test_magp_with_grad_scale_gives_same_value(scale):
    d = small_d()
    feats, sent = inputs()
    plain = losses.magp(d(feats, sent), (feats, sent))
    scaled = losses.magp(d(feats, sent), (feats, sent), grad_scale=scale)
    torch.testing.assert_close(scaled, plain, rtol=1e-5, atol=0)


def test_magp_is_differentiable_wrt_discriminator():
    d = small_d()
    feats, sent = inputs()
    penalty = losses.magp(d(feats, sent), (feats, sent))
    assert penalty.requires_grad
    penalty.backward()
    grads = {n: p.grad for n, p in d.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["assessor.joint_conv.0.weight"].abs().sum() > 0
    assert grads["extractor.main.conv_s.weight"].abs().sum() > 0


def test_magp_gradient_matches_direct_double_backward():
    d = small_d()
    feats, sent = inputs()
    losses.magp(d(feats, sent), (feats, sent)).backward()
    got = {n: p.grad.clone() for n, p in d.named_parameters()}
    d.zero_grad(set_to_none=True)
    feats2, sent2 = inputs()
    direct_magp(d, feats2, sent2).backward()
    for n, p in d.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-8, msg=n)


def test_magp_needs_inputs_that_require_grad():
    d = small_d()
    feats, sent = inputs()
    logits = d(feats.detach(), sent.detach())
    with pytest.raises(RuntimeError):
        losses.magp(logits, (feats.detach(), sent.detach()))


def test_hinge_losses_are_non_negative_and_zero_beyond_margin():
    assert losses.hinge_real(torch.tensor([1.0, 5.0])).item() == 0
    assert losses.hinge_fake(torch.tensor([-1.0, -5.0])).item() == 0
    x = torch.randn(100)
    assert losses.hinge_real(x) >= 0 and losses.hinge_fake(x) >= 0
    torch.testing.assert_close(losses.hinge_real(x), F.relu(1 - x).mean())
