"""GALIP's losses as pure functions on tensors (paper eq. 1–2; docs/official_code.md#losses).

D:  L_D = E[relu(1 - D(x, s))] + ½ E[relu(1 + D(G(z, s), s))] + ½ E[relu(1 + D(x, ŝ))] + MAGP
G:  L_G = -E[D(G(z, s), s)] - λ · E[cos(CLIP_img(G(z, s)), s)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def hinge_real(logits: torch.Tensor) -> torch.Tensor:
    """Matching real pairs should score above +1."""
    return F.relu(1.0 - logits).mean()


def hinge_fake(logits: torch.Tensor) -> torch.Tensor:
    """Fake or mismatched pairs should score below -1."""
    return F.relu(1.0 + logits).mean()


def generator_adversarial(logits: torch.Tensor) -> torch.Tensor:
    return -logits.mean()


def clip_similarity(image_emb: torch.Tensor, sent_emb: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between CLIP image embeddings and sentence vectors (computed in fp32)."""
    return F.cosine_similarity(image_emb.float(), sent_emb.float(), dim=1).mean()


def mismatch(sent_emb: torch.Tensor) -> torch.Tensor:
    """Mismatched sentence vectors: the batch rolled by one (ŝ_i = s_{i+1}), detached."""
    return torch.roll(sent_emb, shifts=-1, dims=0).detach()


def magp(
    logits: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    k: float = 2.0,
    p: float = 6.0,
    grad_scale: float | None = None,
) -> torch.Tensor:
    """Matching-aware gradient penalty: k · E_i[ ‖(∂ΣD/∂feats_i, ∂ΣD/∂s_i)‖₂^p ].

    ``inputs`` are the tensors D was evaluated at (the CLIP tap features and the sentence vector of the real,
    matching pairs); they must require grad. The penalty is differentiable (create_graph) so D is trained on
    it. Under fp16 autocast pass the loss scale as ``grad_scale``: the gradients are taken of the scaled
    logits (so they do not underflow) and unscaled in fp32 before the norm.
    """
    scale = 1.0 if grad_scale is None else float(grad_scale)
    grads = torch.autograd.grad(
        outputs=logits.sum() * scale, inputs=list(inputs), create_graph=True, only_inputs=True
    )
    flat = torch.cat([g.float().flatten(1) for g in grads], dim=1) / scale
    return k * flat.norm(2, dim=1).pow(p).mean()


def discriminator_loss(
    real: torch.Tensor, fake: torch.Tensor, mismatched: torch.Tensor, penalty: torch.Tensor
) -> dict[str, torch.Tensor]:
    """All D terms and their weighted total (``loss``)."""
    terms = {
        "real": hinge_real(real),
        "fake": hinge_fake(fake),
        "mismatch": hinge_fake(mismatched),
        "magp": penalty,
    }
    terms["loss"] = terms["real"] + 0.5 * (terms["fake"] + terms["mismatch"]) + penalty
    return terms


def generator_loss(
    fake: torch.Tensor, similarity: torch.Tensor, sim_weight: float = 4.0
) -> dict[str, torch.Tensor]:
    """All G terms and their weighted total (``loss``)."""
    adv = generator_adversarial(fake)
    return {"adv": adv, "sim": similarity, "loss": adv - sim_weight * similarity}
