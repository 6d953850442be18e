"""Noise schedules: the one place where time, noise level and prediction type are converted.

Every schedule describes a forward process ``x_t = alpha(t) * x0 + sigma(t) * eps`` on continuous time
``t`` in [0, 1] (t = 0 clean, t = 1 the noisiest point the model was trained on).  Three families:

* :class:`VPSchedule`   discrete variance-preserving schedules (DDPM / DDIM / Euler / LCM / SD / SDXL); the
                        integer ``timestep`` of diffusers is ``t * (num_train_timesteps - 1)``.
* :class:`EDMSchedule`  Karras et al. 2022 (EDM): alpha = 1, sigma from (sigma_min, sigma_max, rho); the
                        network sees c_noise = ln(sigma) / 4 and c_in-scaled inputs.
* :class:`FlowSchedule` rectified flow: x_t = (1 - t) x0 + t eps (SD3), with the SD3 timestep shift.

Prediction types (``x0``, ``eps``, ``v``, ``flow``, ``score``, ``edm``) are converted only by
:meth:`NoiseSchedule.convert`; diffusers' names (``epsilon``, ``sample``, ``v_prediction``,
``flow_prediction``) are accepted everywhere.  No other module branches on a prediction type.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from .trainers import randomness as rnd

__all__ = [
    "PREDICTION_TYPES",
    "NoiseSchedule",
    "VPSchedule",
    "EDMSchedule",
    "FlowSchedule",
    "TrigFlow",
    "normalize_prediction_type",
    "from_diffusers",
    "vp_alphas_cumprod",
]

PREDICTION_TYPES = ("x0", "eps", "v", "flow", "score", "edm")
_ALIASES = {
    "epsilon": "eps",
    "noise": "eps",
    "sample": "x0",
    "x_0": "x0",
    "v_prediction": "v",
    "flow_prediction": "flow",
    "velocity": "flow",
}


def normalize_prediction_type(name: str) -> str:
    """Map our and diffusers' names onto one of :data:`PREDICTION_TYPES`."""
    key = _ALIASES.get(str(name), str(name))
    if key not in PREDICTION_TYPES:
        valid = ", ".join(PREDICTION_TYPES + tuple(_ALIASES))
        raise ValueError(f"unknown prediction type {name!r}; expected one of: {valid}")
    return key


def _bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient (B,) or scalar to broadcast against ``like`` (B, ...)."""
    coef = coef.to(device=like.device, dtype=like.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (like.ndim - 1)))


class NoiseSchedule:
    """Base class. Subclasses define ``alpha``, ``sigma`` and the time the network is given."""

    #: prediction types this schedule can express (checked by ``convert``)
    supports: tuple[str, ...] = ("x0", "eps", "v", "score")
    kind: str = "base"

    # --- forward process -------------------------------------------------------------------------
    def alpha(self, t) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma(self, t) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _t(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64)

    def noise_level(self, t) -> torch.Tensor:
        """The VE / EDM noise level sigma(t) / alpha(t) (k-diffusion's sigma)."""
        return self.sigma(t) / self.alpha(t)

    def t_from_noise_level(self, s) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps."""
        return _bcast(self.alpha(t), x0) * x0 + _bcast(self.sigma(t), x0) * eps

    # --- what the network sees -------------------------------------------------------------------
    def model_time(self, t) -> torch.Tensor:
        """The time conditioning passed to the network (diffusers' ``timestep``)."""
        return self.t_to_timestep(t)

    def model_input(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Input scaling applied before the network (identity except for EDM preconditioning)."""
        return x_t

    def t_to_timestep(self, t) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def timestep_to_t(self, timestep) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- parameterisation ------------------------------------------------------------------------
    def check_prediction_type(self, name: str) -> str:
        key = normalize_prediction_type(name)
        if key not in self.supports:
            raise ValueError(
                f"prediction type {name!r} cannot be expressed by {type(self).__name__}; "
                f"it supports {', '.join(self.supports)}"
            )
        return key

    def to_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t, src: str):
        """Return (x0, eps) implied by a prediction ``pred`` of type ``src`` at (x_t, t)."""
        src = self.check_prediction_type(src)
        a, s = _bcast(self.alpha(t), x_t), _bcast(self.sigma(t), x_t)
        if src == "x0":
            x0 = pred
            eps = (x_t - a * x0) / s
        elif src == "eps":
            eps = pred
            x0 = (x_t - s * eps) / a
        elif src == "v":  # v = alpha eps - sigma x0 (Salimans & Ho 2022, eq. for v-parameterisation)
            norm = a * a + s * s
            x0 = (a * x_t - s * pred) / norm
            eps = (s * x_t + a * pred) / norm
        elif src == "score":  # score = -eps / sigma
            eps = -s * pred
            x0 = (x_t - s * eps) / a
        else:
            x0, eps = self._to_x0_eps_special(pred, x_t, t, src)
        return x0, eps

    def from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor, t, dst: str):
        dst = self.check_prediction_type(dst)
        if dst == "x0":
            return x0
        if dst == "eps":
            return eps
        a, s = _bcast(self.alpha(t), x_t), _bcast(self.sigma(t), x_t)
        if dst == "v":
            return a * eps - s * x0
        if dst == "score":
            return -eps / s
        return self._from_x0_eps_special(x0, eps, x_t, t, dst)

    def _to_x0_eps_special(self, pred, x_t, t, src):  # pragma: no cover - guarded by supports
        raise ValueError(f"{type(self).__name__} cannot read prediction type {src!r}")

    def _from_x0_eps_special(self, x0, eps, x_t, t, dst):  # pragma: no cover - guarded by supports
        raise ValueError(f"{type(self).__name__} cannot write prediction type {dst!r}")

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t, src: str, dst: str) -> torch.Tensor:
        """Convert a prediction between parameterisations at the same (x_t, t).

        Computed in the dtype of ``pred``: pass float64 tensors where precision matters (e.g. x0 from eps
        at high noise)."""
        src_k, dst_k = self.check_prediction_type(src), self.check_prediction_type(dst)
        if src_k == dst_k:
            return pred
        x0, eps = self.to_x0_eps(pred, x_t.to(pred.dtype), t, src_k)
        return self.from_x0_eps(x0, eps, x_t.to(pred.dtype), t, dst_k)

    def amplification(self, t, pred: str) -> torch.Tensor:
        """|d x0 / d output| of a ``pred``-type output at ``t``: how much an error of the network's output is
        scaled in its x0 (eps: sigma / alpha, 157 at timestep 999 of DDPM's linear schedule; v: sigma /
        (alpha^2 + sigma^2); x0: 1; flow: t; edm: c_out). The conversion is affine in the output, so this is
        its x0 for output 1 at x_t = 0."""
        t = self._t(t)
        one = torch.ones(t.reshape(-1).shape[0], 1, dtype=torch.float64)
        x0, _ = self.to_x0_eps(one, torch.zeros_like(one), t.reshape(-1), pred)
        return x0.abs().reshape(t.shape)

    def well_conditioned_type(self) -> str:
        """The output type whose x0 amplification stays bounded at every t: v (VP), flow (rectified flow),
        edm (EDM's preconditioned output, c_out <= sigma_data)."""
        return {"vp": "v", "flow": "flow", "edm": "edm"}.get(self.kind, "x0")

    def auto_prediction_type(self, teacher_type: str, t0, limit: float = 20.0) -> tuple[str, float]:
        """``student_prediction: auto``: the teacher's type, unless it amplifies output errors more than
        ``limit`` x in x0 at the generator's first (noisiest) time ``t0``; then :meth:`well_conditioned_type`.
        Returns (type, the teacher type's amplification at t0). SD1.5 / SDXL's eps at timestep 999 (14.6x)
        keeps eps; DDPM's linear schedule (157x) and cosine / zero-SNR schedules (unbounded) switch."""
        teacher_type = self.check_prediction_type(teacher_type)
        amp = float(self.amplification(t0, teacher_type))
        if amp <= limit:  # (nan > limit is False: an undefined amplification switches too, below)
            return teacher_type, amp
        return self.check_prediction_type(self.well_conditioned_type()), amp

    def reinterpretation_offset(self, out: torch.Tensor, x_t: torch.Tensor, t, src: str, dst: str) -> torch.Tensor:
        """convert(out, src -> dst) - out, in float64: what a network that outputs ``out`` as a ``src`` type must
        add to its output so that the sum, read as ``dst``, is the same prediction (exactly, for every x_t, t).
        A student whose network is a copy of an ``src`` teacher reads its output as ``dst`` plus this offset of
        the teacher's output: it equals the teacher at initialisation, while its own output's error reaches x0
        with ``dst``'s amplification, not ``src``'s."""
        out64 = out.double()
        return self.convert(out64, x_t.double(), t, src, dst) - out64

    # --- time grids and samplers -------------------------------------------------------------------
    def timesteps(self, num_steps: int, spacing: str = "trailing") -> torch.Tensor:
        """``num_steps`` continuous times, noisiest first, for an N-step sampler (the final step lands
        on clean data)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if spacing not in ("trailing", "linspace"):
            raise ValueError(f"unknown timestep spacing {spacing!r} for {type(self).__name__}")
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]

    def sample_t(
        self,
        n: int,
        dist: str = "uniform",
        *,
        t_min: float = 0.0,
        t_max: float = 1.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        generator: torch.Generator | None = None,
        device=None,
    ) -> torch.Tensor:
        """Training times.

        * ``uniform``: t ~ U[t_min, t_max] (discrete schedules: uniform over the integer index range);
        * ``lognormal``: ln(noise level) ~ N(p_mean, p_std) (EDM), mapped to t, clamped to [t_min, t_max];
        * ``logit_normal``: t = sigmoid(N(p_mean, p_std)) (SD3 / rectified flow).
        """
        if not 0.0 <= t_min <= t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if dist == "uniform":
            u = rnd.rand(n, generator=generator, dtype=torch.float64)
            t = t_min + (t_max - t_min) * u
            t = self._quantize(t)
        elif dist == "lognormal":
            z = rnd.randn(n, generator=generator, dtype=torch.float64)
            t = self.t_from_noise_level(torch.exp(p_mean + p_std * z)).clamp(t_min, t_max)
        elif dist == "logit_normal":
            z = rnd.randn(n, generator=generator, dtype=torch.float64)
            t = torch.sigmoid(p_mean + p_std * z).clamp(t_min, t_max)
        else:
            raise ValueError(f"unknown time distribution {dist!r}; use uniform, lognormal or logit_normal")
        return t.to(device) if device is not None else t

    def _quantize(self, t: torch.Tensor) -> torch.Tensor:
        return t


# =================================================================================================
# VP (discrete DDPM-style) schedules
# =================================================================================================

_VP_CLASSES = {
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "PNDMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DEISMultistepScheduler",
    "KDPM2DiscreteScheduler",
}
_EDM_CLASSES = {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"}
_FLOW_CLASSES = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"}


def vp_alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """alpha_bar_i for i = 0..T-1, computed the way DDPM-family schedulers define it (float32 betas)."""
    T = int(num_train_timesteps)
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":  # latent diffusion: linear in sqrt(beta)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, cosine alpha_bar, beta <= 0.999

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    else:
        raise ValueError(
            f"unknown beta_schedule {beta_schedule!r}; expected linear, scaled_linear or squaredcos_cap_v2"
        )
    if rescale_betas_zero_snr:  # Lin et al. 2024, "Common diffusion noise schedules are flawed", Alg. 1
        sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
        first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
        sqrt_ab = (sqrt_ab - last) * first / (first - last)
        ab = sqrt_ab**2
        alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
        betas = 1 - alphas
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


class VPSchedule(NoiseSchedule):
    """Discrete variance-preserving schedule: alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar).

    ``t = timestep / (T - 1)``; between integer timesteps alpha_bar is interpolated linearly."""

    kind = "vp"
    supports = ("x0", "eps", "v", "score")

    def __init__(self, alphas_cumprod: torch.Tensor, config: dict | None = None):
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ab.ndim != 1 or len(ab) < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor with at least 2 entries")
        self.alphas_cumprod = ab
        self.num_train_timesteps = len(ab)
        self.config = dict(config or {})

    @classmethod
    def from_config(cls, config: dict) -> "VPSchedule":
        keys = (
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "rescale_betas_zero_snr",
        )
        kw = {k: config[k] for k in keys if k in config and config[k] is not None}
        return cls(vp_alphas_cumprod(**kw), config=config)

    def _alpha_bar(self, t) -> torch.Tensor:
        t = self._t(t)
        idx = (t * (self.num_train_timesteps - 1)).clamp(0, self.num_train_timesteps - 1)
        lo = idx.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = idx - lo.to(idx.dtype)
        ab = self.alphas_cumprod.to(t.device)  # t may live on the GPU
        return ab[lo] * (1 - w) + ab[hi] * w

    def alpha(self, t):
        return self._alpha_bar(t).sqrt()

    def sigma(self, t):
        return (1 - self._alpha_bar(t)).sqrt()

    def t_to_timestep(self, t):
        return self._t(t) * (self.num_train_timesteps - 1)

    def timestep_to_t(self, timestep):
        return torch.as_tensor(timestep, dtype=torch.float64) / (self.num_train_timesteps - 1)

    def t_from_noise_level(self, s):
        """Exact inverse of noise_level(t) = sqrt((1 - ab) / ab) under the linear alpha_bar interpolation."""
        s = torch.as_tensor(s, dtype=torch.float64)
        ab = self.alphas_cumprod.to(s.device)
        target = (1 / (1 + s.reshape(-1) ** 2)).clamp(ab[-1], ab[0])
        # alpha_bar decreases with the timestep: search on its negation
        hi = torch.searchsorted(-ab, -target.contiguous()).clamp(1, len(ab) - 1)
        lo = hi - 1
        w = (ab[lo] - target) / (ab[lo] - ab[hi])
        return ((lo + w) / (self.num_train_timesteps - 1)).reshape(s.shape)

    def _quantize(self, t):
        return torch.round(t * (self.num_train_timesteps - 1)) / (self.num_train_timesteps - 1)

    def timesteps(self, num_steps: int, spacing: str = "trailing") -> torch.Tensor:
        """Integer-timestep grids as diffusers builds them (``timestep_spacing``), returned as t."""
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
        if spacing == "trailing":
            ts = torch.round(torch.arange(T, 0, -T / num_steps, dtype=torch.float64)) - 1
        elif spacing == "leading":
            ts = torch.arange(0, num_steps, dtype=torch.float64).flip(0) * (T // num_steps)
            ts = ts + float(self.config.get("steps_offset", 0) or 0)
        elif spacing == "linspace":
            ts = torch.round(torch.linspace(0, T - 1, num_steps, dtype=torch.float64)).flip(0)
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; use trailing, leading or linspace")
        return self.timestep_to_t(ts)

    def __repr__(self):
        return f"VPSchedule(T={self.num_train_timesteps})"


# =================================================================================================
# EDM (Karras et al. 2022)
# =================================================================================================


@dataclass
class _EDMParams:
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5


class EDMSchedule(NoiseSchedule):
    """Karras et al. 2022: x_t = x0 + sigma(t) eps with
    sigma(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho.

    The ``edm`` prediction type is the raw preconditioned network output F:
    x0 = c_skip(sigma) x_t + c_out(sigma) F (EDM eq. 7, Table 1).

    Integer timesteps index a grid of ``num_train_timesteps`` Karras levels, timestep i <-> t = i / (T - 1)
    (i = 0: sigma_min, T - 1: sigma_max): DMD2's ``karras_sigmas`` (main/edm/edm_guidance.py, 1000 levels), so
    its [20, 980] DM range and the generator's timestep 999 (sigma_max) read as for VP teachers. The network
    itself is conditioned on c_noise (``model_time``), not on these indices."""

    kind = "edm"
    supports = ("x0", "eps", "score", "edm")

    def __init__(self, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5, num_train_timesteps=1000):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if int(num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        self.p = _EDMParams(sigma_min, sigma_max, rho, sigma_data)
        self.num_train_timesteps = int(num_train_timesteps)
        self.config = {
            "sigma_min": sigma_min,
            "sigma_max": sigma_max,
            "rho": rho,
            "sigma_data": sigma_data,
            "num_train_timesteps": self.num_train_timesteps,
        }

    def alpha(self, t):
        return torch.ones_like(self._t(t))

    def sigma(self, t):
        p = self.p
        lo, hi = p.sigma_min ** (1 / p.rho), p.sigma_max ** (1 / p.rho)
        return (lo + self._t(t) * (hi - lo)) ** p.rho

    def t_from_noise_level(self, s):
        p = self.p
        lo, hi = p.sigma_min ** (1 / p.rho), p.sigma_max ** (1 / p.rho)
        s = torch.as_tensor(s, dtype=torch.float64).clamp(p.sigma_min, p.sigma_max)
        return (s ** (1 / p.rho) - lo) / (hi - lo)

    def scalings(self, t):
        """(c_skip, c_out, c_in) of EDM Table 1."""
        s, sd = self.sigma(t), self.p.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        return c_skip, c_out, c_in

    def model_time(self, t):
        return 0.25 * torch.log(self.sigma(t))  # c_noise

    def model_input(self, x_t, t):
        return _bcast(self.scalings(t)[2], x_t) * x_t

    def t_to_timestep(self, t):
        """Index on the Karras grid (see the class docstring); the network's own time input is ``model_time``."""
        return self._t(t) * (self.num_train_timesteps - 1)

    def timestep_to_t(self, timestep):
        return torch.as_tensor(timestep, dtype=torch.float64) / (self.num_train_timesteps - 1)

    def _to_x0_eps_special(self, pred, x_t, t, src):
        c_skip, c_out, _ = self.scalings(t)
        x0 = _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * pred
        return x0, (x_t - x0) / _bcast(self.sigma(t), x_t)

    def _from_x0_eps_special(self, x0, eps, x_t, t, dst):
        c_skip, c_out, _ = self.scalings(t)
        return (x0 - _bcast(c_skip, x_t) * x_t) / _bcast(c_out, x_t)

    def __repr__(self):
        return f"EDMSchedule({self.config})"


# =================================================================================================
# Rectified flow (SD3)
# =================================================================================================


class FlowSchedule(NoiseSchedule):
    """Rectified flow x_t = (1 - t) x0 + t eps; ``flow`` predictions are u = eps - x0 = dx_t/dt.

    ``shift`` is SD3's timestep shift, t' = shift t / (1 + (shift - 1) t), applied to sampling grids and
    (optionally) to training times; the network's timestep is t * num_train_timesteps."""

    kind = "flow"
    supports = ("x0", "eps", "flow", "score")

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, config: dict | None = None):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.config = dict(config or {"num_train_timesteps": num_train_timesteps, "shift": shift})

    def alpha(self, t):
        return 1 - self._t(t)

    def sigma(self, t):
        return self._t(t)

    def t_from_noise_level(self, s):
        s = torch.as_tensor(s, dtype=torch.float64)
        return s / (1 + s)

    def shift_t(self, t):
        t = self._t(t)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def t_to_timestep(self, t):
        return self._t(t) * self.num_train_timesteps

    def timestep_to_t(self, timestep):
        return torch.as_tensor(timestep, dtype=torch.float64) / self.num_train_timesteps

    def timesteps(self, num_steps: int, spacing: str = "linspace") -> torch.Tensor:
        """FlowMatchEulerDiscreteScheduler's grid (diffusers 0.3x-0.4x): linspace from 1 to shift(1/T), then
        shifted (the smallest point is shifted twice there; we follow it so that samplers agree)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if spacing not in ("linspace", "trailing"):
            raise ValueError(f"unknown timestep spacing {spacing!r} for FlowSchedule")
        T = self.num_train_timesteps
        s = torch.linspace(1.0, float(self.shift_t(1.0 / T)), num_steps, dtype=torch.float64)
        return self.shift_t(s)

    def _to_x0_eps_special(self, pred, x_t, t, src):  # src == "flow"
        tt = _bcast(self._t(t), x_t)
        return x_t - tt * pred, x_t + (1 - tt) * pred

    def _from_x0_eps_special(self, x0, eps, x_t, t, dst):  # dst == "flow"
        return eps - x0

    def __repr__(self):
        return f"FlowSchedule(T={self.num_train_timesteps}, shift={self.shift})"


# =================================================================================================
# construction from diffusers
# =================================================================================================


def _load_config(obj) -> dict:
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, (str, os.PathLike)):
        path = str(obj)
        if os.path.isdir(path):
            for cand in (
                os.path.join(path, "scheduler_config.json"),
                os.path.join(path, "scheduler", "scheduler_config.json"),
            ):
                if os.path.isfile(cand):
                    path = cand
                    break
            else:
                raise FileNotFoundError(f"no scheduler_config.json in {obj!r} or {obj!r}/scheduler")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"scheduler config {obj!r} does not exist")
        with open(path) as f:
            return json.load(f)
    cfg = getattr(obj, "config", None)
    if cfg is None:
        raise TypeError(f"cannot read a scheduler config from {type(obj).__name__}")
    out = dict(cfg)
    out.setdefault("_class_name", type(obj).__name__)
    return out


def from_diffusers(scheduler_or_config, class_name: str | None = None) -> NoiseSchedule:
    """Build the schedule of a diffusers scheduler (object, config dict, or folder / json path).

    Returns (schedule); the config's ``prediction_type`` is left for the model wrapper to read."""
    cfg = _load_config(scheduler_or_config)
    name = class_name or cfg.get("_class_name")
    if name is None:
        raise ValueError("scheduler config has no _class_name; pass class_name=")
    if name in _VP_CLASSES:
        return VPSchedule.from_config(cfg)
    if name in _EDM_CLASSES:
        return EDMSchedule(
            sigma_min=cfg.get("sigma_min", 0.002),
            sigma_max=cfg.get("sigma_max", 80.0),
            rho=cfg.get("rho", 7.0),
            sigma_data=cfg.get("sigma_data", 0.5),
            num_train_timesteps=cfg.get("num_train_timesteps", 1000),
        )
    if name in _FLOW_CLASSES:
        if cfg.get("use_dynamic_shifting"):
            raise ValueError(f"{name} with use_dynamic_shifting=True (resolution-dependent shift) is not supported")
        return FlowSchedule(cfg.get("num_train_timesteps", 1000), cfg.get("shift", 1.0), config=cfg)
    known = sorted(_VP_CLASSES | _EDM_CLASSES | _FLOW_CLASSES)
    raise ValueError(f"unknown scheduler class {name!r}; supported: {', '.join(known)}")


# =================================================================================================
# TrigFlow view (Lu & Song 2024, sCM)
# =================================================================================================


class TrigFlow:
    """The TrigFlow parameterisation of a schedule (Lu & Song 2024, "Simplifying, stabilizing and scaling
    continuous-time consistency models", section 2): x_that = cos(that) x0 + sin(that) z, z ~ N(0, sigma_d^2 I),
    that in [0, pi/2], and the network output F with x0 = cos(that) x_that - sigma_d sin(that) F (so
    dx_that / dthat = sigma_d F along the probability-flow ODE).

    A VP / EDM / flow schedule's point (x_t, t) is the TrigFlow point of the same signal-to-noise ratio:
    sigma_d tan(that) = sigma(t) / alpha(t) (the noise level), x_t = x_that sqrt(alpha^2 + (sigma / sigma_d)^2)
    (FastGen's ``TrigFlowPrecond``). Every map is differentiable in that (forward-mode AD: sCM's JVP goes through
    it); all work in float64."""

    def __init__(self, schedule: NoiseSchedule, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.schedule, self.sigma_data = schedule, float(sigma_data)

    # --- times ------------------------------------------------------------------------------------
    def t_hat(self, t) -> torch.Tensor:
        """The TrigFlow time of native time ``t``: atan2(sigma(t), alpha(t) sigma_d)."""
        s = self.schedule
        return torch.atan2(s.sigma(t), s.alpha(t) * self.sigma_data)

    def t_native(self, t_hat) -> torch.Tensor:
        """The native time of TrigFlow time ``t_hat`` (inverse of :meth:`t_hat`; the schedule's
        ``t_from_noise_level`` of sigma_d tan(that), clamped to its range)."""
        th = torch.as_tensor(t_hat, dtype=torch.float64)
        if self.schedule.kind == "flow":  # t / (1 - t) = sigma_d tan(that), finite at that = pi/2
            sd_sin = self.sigma_data * torch.sin(th)
            return sd_sin / (torch.cos(th) + sd_sin)
        return self.schedule.t_from_noise_level(self.sigma_data * torch.tan(th))

    def scale(self, t) -> torch.Tensor:
        """x_t / x_that at native time ``t``: sqrt(alpha^2 + (sigma / sigma_d)^2)."""
        s = self.schedule
        return (s.alpha(t) ** 2 + (s.sigma(t) / self.sigma_data) ** 2).sqrt()

    def to_native(self, x_hat: torch.Tensor, t_hat):
        """(x_t, t) of the native schedule at TrigFlow (x_that, that)."""
        t = self.t_native(t_hat)
        return x_hat * _bcast(self.scale(t), x_hat), t

    def from_native(self, x_t: torch.Tensor, t):
        """(x_that, that) at the native (x_t, t)."""
        return x_t / _bcast(self.scale(t), x_t), self.t_hat(t)

    # --- the forward process and the output -------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, z: torch.Tensor, t_hat) -> torch.Tensor:
        """x_that = cos(that) x0 + sin(that) z (z already scaled by sigma_d)."""
        th = torch.as_tensor(t_hat, dtype=torch.float64)
        return _bcast(torch.cos(th), x0) * x0 + _bcast(torch.sin(th), x0) * z

    def velocity(self, x0: torch.Tensor, z: torch.Tensor, t_hat) -> torch.Tensor:
        """dx_that / dthat of the pair (x0, z): cos(that) z - sin(that) x0 (sCT's tangent)."""
        th = torch.as_tensor(t_hat, dtype=torch.float64)
        return _bcast(torch.cos(th), x0) * z - _bcast(torch.sin(th), x0) * x0

    def F_from_x0(self, x_hat: torch.Tensor, x0: torch.Tensor, t_hat) -> torch.Tensor:
        """F = (cos(that) x_that - x0) / (sigma_d sin(that))."""
        th = torch.as_tensor(t_hat, dtype=torch.float64)
        return (_bcast(torch.cos(th), x_hat) * x_hat - x0) / _bcast(self.sigma_data * torch.sin(th), x_hat)

    def x0_from_F(self, x_hat: torch.Tensor, F: torch.Tensor, t_hat) -> torch.Tensor:
        """The consistency function f(x_that, that) = cos(that) x_that - sigma_d sin(that) F (= x0)."""
        th = torch.as_tensor(t_hat, dtype=torch.float64)
        return _bcast(torch.cos(th), x_hat) * x_hat - _bcast(self.sigma_data * torch.sin(th), x_hat) * F

    def __repr__(self):
        return f"TrigFlow({self.schedule!r}, sigma_data={self.sigma_data})"
