"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling", arXiv 2505.13447).

A network u(z, r, t) predicts the average velocity over [r, t] of the flow z_tau = (1 - tau) x + tau eps (v = eps - x),
u(z_t, r, t) = (t - r)^-1 int_r^t v(z_tau, tau) dtau. Differentiating (t - r) u = int_r^t v in t gives the MeanFlow
identity, which is the training target (stop-gradient), with du/dt the total derivative along the trajectory, a JVP
of u along the tangent (v, 0, 1) of (z, r, t):

    u_tgt = v - (t - r) (v d_z u + d_t u)                          (paper eq. 6 / 8)
    L     = sg(w) ||u(z_t, r, t) - sg u_tgt||^2,   w = 1 / (||delta||^2 + c)^p   (adaptive weighting, Sec. 4.3)

(r, t): two logit-normal draws, ordered so that t >= r; a fraction ``1 - ratio_r_neq_t`` of the batch gets r = t
(there the loss is flow matching, the JVP term vanishes). v: ``mode: data`` uses eps - x (training from data, as the
paper); ``mode: distill`` uses the teacher's velocity at (z_t, t) (with classifier-free guidance ``guidance_scale``),
read in flow coordinates through :mod:`stepdistill.models.meanflow` (any VP / EDM / flow teacher).

Sampling: 1 step x = z_1 - u(z_1, 0, 1); n steps z_r = z_t - (t - r) u(z_t, r, t) on a uniform grid.

Cost per iteration: one JVP of the student (a forward and a tangent pass, no graph) plus one forward with gradients
(plus one teacher pass, two with CFG, when distilling; plus one teacher pass per student call while the
``student_prediction`` anchor fades).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..models.jvp import JVP, check_jvp_mode, time_difference
from ..models.meanflow import MeanFlowGenerator, flow_velocity, with_second_time
from ..schedules import _bcast
from . import randomness as rnd
from .base import NetSpec
from .student import StudentConfig, StudentTrainer

MODES = ("data", "distill")


# ------------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------------
def meanflow_jvp(u_fn, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor, jvp_fn=None, nets=()):
    """(u(z, r, t), du/dt) with du/dt = v d_z u + d_t u: the JVP of ``u_fn(z, r, t)`` along the tangent (v, 0, 1) of
    (z, r, t) (Geng et al. 2025, eq. 8). ``jvp_fn(fn, primals, tangents) -> (out, tangent_out)`` computes it: a
    :class:`~stepdistill.models.jvp.JVP` (default ``JVP("auto")``: forward-mode AD, finite differences where an op
    has no forward rule) or any function of that signature. ``nets``: the networks ``u_fn`` calls, passed on to a
    JVP (forward mode runs them without autocast)."""
    jvp_fn = JVP("auto") if jvp_fn is None else jvp_fn
    kw = {"nets": tuple(nets)} if nets else {}
    return jvp_fn(lambda z_, t_: u_fn(z_, r, t_), (z, t), (v, torch.ones_like(t)), **kw)


def meanflow_target(v: torch.Tensor, du_dt: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The MeanFlow identity u_tgt = v - (t - r) du/dt (Geng et al. 2025, eq. 6), detached; ``t``, ``r`` (B,)."""
    return (v - _bcast((t - r).to(v.dtype), v) * du_dt).detach()


def adaptive_weight(sq_err: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """MeanFlow's adaptive loss weight sg(1 / (||delta||^2 + c)^p) per sample (Geng et al. 2025, Sec. 4.3; p = 0:
    plain squared error, p = 1: close to a (squared-root-free) normalised error)."""
    return 1.0 / (sq_err.detach() + c).pow(p)


def meanflow_loss(u: torch.Tensor, u_tgt: torch.Tensor, p: float = 1.0, c: float = 1e-3) -> torch.Tensor:
    """mean_b w_b ||u_b - u_tgt_b||^2 (sum over the sample's dimensions) with the adaptive weight w (Geng et al.
    2025, eq. 9 and Sec. 4.3)."""
    if u.shape != u_tgt.shape:
        raise ValueError(f"u shape {tuple(u.shape)} != target shape {tuple(u_tgt.shape)}")
    sq = (u.float() - u_tgt.float()).pow(2).reshape(u.shape[0], -1).sum(dim=1)
    return (adaptive_weight(sq, p, c) * sq).mean()


def sample_r_t(
    n: int,
    p_mean_t: float = -0.4,
    p_std_t: float = 1.0,
    p_mean_r: float = -0.4,
    p_std_r: float = 1.0,
    ratio_r_neq_t: float = 0.25,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MeanFlow's (r, t) sampler (Geng et al. 2025, Sec. 4.3 / Table 1; Gsunshine/py-meanflow): t and r drawn
    independently from logit-normal(p_mean, p_std), swapped so that t >= r, then r = t on a random fraction
    1 - ``ratio_r_neq_t`` of the batch. Returns float64 (r, t) of shape (n,)."""
    zt = rnd.randn(n, generator=generator, dtype=torch.float64)
    zr = rnd.randn(n, generator=generator, dtype=torch.float64)
    a, b = torch.sigmoid(p_mean_t + p_std_t * zt), torch.sigmoid(p_mean_r + p_std_r * zr)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    equal = rnd.rand(n, generator=generator, dtype=torch.float64) >= ratio_r_neq_t
    return torch.where(equal, t, r), t


# ------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------
@dataclass
class MeanFlowConfig(StudentConfig):
    """MeanFlow settings. Teacher, data, memory and export keys: :class:`~stepdistill.trainers.student.StudentConfig`
    (the data's images are read: MeanFlow noises real samples in both modes; ``generator_mode`` must be "full":
    the second time input adds weights a LoRA on the frozen base cannot).

    > MeanFlow
    mode (`str`, `"distill"`): "data" (v = eps - x: the paper's training from data; the teacher gives the
        initial weights and the schedule only) or "distill" (v = the teacher's flow velocity at (z_t, t)).
    guidance_scale (`float`, `1.0`): "distill": classifier-free guidance of the teacher's velocity (uncond + w
        (cond - uncond)); the student is unguided (one evaluation per step).
    p_mean_t / p_std_t (`float`, `-0.4` / `1.0`), p_mean_r / p_std_r (`float`, `-0.4` / `1.0`): logit-normal
        parameters of the two time draws (the paper's ImageNet setting; its CIFAR-10 v1: t (-0.6, 1.6), r
        (-4.0, 1.6)).
    ratio_r_neq_t (`float`, `0.25`): fraction of the batch with r != t (paper ImageNet 0.25; CIFAR-10 0.75).
    adaptive_p (`float`, `1.0`), adaptive_c (`float`, `1e-3`): the adaptive weight 1 / (||delta||^2 + c)^p
        (paper ImageNet p = 1; CIFAR-10 0.75).
    r_embedding_dim (`int`, `256`): width of the sinusoidal embedding of t - r fed as ``timestep_cond``.
    r_embedding_scale (`float`, `10.0`): its top frequency, rad per unit of t - r (LCM's w-embedding: 1000; the JVP
        differentiates the embedding, and high frequencies fill du/dt with large oscillating terms).
    inference_steps (`int`, `1`): the exported / sampled number of MeanFlow steps (any count samples).
    jvp (`str`, `"auto"`): how du/dt is computed (:mod:`stepdistill.models.jvp`): "forward" (``torch.func.jvp``
        with the math attention kernel), "finite_difference" (a central difference of step ``jvp_eps`` along
        (v, 0, 1)) or "auto" (forward, falling back to finite differences where an op has no forward rule).
    jvp_eps (`float`, `1e-3`): the finite difference's step (along (v, 0, 1): in flow time for t).
    jvp_time_shift (`float`, `0.0`: exact): > 0 takes the partial derivative in t of du/dt as a central difference
        that moves the network's time input by +- this much (integer-timestep teachers: 10; the z part stays
        ``jvp``'s). A teacher conditioned on integer timesteps through sinusoids (frequencies up to 1 per
        timestep: DDPM, SD, the toy teacher) has a time derivative dominated by timestep-scale wiggles, which
        near the top flow time (thousands of timesteps per unit of t) swamp the target (README "MeanFlow").
    learning_rate (`float`, `1e-4`).
    """

    mode: str = "distill"
    guidance_scale: float = 1.0
    p_mean_t: float = -0.4
    p_std_t: float = 1.0
    p_mean_r: float = -0.4
    p_std_r: float = 1.0
    ratio_r_neq_t: float = 0.25
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    r_embedding_dim: int = 256
    r_embedding_scale: float = 10.0
    inference_steps: int = 1
    jvp: str = "auto"
    jvp_eps: float = 1e-3
    jvp_time_shift: float = 0.0
    learning_rate: float = 1e-4

    def check(self):
        super().check()
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 <= self.ratio_r_neq_t <= 1.0:
            raise ConfigError(f"ratio_r_neq_t must be in [0, 1], got {self.ratio_r_neq_t}")
        if self.adaptive_p < 0 or self.adaptive_c <= 0:
            raise ConfigError(f"need adaptive_p >= 0 and adaptive_c > 0, got {self.adaptive_p}, {self.adaptive_c}")
        if self.p_std_t <= 0 or self.p_std_r <= 0:
            raise ConfigError(f"p_std_t and p_std_r must be > 0, got {self.p_std_t}, {self.p_std_r}")
        if self.r_embedding_dim < 4:
            raise ConfigError(f"r_embedding_dim must be >= 4, got {self.r_embedding_dim}")
        if not self.r_embedding_scale > 0:
            raise ConfigError(f"r_embedding_scale must be > 0, got {self.r_embedding_scale}")
        if self.inference_steps < 1:
            raise ConfigError(f"inference_steps must be >= 1, got {self.inference_steps}")
        check_jvp_mode(self.jvp, self.jvp_eps)
        if self.jvp_time_shift < 0:
            raise ConfigError(f"jvp_time_shift must be >= 0 (0: the exact time derivative), got {self.jvp_time_shift}")
        if self.generator_mode != "full":
            raise ConfigError(
                f"generator_mode={self.generator_mode!r}: MeanFlow's second time input (a zero-initialised "
                "projection of embed(t - r)) is new weights that a LoRA on the frozen base cannot add; use 'full'"
            )
        if self.mode == "data" and self.guidance_scale != 1.0:
            raise ConfigError(
                f"guidance_scale={self.guidance_scale} needs mode: distill (the teacher's guided velocity); "
                "mode: data trains on eps - x"
            )


# ------------------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------------------
class MeanFlowTrainer(StudentTrainer):
    """MeanFlow on the shared loop: hooks only. The student is a :class:`MeanFlowGenerator` (the teacher's network
    plus a zero-initialised second time input: it starts as the teacher's instantaneous velocity)."""

    config_class = MeanFlowConfig
    method_name = "MeanFlow"
    export_scheduler = "ddim"

    def build(self):
        c = self.config
        self.build_teacher()
        if c.guidance_scale != 1.0:
            self.require_guidance("guidance_scale", c.guidance_scale)
        if self.dataset.images is None:
            raise ConfigError(
                f"dataset: {c.dataset!r} has no samples; MeanFlow noises real samples (an image folder, 'digits' or "
                "'toy2d:<name>')"
            )
        if self.generator_object is not None:
            net = self.generator_object.to(self.accelerator.device).train()
            if not getattr(getattr(net, "config", None), "time_cond_proj_dim", None):
                net = with_second_time(net, c.r_embedding_dim)
            net.requires_grad_(True)
            pred = self.teacher.prediction_type
        else:
            self.check_copy_source("generator")
            pred = self.student_prediction([1.0])
            net = with_second_time(self.teacher.net, c.r_embedding_dim).requires_grad_(True).train()
        gen = MeanFlowGenerator(
            net,
            self.schedule,
            self.teacher.prediction_type,
            num_steps=c.inference_steps,
            r_embedding_scale=c.r_embedding_scale,
            cfg_convention=self.teacher.cfg_convention,
        )
        self.generator = gen if self.generator_object is not None else self.apply_student_prediction(gen, pred)

    def networks(self):
        return {"generator": NetSpec(self.generator.net, params=self.generator_params())}

    def on_prepared(self):
        self.generator.net = self.specs["generator"].module

    def jvp_fn(self) -> JVP:
        """The run's JVP strategy (one object: an ``auto`` fallback is remembered)."""
        if getattr(self, "_jvp", None) is None:
            self._jvp = JVP(self.config.jvp, self.config.jvp_eps)
        return self._jvp

    @torch.no_grad()
    def du_dt(self, z, r, t, v, cond):
        """du/dt along (v, 0, 1) on the rows with r < t (elsewhere (t - r) du/dt = 0: the target is v), else 0."""
        out = torch.zeros_like(z)
        rows = (r < t).nonzero().reshape(-1)
        if len(rows):
            sub = cond.index(rows) if cond is not None else None
            gen = self.generator
            nets = (gen.net,) + ((gen.anchor.net,) if gen.anchor is not None else ())
            fn = lambda z_, r_, t_: gen.u(z_, r_, t_, sub)  # noqa: E731
            shift = self.config.jvp_time_shift
            if shift > 0:  # z part by the JVP, t part by a difference over +- shift network timesteps
                zr, rr, tr = z[rows], r[rows], t[rows]
                kw = {"nets": nets}
                _, d = self.jvp_fn()(lambda z_: fn(z_, rr, tr), (zr,), (v[rows],), **kw)
                d = d + time_difference(lambda t_: fn(zr, rr, t_), tr, shift, self.model_time,
                                        (gen.tau_min, gen.tau_max)).to(d.dtype)
            else:
                _, d = meanflow_jvp(fn, z[rows], r[rows], t[rows], v[rows], self.jvp_fn(), nets)
            out[rows] = d.to(out.dtype)
        return out

    def model_time(self, tau: torch.Tensor) -> torch.Tensor:
        """The network's time input (the schedule's ``model_time``: DDPM timesteps 0..999) at flow time ``tau``."""
        t = tau if self.schedule.kind == "flow" else self.schedule.t_from_noise_level(tau / (1 - tau))
        return self.schedule.model_time(t)

    def sample_times(self, n: int, device):
        """(r, t) from :func:`sample_r_t`, t clamped into the teacher's flow range (r <= t)."""
        c = self.config
        r, t = sample_r_t(n, c.p_mean_t, c.p_std_t, c.p_mean_r, c.p_std_r, c.ratio_r_neq_t)
        t = t.clamp(self.generator.tau_min, self.generator.tau_max)
        return torch.minimum(r, t).to(device), t.to(device)

    def compute_loss(self, batch, phase):
        c = self.config
        device = self.accelerator.device
        x = batch["image"].to(device)
        cond = self._cond_batch(batch)
        eps = rnd.randn_like(x)
        r, t = self.sample_times(len(x), device)
        z = _bcast(1 - t, x) * x + _bcast(t, x) * eps
        if c.mode == "data":
            v = eps - x
        else:
            with torch.no_grad():
                v = flow_velocity(self.teacher, z, t, cond, c.guidance_scale)
        target = meanflow_target(v, self.du_dt(z, r, t, v, cond), t, r)
        u = self.generator.u(z, r, t, cond)
        loss = meanflow_loss(u, target, c.adaptive_p, c.adaptive_c)
        return {"loss": loss, "frac_r_neq_t": (r < t).float().mean().detach()}

    # ---------------------------------------------------------------- export
    @property
    def export_guidance_scale(self) -> float:
        """The exported pipeline's constant ``timestep_cond``: pipelines feed a w-conditioned network
        embed(guidance_scale - 1); the one step's is embed((t - r) r_embedding_scale / 1000) with t - r = tau_max."""
        g = self.generator
        return 1.0 + g.tau_max * g.r_embedding_scale / 1000.0

    def network_only_export(self) -> str:
        """A one-step student of a VP teacher exports as a pipeline: its step from z at tau_max to r = 0 lands on
        x0 = z - tau_max u = the network's x0 reading at (x = noise, t' = 1), i.e. one DDIM step at the top timestep,
        with the constant input embed(tau_max) (the w-embedding path). Few-step students step between flow times
        that are not the teacher's integer timesteps: network + student.json."""
        why = super().network_only_export()
        if why:
            return why
        if self.generator.num_steps != 1:
            return (
                f"a {self.generator.num_steps}-step MeanFlow student steps between flow times that are not integer "
                "timesteps of the teacher's scheduler (a one-step student exports as a pipeline)"
            )
        if self.schedule.kind != "vp":
            return f"a MeanFlow pipeline export is written for VP teachers, not a {self.schedule.kind} schedule"
        return ""

    def student_json_extra(self) -> dict:
        g = self.generator
        return {
            "sampler": "meanflow",
            "meanflow": (
                "flow coordinates z_tau = (1 - tau) x + tau eps; z = noise / (alpha(1) + sigma(1)) at tau_max; for "
                "each step t -> r on the uniform grid tau_max -> 0: t' = the schedule time of noise level t / (1 - t), "
                "x = (alpha(t') + sigma(t')) z, out = network(x, timestep(t'), timestep_cond = "
                "guidance_scale_embedding((t - r) r_embedding_scale / 1000, r_embedding_dim)), (x0, eps) from out as "
                "prediction_type, z <- (1 - r) x0 + r eps"
            ),
            "tau_max": g.tau_max,
            "num_steps": g.num_steps,
            "r_embedding_dim": g.r_embedding_dim,
            "r_embedding_scale": g.r_embedding_scale,
        }
