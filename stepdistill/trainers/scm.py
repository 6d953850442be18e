"""sCM: simplified, stabilised continuous-time consistency models (Lu & Song 2024, arXiv 2410.11081), in its
training (sCT) and distillation (sCD) forms.

The student is a copy of the teacher on the teacher's own schedule; the loss reads it in the TrigFlow view
(:class:`~stepdistill.schedules.TrigFlow`): x_that = cos(that) x0 + sin(that) z, z ~ N(0, sigma_d^2 I), and
F_theta(x_that, that) = (cos(that) x_that - x0_theta) / (sigma_d sin(that)) from the student's x0 at the native
point of the same signal-to-noise ratio (FastGen's ``TrigFlowPrecond``). Its consistency function
f = cos(that) x_that - sigma_d sin(that) F_theta is then the student's x0 itself, so sampling is the usual
consistency chain on the native schedule (1 step from pure noise, 2 steps re-noised at sigma = 0.821) and the
export is the stock LCMScheduler pipeline of every consistency student (EDM teachers: EDMEulerScheduler).

One iteration (FastGen ``fastgen/methods/consistency_model/sCM.py``):

* that = atan(sigma / sigma_d), sigma = exp(tau), tau ~ N(P_mean, P_std^2) (the paper's log-normal proposal on
  sigma_d tan(that)), clamped to the teacher's noise levels;
* dx/dthat: sCT cos(that) z - sin(that) x0; sCD sigma_d F_teacher(x_that, that) (with CFG: the guided x0);
* the JVP dF/dthat along (cos sin dx/dthat, cos sin) (:mod:`stepdistill.models.jvp`: forward mode or finite
  differences, key ``jvp``), no graph;
* the tangent g = -cos^2 (sigma_d F^- - dx/dthat) - r (cos sin x_that + sigma_d cos sin dF^-/dthat) with the
  warm-up r: 0 -> 1, normalised g / (||g||_rms + c) (or clipped to [-1, 1]);
* the loss w(that) / e^u(that) mean||F_theta - sg F_theta - g||^2 + u(that), w = 1 / (sigma_d tan that), u a
  learned log-variance of the time (the adaptive weighting head, :class:`LogVarHead`).

Example::

    stepdistill train --config recipes/scm/digits.yaml
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError
from ..models.denoiser import _unwrap
from ..models.jvp import JVP, check_jvp_mode, time_difference, time_step
from ..schedules import TrigFlow, _bcast
from . import randomness as rnd
from .base import NetSpec
from .student import StudentConfig, StudentTrainer

MODES = ("scd", "sct")
TANGENTS = ("normalize", "clip", "none")


@dataclass
class SCMConfig(StudentConfig):
    """sCM settings (defaults: FastGen's ``configs/methods/config_scm.py`` and the paper unless noted).

    Teacher, data, generator mode (full / LoRA) and export keys: :class:`~stepdistill.trainers.student.StudentConfig`.

    > Method
    mode (`str`, `"scd"`): "scd" (distillation: the teacher's ODE velocity) or "sct" (training: the velocity of
        the pair (x0, z)); both noise real samples (the dataset must have images).
    init (`str`, `"teacher"`): the student's weights, "teacher" or "scratch" (sCT from random weights).
    sigma_data (`float`, `0.5`): the data's standard deviation sigma_d of TrigFlow.
    guidance_scale (`float`, `1.0`): sCD's teacher CFG scale (uncond + w (cond - uncond); 1 = none).
    > Time sampling
    p_mean / p_std (`float`, `-1.0` / `1.4`): sigma_d tan(that) ~ lognormal(P_mean, P_std) (FastGen: 1.8 for sCT
        from an EDM checkpoint; EDM2-XL 1.6).
    > Tangent
    tangent (`str`, `"normalize"`): "normalize" (g / (||g||_rms + tangent_c)), "clip" (to [-1, 1]) or "none".
    tangent_c (`float`, `0.1`).
    tangent_warmup_steps (`int`, `-1`): iterations of the warm-up r: 0 -> 1 of the tangent's second term (paper and
        FastGen: 10000); -1: min(10000, max_steps // 5); 0: none.
    > Weighting
    prior_weighting (`bool`, `true`): w = 1 / (sigma_d tan that) (EDM's 1 / sigma).
    adaptive_weighting (`bool`, `true`): the learned log-variance u(that) (EDM2 / sCM).
    logvar_channels (`int`, `128`): Fourier features of the log-variance head. logvar_lr (`float | None`,
        `None`: learning_rate).
    > JVP
    jvp (`str`, `"auto"`): "forward" (torch.func.jvp), "finite_difference" (central differences) or "auto"
        (forward, falling back to finite differences where an op has no forward-mode rule).
    jvp_eps (`float`, `0.001`): the finite-difference step along the tangent (the time direction takes a smaller
        one where the network's timestep would move more than 0.05: :func:`stepdistill.models.jvp.time_step`).
    jvp_time_shift (`float`, `0.0`: exact): > 0 takes the time part of the JVP as a central difference that moves
        the network's time input by +- this much (the x part stays ``jvp``'s; one-sided at the ends of the time
        range). A teacher that embeds integer timesteps with sinusoids (DDPM, SD, the toy teacher: frequencies up
        to 1 rad per timestep) has an exact time derivative that is mostly wiggle, not trend; +- 10 timesteps
        reads the trend (the toy and digits recipes; README "sCM": this was why sCD did not train). For EDM
        teachers (time input ln(sigma) / 4) the shift is in those units.
    > Sampling and export
    inference_steps (`int`, `1`): 1 or 2 steps in the exported pipeline.
    two_step_sigma (`float`, `0.821`): the noise level sigma / alpha of the second step (FastGen's CIFAR-10 list
        [80, 0.821, 0]); rounded to the teacher's integer timestep grid.
    > Optimisation (FastGen: RAdam betas (0.9, 0.99), wd 0, no clipping; here AdamW with those betas)
    """

    mode: str = "scd"
    init: str = "teacher"
    sigma_data: float = 0.5
    guidance_scale: float = 1.0
    p_mean: float = -1.0
    p_std: float = 1.4
    tangent: str = "normalize"
    tangent_c: float = 0.1
    tangent_warmup_steps: int = -1
    prior_weighting: bool = True
    adaptive_weighting: bool = True
    logvar_channels: int = 128
    logvar_lr: float | None = None
    jvp: str = "auto"
    jvp_eps: float = 1e-3
    jvp_time_shift: float = 0.0
    inference_steps: int = 1
    two_step_sigma: float = 0.821
    adam_beta2: float = 0.99

    def check(self):
        super().check()
        for key, value, valid in (
            ("mode", self.mode, MODES),
            ("tangent", self.tangent, TANGENTS),
            ("init", self.init, ("teacher", "scratch")),
        ):
            if value not in valid:
                raise ConfigError(f"{key} must be one of {valid}, got {value!r}")
        check_jvp_mode(self.jvp, self.jvp_eps)
        for key in ("sigma_data", "p_std", "two_step_sigma"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.jvp_time_shift < 0:
            raise ConfigError(f"jvp_time_shift must be >= 0 (0: the exact time derivative), got {self.jvp_time_shift}")
        if self.tangent_c < 0:
            raise ConfigError(f"tangent_c must be >= 0, got {self.tangent_c}")
        if self.tangent_warmup_steps < -1:
            raise ConfigError(f"tangent_warmup_steps must be >= 0 (or -1: derived), got {self.tangent_warmup_steps}")
        if self.inference_steps not in (1, 2):
            raise ConfigError(f"inference_steps must be 1 or 2, got {self.inference_steps}")
        if self.logvar_channels < 1:
            raise ConfigError(f"logvar_channels must be >= 1, got {self.logvar_channels}")
        if self.guidance_scale != 1.0 and self.mode == "sct":
            raise ConfigError(
                f"guidance_scale={self.guidance_scale} with mode=sct: consistency training has no teacher"
            )
        if self.init == "scratch" and self.generator_mode == "lora":
            raise ConfigError("init=scratch with generator_mode=lora: a LoRA needs the pretrained base; use full")
        if self.dataset.endswith((".txt", ".jsonl")):
            raise ConfigError(
                f"dataset: {self.dataset!r} is a prompt file, but sCM noises real images (latents); use an image "
                "folder with captions"
            )


# --------------------------------------------------------------------------------------------------------
# the loss as pure tensor functions (float64 in, float64 out)
# --------------------------------------------------------------------------------------------------------


def scm_tangent(F_minus, F_jvp, x_hat, dxdt, t_hat, sigma_data: float, r: float = 1.0) -> torch.Tensor:
    """g = -cos^2(t) (sigma_d F^- - dx/dt) - r (cos(t) sin(t) x_t + sigma_d F_jvp), with F_jvp = cos(t) sin(t)
    dF^-/dt (the JVP along (cos sin dx/dt, cos sin)) (Lu & Song 2024, eq. 8 and Alg. 1 with the tangent warm-up
    r; FastGen ``SCMModel._scm_pred_to_loss``)."""
    cos, sin = torch.cos(t_hat), torch.sin(t_hat)
    g1 = -_bcast(cos * cos, x_hat) * (sigma_data * F_minus - dxdt)
    g2 = -(_bcast(cos * sin, x_hat) * x_hat + sigma_data * F_jvp)
    return g1 + r * g2


def normalize_tangent(g: torch.Tensor, c: float = 0.1) -> torch.Tensor:
    """g / (||g||_rms + c) per sample (Lu & Song 2024, section 4.2 "tangent normalization"; the RMS is FastGen's
    ``g_norm_spatial_invariance``: the L2 norm over sqrt(D))."""
    rms = g.flatten(1).square().mean(1).sqrt()
    return g / _bcast(rms + c, g)


def clip_tangent(g: torch.Tensor) -> torch.Tensor:
    """The alternative to normalisation: g clipped to [-1, 1] element-wise (Lu & Song 2024, section 4.2)."""
    return g.clamp(-1.0, 1.0)


def scm_loss(F: torch.Tensor, g: torch.Tensor, logvar=None, weight=None) -> torch.Tensor:
    """Per-sample loss w / e^u mean_D ||F - sg F - g||^2 + u (Lu & Song 2024, eq. 9: adaptive weighting with the
    prior weight w; the value is w / e^u mean(g^2) + u, the gradient w / e^u (-2 g / D) dF). ``logvar`` u (B,) or
    None (0), ``weight`` w (B,) or None (1)."""
    per = (F - F.detach() - g).flatten(1).square().mean(1)
    if weight is not None:
        per = weight * per
    if logvar is not None:
        per = torch.exp(-logvar) * per + logvar
    return per


def sample_t_hat(n: int, p_mean: float, p_std: float, sigma_data: float, lo: float, hi: float) -> torch.Tensor:
    """TrigFlow times that = atan(sigma / sigma_d), sigma = exp(P_mean + P_std N(0, 1)) clamped to [lo, hi] (the
    teacher's noise levels) (Lu & Song 2024, section 4.3; FastGen samples EDM sigma the same way). float64."""
    sigma = torch.exp(p_mean + p_std * rnd.randn(n, dtype=torch.float64)).clamp(lo, hi)
    return torch.atan(sigma / sigma_data)


def tangent_warmup(step: int, steps: int) -> float:
    """r = min(1, step / steps) (1 without warm-up)."""
    return 1.0 if steps <= 0 else min(1.0, step / steps)


class LogVarHead(nn.Module):
    """u(that): the adaptive weighting's log-variance, a linear map of fixed random Fourier features of
    c = ln(tan that) / 4 (EDM2's ``logvar_fourier`` / ``logvar_linear`` on c_noise, up to ln sigma_d / 4). The
    linear layer starts at zero: u = 0, the plain weighted loss."""

    def __init__(self, channels: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t_hat: torch.Tensor) -> torch.Tensor:
        c = torch.log(torch.tan(t_hat.double())).float() / 4
        feats = torch.cos(c[:, None] * self.freqs + self.phases) * math.sqrt(2)
        return self.linear(feats).squeeze(1)


# --------------------------------------------------------------------------------------------------------


class SCMTrainer(StudentTrainer):
    """sCT / sCD on the shared loop: the generator and the log-variance head train together."""

    config_class = SCMConfig
    export_scheduler = "lcm"

    @property
    def method_name(self) -> str:  # the model card's tag
        return f"scm-{self.config.mode}"

    # ---------------------------------------------------------------- setup
    def build(self):
        c = self.config
        self.build_teacher()
        if not self.dataset.has_images:
            raise ConfigError(f"mode={c.mode} noises real samples; dataset {c.dataset!r} has none")
        sched = self.schedule
        self.trig = TrigFlow(sched, c.sigma_data)
        if c.guidance_scale != 1.0:
            self.require_guidance("guidance_scale", c.guidance_scale)
        lo = float(sched.noise_level(0.0))
        hi = float(sched.noise_level(1.0))
        self.levels = (max(lo, 1e-4), hi if math.isfinite(hi) else 1e4)
        self.t_hat_range = tuple(math.atan(level / c.sigma_data) for level in self.levels)
        self.generator = self.make_generator(self.trained_times(), sampler="consistency")
        if c.init == "scratch":
            from .consistency import ConsistencyTrainer

            ConsistencyTrainer._reinitialise(self, _unwrap(self.generator.net))
            self.generator.set_anchor(None)
        self.logvar_head = LogVarHead(c.logvar_channels, seed=c.seed).to(self.accelerator.device)
        self.jvp = JVP(c.jvp, c.jvp_eps)
        warm = c.tangent_warmup_steps
        self.warmup_steps = min(10000, max(c.max_steps // 5, 1)) if warm == -1 else warm

    def trained_times(self) -> torch.Tensor:
        """[1, t(two_step_sigma)]: the first step from pure noise, the second at the native time whose noise level
        is ``two_step_sigma`` (on the integer timestep grid, except for EDM teachers, whose pipelines take any
        ramp position)."""
        sched = self.schedule
        t_mid = sched.t_from_noise_level(torch.tensor(self.config.two_step_sigma, dtype=torch.float64))
        if sched.kind != "edm":
            t_mid = sched.timestep_to_t(torch.round(sched.t_to_timestep(t_mid)))
        t_mid = float(t_mid)
        if not 0.0 < t_mid < 1.0:
            raise ConfigError(
                f"two_step_sigma={self.config.two_step_sigma} falls outside the teacher's noise levels "
                f"{self.levels if hasattr(self, 'levels') else ''}"
            )
        return torch.tensor([1.0, t_mid], dtype=torch.float64)

    def networks(self):
        nets = {"generator": NetSpec(self.generator.net, params=self.generator_params())}
        if self.config.adaptive_weighting:
            nets["logvar"] = NetSpec(self.logvar_head, lr=self.config.logvar_lr)
        return nets

    def on_prepared(self):
        self.generator.net = self.specs["generator"].module
        if "logvar" in self.specs:
            self.logvar_head = self.specs["logvar"].module

    def ema_networks(self):
        return ("generator",)

    # ---------------------------------------------------------------- the TrigFlow view of the networks
    def student_F(self, x_hat: torch.Tensor, t_hat: torch.Tensor, cond) -> torch.Tensor:
        """F_theta(x_that, that) from the student's x0 at the native point (float64; differentiable in all inputs,
        the JVP runs through it)."""
        x_t, t = self.trig.to_native(x_hat.double(), t_hat)
        x0 = self.generator.predict(x_t.to(x_hat.dtype), t, cond, target="x0", float64=True)
        return self.trig.F_from_x0(x_hat.double(), x0, t_hat)

    @torch.no_grad()
    def teacher_velocity(self, x_hat: torch.Tensor, t_hat: torch.Tensor, cond) -> torch.Tensor:
        """sCD's dx/dthat = sigma_d F_teacher (the guided x0 with ``guidance_scale``)."""
        x_t, t = self.trig.to_native(x_hat.double(), t_hat)
        w = self.config.guidance_scale if self.config.guidance_scale != 1.0 else None
        x0 = self.teacher.predict(x_t.float(), t, cond, target="x0", guidance_scale=w, float64=True)
        return self.config.sigma_data * self.trig.F_from_x0(x_hat.double(), x0, t_hat)

    def _native_time_rate(self, t_hat: torch.Tensor, dt_hat: torch.Tensor):
        """(native t, its derivative along dt_hat)."""
        h = 1e-7
        t = self.trig.t_native(t_hat)
        return t, (self.trig.t_native(t_hat + h * dt_hat) - self.trig.t_native(t_hat - h * dt_hat)) / (2 * h)

    def jvp_steps(self, t_hat: torch.Tensor, dt_hat: torch.Tensor) -> tuple[float, float]:
        """Finite-difference steps (x, that): the time step keeps the network's timestep shift small."""
        t, dt = self._native_time_rate(t_hat, dt_hat)
        return self.jvp.eps, time_step(self.generator, t, dt, self.jvp.eps)

    def F_jvp(self, x_hat, t_hat, dxdt, cond) -> torch.Tensor:
        """cos sin dF^-/dthat: the JVP of F along (cos sin dx/dthat, cos sin), no graph (with ``jvp_time_shift``,
        its time part as a per-sample central difference of that network-time shift)."""
        cs = torch.cos(t_hat) * torch.sin(t_hat)
        dx = (_bcast(cs, dxdt) * dxdt).to(x_hat.dtype)

        def fn(x, th):
            return self.student_F(x, th, cond)

        shift = self.config.jvp_time_shift
        dt = torch.zeros_like(cs) if shift > 0 else cs
        steps = self.jvp_steps(t_hat, cs)
        _, out = self.jvp(fn, (x_hat, t_hat), (dx, dt), nets=(self.generator.net,), steps=steps)
        out = out.double()
        if shift > 0:
            with torch.no_grad():
                tau = lambda th: self.schedule.model_time(self.trig.t_native(th))  # noqa: E731
                d = time_difference(lambda th: fn(x_hat, th), t_hat, shift, tau, self.t_hat_range)
                out = out + _bcast(cs, out) * d.double()
        return out

    # ---------------------------------------------------------------- the loss
    def compute_loss(self, batch, phase):
        c = self.config
        device = self.accelerator.device
        x0 = batch["image"].to(device).float()
        cond = self._cond_batch(batch)
        n = x0.shape[0]
        t_hat = sample_t_hat(n, c.p_mean, c.p_std, c.sigma_data, *self.levels).to(device)
        z = rnd.randn_like(x0) * c.sigma_data
        x_hat = self.trig.add_noise(x0.double(), z.double(), t_hat).float()
        if c.mode == "scd":
            dxdt = self.teacher_velocity(x_hat, t_hat, cond)
        else:
            dxdt = self.trig.velocity(x0.double(), z.double(), t_hat)
        F = self.student_F(x_hat, t_hat, cond)
        F_jvp = self.F_jvp(x_hat, t_hat, dxdt.float(), cond)
        r = tangent_warmup(self.global_step, self.warmup_steps)
        g = scm_tangent(F.detach(), F_jvp, x_hat.double(), dxdt, t_hat, c.sigma_data, r)
        if c.tangent == "normalize":
            g = normalize_tangent(g, c.tangent_c)
        elif c.tangent == "clip":
            g = clip_tangent(g)
        weight = 1.0 / (c.sigma_data * torch.tan(t_hat)) if c.prior_weighting else None
        logvar = self.logvar_head(t_hat).double() if c.adaptive_weighting else None
        per = scm_loss(F, g.detach(), logvar, weight)
        out = {"loss": per.mean().float(), "tangent_rms": g.flatten(1).square().mean(1).sqrt().mean().detach()}
        if logvar is not None:
            out["logvar"] = logvar.mean().detach()
        return out

    # ---------------------------------------------------------------- sampling and export
    def export_timesteps(self) -> list:
        return super().export_timesteps()[: self.config.inference_steps]

    @torch.no_grad()
    def sample(self, noise, cond=None, steps: int | None = None, generator=None, guidance_scale=None):
        """1- or 2-step consistency samples from ``noise`` ~ N(0, I) (default: ``inference_steps``), with the
        weights the export writes (the EMA when ``ema_decay`` > 0)."""
        n = self.config.inference_steps if steps is None else steps
        with self.export_weights():
            return self.generator.sample(noise, cond, num_steps=n, generator=generator)

    @torch.no_grad()
    def sample_images(self, step):
        n = 20
        batch = self.dataset.example(n, generator=torch.Generator().manual_seed(0))
        noise = torch.randn(n, *self.sample_shape, generator=torch.Generator().manual_seed(0))
        x = self.sample(noise.to(self.accelerator.device), self._cond_batch(batch), generator=torch.Generator())
        if self.vae is not None:
            from .student import _decode

            x = _decode(self.vae, x)
        return x if x.ndim == 4 else None
