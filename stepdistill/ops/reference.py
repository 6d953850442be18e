"""Pure-torch references of the fused ops: the library's own math, called on per-sample coefficients.

Each function here is what the matching Triton kernel must reproduce, and what ``backend="torch"`` runs. They
call :mod:`stepdistill.guidance`, :mod:`stepdistill.schedules`, :mod:`stepdistill.sampling` and
:mod:`stepdistill.losses` rather than restating the formulas: a schedule whose "time" is the pair
(alpha, sigma) itself (:class:`CoefficientSchedule`) lets ``to_x0_eps``, ``ddim_step`` and
``consistency_step`` run on coefficients that were computed elsewhere (once per step, on the device).

Precision: the sampling references compute in float32 (float64 for float64 inputs) and return the input dtype,
like the kernels. The distribution-matching references compute in float64, as ``losses.dmd_gradient`` and
``losses.vsd_gradient`` do, and return the input dtype with ``nan_to_num`` applied in that dtype. The
pseudo-Huber reference (losses.pseudo_huber_distance) computes in float32 and returns float32 per-sample losses.
"""

from __future__ import annotations

import torch

from .. import losses
from ..guidance import CFG_UNCOND, cfg_combine
from ..sampling import consistency_step, ddim_step
from ..schedules import FlowSchedule, NoiseSchedule

__all__ = [
    "CoefficientSchedule",
    "ddim_step_ref",
    "consistency_step_ref",
    "dmd_gradient_ref",
    "vsd_gradient_ref",
    "pseudo_huber_distance_ref",
]

#: prediction types the fused ops read (the raw EDM output needs c_skip / c_out: see fused_consistency_step)
FUSED_PREDICTION_TYPES = ("eps", "x0", "v", "flow", "score")


class CoefficientSchedule(NoiseSchedule):
    """A schedule whose time argument is the pair ``(alpha, sigma)``: alpha(t) = t[0], sigma(t) = t[1].

    ``flow`` predictions are read as FlowSchedule reads them, with t = sigma (so alpha must be 1 - sigma)."""

    kind = "coefficients"
    supports = FUSED_PREDICTION_TYPES

    def alpha(self, t):
        return torch.as_tensor(t[0])

    def sigma(self, t):
        return torch.as_tensor(t[1])

    def _to_x0_eps_special(self, pred, x_t, t, src):  # src == "flow"
        return FlowSchedule._to_x0_eps_special(self, pred, x_t, self.sigma(t), src)


COEFS = CoefficientSchedule()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _guided(cond, uncond, w, convention, dtype):
    cond = cond.to(dtype)
    if uncond is None:
        return cond
    return cfg_combine(cond, uncond.to(dtype), w, convention)


def ddim_step_ref(
    x: torch.Tensor,
    model_out: torch.Tensor,
    alpha,
    sigma,
    alpha_prev=None,
    sigma_prev=None,
    *,
    pred_type: str = "eps",
    model_out_uncond: torch.Tensor | None = None,
    guidance_scale=None,
    convention: str = CFG_UNCOND,
) -> torch.Tensor:
    """CFG combine, conversion to (x0, eps) at (alpha, sigma), deterministic DDIM / Euler step to
    (alpha_prev, sigma_prev); lands on x0 when both are None (sampling.ddim_step with t_prev=None)."""
    dt = _compute_dtype(x)
    xc = x.to(dt)
    pred = _guided(model_out, model_out_uncond, guidance_scale, convention, dt)
    x0, eps = COEFS.to_x0_eps(pred, xc, (alpha, sigma), pred_type)
    t_prev = None if alpha_prev is None else (alpha_prev, sigma_prev)
    return ddim_step(COEFS, x0, eps, (alpha, sigma), t_prev).to(x.dtype)


def consistency_step_ref(
    x: torch.Tensor,
    model_out: torch.Tensor,
    c_skip,
    c_out,
    *,
    alpha_next=None,
    sigma_next=None,
    noise: torch.Tensor | None = None,
    pred_type: str = "x0",
    alpha=None,
    sigma=None,
) -> torch.Tensor:
    """f = c_skip x + c_out x0 (x0 = model_out, or converted from ``pred_type`` at (alpha, sigma)), then
    re-noised to (alpha_next, sigma_next) with ``noise`` (sampling.consistency_step)."""
    dt = _compute_dtype(x)
    xc, pred = x.to(dt), model_out.to(dt)
    x0 = pred if pred_type == "x0" else COEFS.to_x0_eps(pred, xc, (alpha, sigma), pred_type)[0]
    t_next = None if alpha_next is None else (alpha_next, sigma_next)
    z = None if noise is None else noise.to(dt)
    return consistency_step(COEFS, xc, x0, c_skip, c_out, t_next, z).to(x.dtype)


def dmd_gradient_ref(
    x: torch.Tensor,
    x_t: torch.Tensor,
    real_out: torch.Tensor,
    fake_out: torch.Tensor,
    alpha,
    sigma,
    *,
    real_out_uncond: torch.Tensor | None = None,
    guidance_scale=None,
    convention: str = CFG_UNCOND,
    real_pred_type: str = "eps",
    fake_pred_type: str | None = None,
) -> torch.Tensor:
    """losses.dmd_gradient on x0_real (guided teacher) and x0_fake, both converted at (x_t; alpha, sigma), in
    float64; returned in x's dtype."""
    dt = torch.float64
    xt = x_t.to(dt)
    t = (torch.as_tensor(alpha).to(dt), torch.as_tensor(sigma).to(dt))
    real = _guided(real_out, real_out_uncond, guidance_scale, convention, dt)
    x0_real = COEFS.to_x0_eps(real, xt, t, real_pred_type)[0]
    x0_fake = COEFS.to_x0_eps(fake_out.to(dt), xt, t, fake_pred_type or real_pred_type)[0]
    return torch.nan_to_num(losses.dmd_gradient(x, x0_real, x0_fake).to(x.dtype))


def vsd_gradient_ref(
    x_t: torch.Tensor,
    real_out: torch.Tensor,
    fake_out: torch.Tensor,
    alpha,
    sigma,
    *,
    real_out_uncond: torch.Tensor | None = None,
    fake_out_uncond: torch.Tensor | None = None,
    guidance_scale=None,
    convention: str = CFG_UNCOND,
    real_pred_type: str = "eps",
    fake_pred_type: str | None = None,
) -> torch.Tensor:
    """losses.vsd_gradient = sigma^2 (eps_real - eps_fake) on both outputs converted to eps (each guided when
    its unconditional output is given), in float64; returned in x_t's dtype."""
    dt = torch.float64
    xt = x_t.to(dt)
    t = (torch.as_tensor(alpha).to(dt), torch.as_tensor(sigma).to(dt))
    real = _guided(real_out, real_out_uncond, guidance_scale, convention, dt)
    fake = _guided(fake_out, fake_out_uncond, guidance_scale, convention, dt)
    eps_real = COEFS.to_x0_eps(real, xt, t, real_pred_type)[1]
    eps_fake = COEFS.to_x0_eps(fake, xt, t, fake_pred_type or real_pred_type)[1]
    sig = torch.as_tensor(sigma, device=x_t.device, dtype=dt).expand(x_t.shape[0])
    return torch.nan_to_num(losses.vsd_gradient(eps_real, eps_fake, sig).to(x_t.dtype))


def pseudo_huber_distance_ref(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """losses.pseudo_huber_distance: sqrt(||pred - target||^2 + c^2) - c per sample (iCT, Song & Dhariwal 2023),
    computed in float32, shape (B,)."""
    return losses.pseudo_huber_distance(pred, target, c)
