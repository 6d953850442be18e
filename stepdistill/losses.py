"""Shared pure loss functions. Each takes tensors and returns a tensor; method files compose them."""

from __future__ import annotations

import torch


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising score matching loss (Ho et al. 2020, eq. 14; Vincent 2011): mean over all elements of
    w * (pred - target)^2, with an optional per-sample weight w of shape (B,)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    err = (pred.float() - target.float()) ** 2
    if weight is None:
        return err.mean()
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    return (weight.to(per_sample) * per_sample).mean()


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """Distribution-matching gradient of DMD / DMD2 (Yin et al. 2024, eq. 2 with DMD2's normaliser):
    g = (x0_fake - x0_real) / mean_{C,H,W} |x - x0_real|, per sample, in float64, non-finite values zeroed.
    Everything here is a constant for the generator (callers pass detached predictions)."""
    x64, real, fake = x.detach().double(), x0_real.detach().double(), x0_fake.detach().double()
    dims = tuple(range(1, x.ndim))
    norm = (x64 - real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((fake - real) / norm)


def distribution_matching_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 * mean((x - sg(x - g))^2): a surrogate whose gradient w.r.t. x is g / numel (DMD2, sd_guidance)."""
    target = (x.detach().double() - grad.double()).to(torch.float32)
    return 0.5 * torch.nn.functional.mse_loss(x.float(), target)


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(G(z))) (Goodfellow et al. 2014; DMD2 gen_cls_loss)."""
    return torch.nn.functional.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """softplus(D(fake)) + softplus(-D(real)) (Goodfellow et al. 2014; DMD2 guidance_cls_loss)."""
    return (
        torch.nn.functional.softplus(logits_fake.float()).mean()
        + torch.nn.functional.softplus(-logits_real.float()).mean()
    )
