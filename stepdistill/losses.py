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


def _per_sample(fn_values: torch.Tensor) -> torch.Tensor:
    return fn_values.reshape(fn_values.shape[0], -1).sum(dim=1)


def score_normaliser(x: torch.Tensor, x0_real: torch.Tensor, min_value: float = 1e-5) -> torch.Tensor:
    """sg(mean_{C,H,W} |x - x0_real|) clipped below (SiD / SIM / DMD2 normaliser), shape (B, 1, ...)."""
    dims = tuple(range(1, x.ndim))
    return (x - x0_real).detach().abs().mean(dim=dims, keepdim=True).clamp_min(min_value)


def sid_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, alpha: float = 1.2) -> torch.Tensor:
    """Score identity distillation generator loss (Zhou et al. 2024, SiD eq. 22 as in mingyuanzhou/SiD):
    mean over samples of sum((D_r - D_f) * ((D_r - x) - alpha (D_r - D_f))) / sg(mean|x - D_r|).
    Gradients flow through x, D_r and D_f (the frozen networks are differentiated w.r.t. their input)."""
    wf = score_normaliser(x, x0_real)
    diff = x0_real - x0_fake
    return (_per_sample(diff * ((x0_real - x) - alpha * diff) / wf)).mean()


def sim_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """Score implicit matching generator loss (Luo et al. 2024, eq. 3.5) with the pseudo-Huber distance
    d(y) = sqrt(||y||^2 + c^2) - c, written in x0 units: y = D_f - D_r, d'(y) = y / sqrt(||y||^2 + c^2),
    L = mean over samples of -d'(y) . (D_f - x) / sg(mean|x - D_r|). With d = ||.||^2 it is SiD at alpha = 1;
    as c grows, d'(y) -> y / c: the L2 direction. Gradients flow through x, D_r and D_f."""
    if c <= 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
    wf = score_normaliser(x, x0_real)
    y = x0_fake - x0_real
    norm = (_per_sample(y * y) + c * c).sqrt().reshape(-1, *([1] * (x.ndim - 1)))
    return (_per_sample(-(y / norm) * (x0_fake - x) / wf)).mean()


def vsd_gradient(eps_real: torch.Tensor, eps_fake: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Variational score distillation gradient as SwiftBrush uses it (Nguyen & Tran 2024; Wang et al. 2023):
    g = w(t) (eps_teacher - eps_fake) with w(t) = 1 - alpha_bar_t = sigma(t)^2, non-finite values zeroed;
    apply with :func:`distribution_matching_loss`. ``sigma`` is per sample (B,)."""
    w = (sigma.double() ** 2).reshape(-1, *([1] * (eps_real.ndim - 1)))
    return torch.nan_to_num(w * (eps_real.double() - eps_fake.double()))


def pseudo_huber_distance(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber distance per sample (Song & Dhariwal 2023, iCT eq. 9): sqrt(||a - b||^2 + c^2) - c over all
    non-batch dims, shape (B,); c = 0 gives the L2 norm ||a - b||. iCT uses c = 0.00054 sqrt(d)."""
    if c < 0:
        raise ValueError(f"pseudo-Huber c must be >= 0, got {c}")
    if a.shape != b.shape:
        raise ValueError(f"pseudo-Huber inputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    sq = ((a.float() - b.float()) ** 2).reshape(a.shape[0], -1).sum(dim=1)
    return (sq + c * c).sqrt() - c


CONSISTENCY_METRICS = ("l2", "huber", "pseudo_huber")


def ict_huber_c(dim: int) -> float:
    """iCT's pseudo-Huber constant c = 0.00054 sqrt(d), d = C x H x W (Song & Dhariwal 2023, Sec. 3.3)."""
    return 0.00054 * dim**0.5


def consistency_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    metric: str = "l2",
    c: float = 0.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Consistency distance d(f_theta, sg f_target), weighted per sample and averaged over the batch.

    * ``"l2"``: mean over elements of (pred - target)^2 (LCM's ``l2``: ``F.mse_loss``; CD with lambda = 1);
    * ``"huber"``: mean over elements of sqrt((pred - target)^2 + c^2) - c (LCM's ``huber``, c = 0.001);
    * ``"pseudo_huber"``: sqrt(||pred - target||^2 + c^2) - c per sample (iCT, Song & Dhariwal 2023 eq. 9;
      ECT divides it by t - r with c = 0, i.e. the L2 norm).

    ``weight`` (B,) is lambda per sample (iCT 1 / (sigma_{i+1} - sigma_i), ECT 1 / (t - r))."""
    if metric not in CONSISTENCY_METRICS:
        raise ValueError(f"unknown consistency metric {metric!r}; expected one of {CONSISTENCY_METRICS}")
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if c < 0:
        raise ValueError(f"Huber c must be >= 0, got {c}")
    diff = (pred.float() - target.float()).reshape(pred.shape[0], -1)
    if metric == "l2":
        per_sample = (diff**2).mean(dim=1)
    elif metric == "huber":
        per_sample = ((diff**2 + c * c).sqrt() - c).mean(dim=1)
    else:
        per_sample = ((diff**2).sum(dim=1) + c * c).sqrt() - c
    if weight is None:
        return per_sample.mean()
    return (weight.to(per_sample) * per_sample).mean()


def hinge_discriminator_loss(logits_real: list[torch.Tensor], logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Hinge discriminator loss averaged over heads (PCM's ``Discriminator.d_loss``; Lim & Ye 2017):
    mean_heads [mean relu(1 + D(fake)) + mean relu(1 - D(real))]."""
    if len(logits_real) != len(logits_fake) or not logits_real:
        raise ValueError(f"need the same non-zero number of heads, got {len(logits_real)} and {len(logits_fake)}")
    terms = [
        torch.relu(1 + f.float()).mean() + torch.relu(1 - r.float()).mean() for r, f in zip(logits_real, logits_fake)
    ]
    return torch.stack(terms).mean()


def hinge_generator_loss(logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """The generator's term against a hinge discriminator, averaged over heads (PCM's ``Discriminator.g_loss``):
    mean_heads mean relu(1 - D(fake))."""
    if not logits_fake:
        raise ValueError("need at least one head")
    return torch.stack([torch.relu(1 - f.float()).mean() for f in logits_fake]).mean()
