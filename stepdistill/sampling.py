"""Readable reference samplers. Every step is written in (x0, eps) space through the schedule, so one
function serves DDIM, Euler (VP in sigma coordinates, EDM, rectified flow: all the same deterministic
update) and DDPM ancestral sampling (DDIM with eta = 1)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .schedules import NoiseSchedule, _bcast
from .trainers import randomness as rnd


def ddim_step(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t,
    t_prev,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step from t to t_prev (Song et al. 2021, eq. 12); ``t_prev=None`` lands on x0.

    x_prev = alpha' x0 + sqrt(sigma'^2 - s^2) eps + s z with the posterior std
    s = eta * (sigma'/sigma) * sqrt(sigma^2 - (alpha/alpha')^2 sigma'^2) (eta = 1: DDPM ancestral step)."""
    if t_prev is None:
        return x0
    a_p, s_p = _bcast(schedule.alpha(t_prev), x0), _bcast(schedule.sigma(t_prev), x0)
    if eta == 0.0:
        return a_p * x0 + s_p * eps
    a, s = _bcast(schedule.alpha(t), x0), _bcast(schedule.sigma(t), x0)
    var = (s_p / s) ** 2 * (s**2 - (a / a_p) ** 2 * s_p**2)
    std = eta * var.clamp_min(1e-20).sqrt()
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise")
    return a_p * x0 + (s_p**2 - std**2).clamp_min(0).sqrt() * eps + std * noise


def lcm_scalings(schedule: NoiseSchedule, t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM boundary conditions for discrete VP teachers (Luo et al. 2023): with s = timestep_scaling * timestep,
    c_skip = sigma_data^2 / (s^2 + sigma_data^2), c_out = s / sqrt(s^2 + sigma_data^2)."""
    s = schedule.t_to_timestep(t) * timestep_scaling
    return sigma_data**2 / (s**2 + sigma_data**2), s / (s**2 + sigma_data**2).sqrt()


def consistency_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    c_skip,
    c_out,
    t_next=None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Consistency-model step: f = c_skip x_t + c_out x0, then re-noise to ``t_next`` (multistep
    consistency sampling, Song et al. 2023 Alg. 1); ``t_next=None`` returns f."""
    f = _bcast(torch.as_tensor(c_skip), x_t) * x_t + _bcast(torch.as_tensor(c_out), x_t) * x0
    if t_next is None:
        return f
    if noise is None:
        raise ValueError("consistency_step to a later point needs noise")
    return schedule.add_noise(f, noise, t_next)


def initial_noise_scale(schedule: NoiseSchedule, t) -> float:
    """Scale of x_T = scale * N(0, I) at the first sampling time (1 for VP and flow, sigma for EDM)."""
    return 1.0 if schedule.kind in ("vp", "flow") else float(schedule.sigma(t))


@torch.no_grad()
def sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    num_steps: int | None = None,
    *,
    pred_type: str,
    ts: torch.Tensor | None = None,
    spacing: str = "trailing",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    progress: bool = False,
    trace: list | None = None,
) -> torch.Tensor:
    """DDIM / Euler / ancestral sampling of ``model_fn(x_t, t) -> prediction of pred_type``.

    ``ts`` (continuous times, noisiest first) defaults to ``schedule.timesteps(num_steps, spacing)``;
    after the last one the sampler lands on the predicted x0. ``trace`` (a list) receives the predicted x0 of
    every step, on the CPU (``stepdistill.hybrid.save_trace_grid`` draws it)."""
    from .ops import fused_ddim_step, resolve_backend, step_coefficients

    if ts is None:
        if num_steps is None:
            raise ValueError("pass num_steps or ts")
        ts = schedule.timesteps(num_steps, spacing)
    ts = torch.as_tensor(ts, dtype=torch.float64)
    x = noise * initial_noise_scale(schedule, ts[0])
    it = range(len(ts))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", leave=False)
    for i in it:
        t = ts[i].expand(x.shape[0])
        pred = model_fn(x, t)
        t_prev = ts[i + 1].expand(x.shape[0]) if i + 1 < len(ts) else None
        if eta == 0 and clip_x0 is None and trace is None and resolve_backend(None, x) == "triton":
            # CUDA: conversion + DDIM / Euler step in one fused pass (stepdistill.ops)
            a, s = step_coefficients(schedule, t, x.device)
            prev = step_coefficients(schedule, t_prev, x.device) if t_prev is not None else (None, None)
            x = fused_ddim_step(x, pred, a, s, *prev, pred_type=pred_type)
            continue
        x0, eps = schedule.to_x0_eps(pred, x, t, pred_type)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = schedule.to_x0_eps(x0, x, t, "x0")[1]
        if trace is not None:
            trace.append(x0.detach().float().cpu())
        z = None
        if eta > 0 and t_prev is not None:
            z = rnd.randn(
                x.shape,
                generator=generator,
                dtype=x.dtype,
                device=generator.device if generator is not None else x.device,
            ).to(x.device)
        x = ddim_step(schedule, x0, eps, t, t_prev, eta=eta, noise=z)
    return x


# --------------------------------------------------------------------------------------------------------
# consistency models: boundary conditions, the Heun solver step, multistep sampling
# --------------------------------------------------------------------------------------------------------


def cd_scalings(sigma, sigma_min: float = 0.002, sigma_data: float = 0.5):
    """Consistency-model boundary conditions for EDM networks (Song et al. 2023, App. C; openai/consistency_models
    ``karras_diffusion.py``): c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
    c_out = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2), applied to the preconditioned network
    output F: f = c_skip x + c_out F, so that f(x, sigma_min) = x exactly."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    d = sigma - sigma_min
    return sigma_data**2 / (d**2 + sigma_data**2), d * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def heun_step(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t, t_prev, eps_fn) -> torch.Tensor:
    """One Heun (2nd-order) step of the probability-flow ODE from t to t_prev (Karras et al. 2022, Alg. 1).

    Written for every schedule in the variables y = x / alpha and s = sigma / alpha, where the ODE is
    dy/ds = eps: the Euler proposal is the DDIM step (:func:`ddim_step`); ``eps_fn(x, t_prev)`` gives the
    noise prediction there, and the step uses the mean of both slopes. Where s(t_prev) = 0 the Euler step is
    returned (no second evaluation is meaningful at zero noise)."""
    a, s = _bcast(schedule.alpha(t), x_t), _bcast(schedule.sigma(t), x_t)
    a_p, s_p = _bcast(schedule.alpha(t_prev), x_t), _bcast(schedule.sigma(t_prev), x_t)
    y = x_t / a
    ds = s_p / a_p - s / a
    x_euler = a_p * (y + ds * eps)
    eps_2 = eps_fn(x_euler, t_prev)
    x_heun = a_p * (y + ds * 0.5 * (eps + eps_2))
    return torch.where(s_p > 0, x_heun, x_euler)


@torch.no_grad()
def consistency_sample(
    consistency_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    noise: torch.Tensor,
    ts,
    *,
    generator: torch.Generator | None = None,
    trace: list | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM, Luo et al. 2023, Alg. 3).

    ``consistency_fn(x_t, t)`` is the consistency function f (an estimate of x0, boundary conditions included);
    ``ts`` are the continuous sampling times, noisiest first. x = f(x_T, T); then for every next time t the
    estimate is re-noised with fresh noise, x_t = alpha(t) x + sigma(t) z, and x = f(x_t, t). ``trace`` (a list)
    receives every step's estimate, on the CPU."""
    ts = torch.as_tensor(ts, dtype=torch.float64).reshape(-1)
    x = noise * initial_noise_scale(schedule, ts[0])
    x0 = None
    for i in range(len(ts)):
        t = ts[i].expand(x.shape[0])
        if i > 0:
            z = rnd.randn(
                x.shape,
                generator=generator,
                dtype=x.dtype,
                device=generator.device if generator is not None else x.device,
            ).to(x.device)
            x = schedule.add_noise(x0, z, t)
        x0 = consistency_fn(x, t)
        if trace is not None:
            trace.append(x0.detach().float().cpu())
    return x0
