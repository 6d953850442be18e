"""MeanFlow's student: a network of (z, r, t) that predicts the average velocity (Geng et al. 2025, arXiv 2505.13447).

MeanFlow lives in flow coordinates z_tau = (1 - tau) x + tau eps (tau in [0, 1], v = eps - x). A teacher of any
schedule (VP / EDM / flow) is read there through :func:`schedule_point`: the flow point (z, tau) is the schedule's
point at the time t' of the same noise level sigma / alpha = tau / (1 - tau), with x_t' = (alpha + sigma) z; the
(x0, eps) pair the network implies at (x_t', t') gives the flow velocity eps - x0 (:func:`flow_velocity`).

The second time input r enters as ``timestep_cond`` = embed(t - r) (the guidance-scale embedding path: diffusers'
``time_cond_proj_dim`` of UNet2DConditionModel, stepdistill's GuidedUNet2DModel for UNet2DModel, ToyMLP's
``time_cond_proj_dim``), through a zero-initialised projection: a student copied from a teacher starts with
u(z, r, t) = the teacher's instantaneous velocity v(z, t) for every r.

Sampling (:meth:`MeanFlowGenerator.sample`): z_r = z_t - (t - r) u(z_t, r, t) on a uniform grid of flow times from
the top time to 0. Since u = eps^ - x0^ for the network's (x0^, eps^) at (z_t, t), this step is z_r = (1 - r) x0^ +
r eps^: a deterministic DDIM step with the network's prediction, the network being told the step length t - r.
"""

from __future__ import annotations

import torch

from ..guidance import guidance_scale_embedding
from ..schedules import NoiseSchedule, _bcast
from .conditioning import Cond
from .denoiser import _unwrap
from .generator import Generator, with_guidance_embedding

#: the default width of the (t - r) embedding (LCM's w-embedding width)
R_EMBEDDING_DIM = 256
#: the default top frequency of the (t - r) embedding, rad per unit of t - r. The JVP differentiates the embedding
#: in t: at LCM's scale (1000) a feature's derivative is 1000x its value, and Adam moves every zero-initialised
#: projection weight at the learning rate whatever its feature's frequency, so du/dt (and the target) fill with
#: high-frequency terms.
R_EMBEDDING_SCALE = 10.0


def with_second_time(net, dim: int = R_EMBEDDING_DIM):
    """A copy of ``net`` with a second time input ``timestep_cond`` (B, dim), projected by a zero-initialised layer
    onto the time features: UNet2DModel (-> GuidedUNet2DModel), UNet2DConditionModel (``time_cond_proj_dim``) and
    ToyMLP. The copy computes exactly what ``net`` computes until the projection trains."""
    net = _unwrap(net)
    name = type(net).__name__
    if getattr(getattr(net, "config", None), "time_cond_proj_dim", None):
        raise ValueError(
            f"{name} already has a timestep_cond input (time_cond_proj_dim={net.config.time_cond_proj_dim}: a "
            "w-conditioned network); a MeanFlow student needs it free for the second time r"
        )
    if name == "ToyMLP":
        from .toy import ToyMLP

        cfg = {k: v for k, v in net.config.items() if not k.startswith("_")}
        new = ToyMLP(**{**cfg, "time_cond_proj_dim": dim})
        missing, unexpected = new.load_state_dict(net.state_dict(), strict=False)
        if unexpected or set(missing) != {"cond_proj.weight"}:
            raise RuntimeError(f"weights do not transfer: missing {missing}, unexpected {unexpected}")
        new.to(net.device)
        return new if new.dtype == net.dtype else new.to(net.dtype)
    if name in ("UNet2DModel", "UNet2DConditionModel"):
        return with_guidance_embedding(net, dim)
    raise ValueError(
        f"a second time input (MeanFlow's r) is supported for UNet2DModel, UNet2DConditionModel and ToyMLP, not {name}"
    )


def flow_range(schedule: NoiseSchedule) -> tuple[float, float]:
    """(tau_min, tau_max): the flow times sigma / (alpha + sigma) a schedule reaches at t = 0 and t = 1 (a flow
    schedule: (0, 1); DDPM's linear VP schedule: (0.0099, 0.9936))."""
    if schedule.kind == "flow":
        return 0.0, 1.0
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a, s = schedule.alpha(ends), schedule.sigma(ends)
    tau = s / (a + s)
    return float(tau[0]), float(tau[1])


def schedule_point(schedule: NoiseSchedule, z: torch.Tensor, tau: torch.Tensor):
    """The schedule's (x_t', t') for the flow point (z, tau): t' has the noise level tau / (1 - tau) and
    x_t' = (alpha(t') + sigma(t')) z. Differentiable in z and tau (forward mode included); tau must lie in
    :func:`flow_range` (outside it t' is clamped to the schedule's ends)."""
    tau = tau.to(torch.float64)
    t = tau if schedule.kind == "flow" else schedule.t_from_noise_level(tau / (1 - tau))
    scale = schedule.alpha(t) + schedule.sigma(t)
    return _bcast(scale, z) * z, t


def velocity_from_output(schedule: NoiseSchedule, out, x, t, prediction_type: str) -> torch.Tensor:
    """The flow velocity eps - x0 implied by a network output of ``prediction_type`` at the schedule point (x, t)."""
    x0, eps = schedule.to_x0_eps(out, x.to(out.dtype), t, prediction_type)
    return eps - x0


def flow_velocity(denoiser, z: torch.Tensor, tau: torch.Tensor, cond: Cond | None = None, guidance_scale=None):
    """A denoiser's (teacher's) instantaneous flow velocity v(z, tau) = eps^ - x0^ at the flow point (z, tau), with
    classifier-free guidance when ``guidance_scale`` asks for it."""
    x, t = schedule_point(denoiser.schedule, z, tau)
    out = denoiser.raw(x, t, cond, guidance_scale)
    return velocity_from_output(denoiser.schedule, out, x, t, denoiser.prediction_type).to(z.dtype)


def flow_grid(tau_max: float, num_steps: int) -> torch.Tensor:
    """The ``num_steps + 1`` flow times of an n-step MeanFlow sampler: uniform from ``tau_max`` down to 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(float(tau_max), 0.0, num_steps + 1, dtype=torch.float64)


class MeanFlowGenerator(Generator):
    """``u(z, r, t, cond)``: MeanFlow's average velocity over [r, t] at the flow point (z, t) (flow coordinates, see
    the module docstring); ``sample(noise, cond, num_steps)`` runs z_r = z_t - (t - r) u on a uniform flow grid.

    The network is the teacher's with a second time input (:func:`with_second_time`), called at the schedule point
    of (z, t) with ``timestep_cond`` = embed(t - r); its output (``prediction_type``, possibly anchored to the
    teacher: :class:`~stepdistill.models.generator.TeacherAnchor`) is read as the velocity eps^ - x0^."""

    def __init__(
        self,
        net,
        schedule: NoiseSchedule,
        prediction_type: str,
        *,
        num_steps: int = 1,
        r_embedding_scale: float = R_EMBEDDING_SCALE,
        **kw,
    ):
        tau_min, tau_max = flow_range(schedule)
        self.tau_max = tau_max
        grid = flow_grid(tau_max, num_steps)[:-1]
        times = grid if schedule.kind == "flow" else schedule.t_from_noise_level(grid / (1 - grid))
        super().__init__(net, schedule, prediction_type, timesteps=times.clamp(0, 1), sampler="ddim", **kw)
        self.tau_min = tau_min
        self.num_steps = num_steps
        self.r_embedding_scale = float(r_embedding_scale)
        config = getattr(_unwrap(net), "config", None)
        self.r_embedding_dim = int(getattr(config, "time_cond_proj_dim", None) or 0)
        if self.r_embedding_dim <= 0:
            raise ValueError(
                f"the MeanFlow student's network ({type(_unwrap(net)).__name__}) has no second time input "
                "(time_cond_proj_dim); build it with stepdistill.models.meanflow.with_second_time"
            )

    #: the sinusoids of embed(t - r) run at frequencies up to ``r_embedding_scale`` rad per unit of t - r
    r_embedding_scale: float = R_EMBEDDING_SCALE

    def r_embedding(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``timestep_cond`` = guidance_scale_embedding((t - r) * r_embedding_scale / 1000): the w-embedding (LCM's
        1000 w scaling) of the interval length, at frequencies up to ``r_embedding_scale`` rad per unit."""
        return guidance_scale_embedding((t - r) * (self.r_embedding_scale / 1000.0), self.r_embedding_dim)

    def u(self, z: torch.Tensor, r, t, cond: Cond | None = None) -> torch.Tensor:
        """The average velocity u(z, r, t) (B, ...) at flow time t over [r, t]; differentiable in z, r and t
        (forward mode included: MeanFlow's JVP)."""
        t = self._time(t, z).to(z.device)
        r = self._time(r, z).to(z.device)
        x, ts = schedule_point(self.schedule, z, t)
        kwargs = dict(cond.kwargs) if cond is not None else {}
        kwargs["timestep_cond"] = self.r_embedding(t, r).to(z.device)
        out = self._forward(x, ts, kwargs)
        return velocity_from_output(self.schedule, out, x, ts, self.prediction_type).to(z.dtype)

    def forward(self, z: torch.Tensor, cond: Cond | None = None, t=None, r=None, guidance_scale=None) -> torch.Tensor:
        """x0 = z - t u(z, 0, t) (one MeanFlow step to the data end; t defaults to the top flow time)."""
        t = self._time(self.tau_max if t is None else t, z).to(z.device)
        r = torch.zeros_like(t) if r is None else self._time(r, z).to(z.device)
        return z - _bcast(t - r, z) * self.u(z, r, t, cond)

    def initial_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """z at the top flow time tau_max: the flow point whose schedule point is x = noise at the schedule's top
        time t' = 1 (the teacher's own start; z = noise for a flow schedule)."""
        top = torch.ones(1, dtype=torch.float64)
        return noise / float(self.schedule.alpha(top) + self.schedule.sigma(top))

    @torch.no_grad()
    def sample(self, noise, cond=None, num_steps=None, generator=None, guidance_scale=None):
        """``num_steps`` (default: the trained count) MeanFlow steps z_r = z_t - (t - r) u(z_t, r, t) from ``noise``
        on the uniform flow grid tau_max -> 0 (any count works: the network takes the step length)."""
        n = self.num_steps if num_steps is None else int(num_steps)
        grid = flow_grid(self.tau_max, n).to(noise.device)
        z = self.initial_noise(noise)
        for i in range(n):
            t, r = grid[i].expand(len(z)), grid[i + 1].expand(len(z))
            z = z - _bcast(t - r, z) * self.u(z, r, t, cond)
        return z
