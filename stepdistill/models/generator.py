"""The student: a one- or few-step generator that carries its trained timesteps."""

from __future__ import annotations

import copy

import torch

from ..sampling import ddim_step, initial_noise_scale
from ..schedules import NoiseSchedule
from ..trainers import randomness as rnd
from .adapters import adapter_active, add_lora
from .conditioning import Cond
from .denoiser import Denoiser, _unwrap
from .teacher import Teacher

SAMPLERS = ("consistency", "ddim")


def with_guidance_embedding(net, dim: int):
    """A copy of ``net`` that takes ``timestep_cond`` = embed(w) (zero-initialised projection)."""
    name = type(net).__name__
    if name == "UNet2DModel":
        from .guided_unet import GuidedUNet2DModel

        return GuidedUNet2DModel.from_unet(net, dim)
    if name == "UNet2DConditionModel":
        from diffusers import UNet2DConditionModel

        if getattr(net.config, "time_cond_proj_dim", None):
            raise ValueError(f"the teacher already has time_cond_proj_dim={net.config.time_cond_proj_dim}")
        new = UNet2DConditionModel.from_config(net.config, time_cond_proj_dim=dim)
        missing, unexpected = new.load_state_dict(net.state_dict(), strict=False)
        if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
            raise RuntimeError(f"weights do not transfer: missing {missing}, unexpected {unexpected}")
        torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
        return new.to(device=net.device, dtype=net.dtype)
    raise ValueError(f"a guidance-scale embedding is supported for UNet2DModel and UNet2DConditionModel, not {name}")


def guidance_projection_params(net) -> list:
    """The parameters of a w-conditioned network's guidance projection (``time_embedding.cond_proj``; none for
    a network without one)."""
    emb = getattr(_unwrap(net), "time_embedding", None)
    proj = getattr(emb, "cond_proj", None)
    return list(proj.parameters()) if proj is not None else []


class TeacherAnchor:
    """A network initialised from a teacher's weights whose output is read as another prediction type,
    exactly: ``raw = net(x_t, t) + w * (convert(teacher(x_t, t), T -> P) - teacher(x_t, t))``
    (:meth:`~stepdistill.schedules.NoiseSchedule.reinterpretation_offset`). With w = 1 and the net equal to
    the teacher, raw is the teacher's prediction written as a P output: the student starts as the teacher,
    and the error of its own output reaches x0 with P's amplification (v: ~1) instead of T's (eps at DDPM's
    timestep 999: 157x). ``anchor_weight`` (a callable, None = always 1) ramps w down to 0 for a student
    that is exported as a network alone; a fake score keeps it at 1. The teacher's pass carries input
    gradients when x_t does (SiD / SIM differentiate the fake score's output w.r.t. x_t)."""

    anchor_weight = None

    @property
    def anchor(self):
        """The Teacher the weights came from (None: the output is read as is); kept out of the module tree
        (not a submodule: its weights are not the student's)."""
        return self.__dict__.get("_anchor")

    def set_anchor(self, teacher, weight=None):
        """(nn.Module's ``__setattr__`` would register the teacher as a submodule: hence a method.)"""
        self.__dict__["_anchor"] = teacher
        self.anchor_weight = weight

    def reinterpret(self, teacher, prediction_type: str, weight=None):
        """Read this network's output as ``prediction_type``, anchored to ``teacher`` with ``weight``."""
        pred = self.schedule.check_prediction_type(prediction_type)
        self.prediction_type = pred
        self.set_anchor(teacher if pred != teacher.prediction_type else None, weight)
        return self

    def anchor_weight_now(self) -> float:
        if self.anchor is None:
            return 0.0
        return 1.0 if self.anchor_weight is None else float(self.anchor_weight())

    def _anchored(self, out, x_t, t, kwargs):
        w = self.anchor_weight_now()
        if w <= 0:
            return out
        teacher = self.anchor
        if not teacher.w_conditioned:  # a w-embedding student starts as the teacher without one
            kwargs = {k: v for k, v in kwargs.items() if k != "timestep_cond"}
        ref = teacher._forward(x_t, t, kwargs)
        offset = self.schedule.reinterpretation_offset(ref, x_t, t, teacher.prediction_type, self.prediction_type)
        return out + (w * offset).to(out.dtype)


class Generator(TeacherAnchor, Denoiser):
    """``generator(x_t, cond, t)`` returns x0 (with gradients); ``sample(noise, cond)`` runs the trained
    few-step chain.

    Args:
        timesteps: continuous times of the trained steps, noisiest first (e.g. ``[1.0]`` for one step, or
            DMD2's 4-step ``[999, 749, 499, 249] / 999``); export writes them into the pipeline.
        sampler: ``"consistency"`` (predict x0, re-noise with fresh noise to the next time: DMD2 / LCM) or
            ``"ddim"`` (deterministic DDIM between the times: progressive distillation).
    """

    adapter_name: str | None = None
    input_scale: float = 1.0  # SiD-LSG: the first input is add_noise(0, z, t0) = sigma(t0) z, not z

    def __init__(
        self,
        net,
        schedule: NoiseSchedule,
        prediction_type: str,
        *,
        timesteps=(1.0,),
        sampler: str = "consistency",
        **kw,
    ):
        super().__init__(net, schedule, prediction_type, **kw)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown generator sampler {sampler!r}; expected one of {SAMPLERS}")
        ts = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
        if len(ts) == 0 or (ts < 0).any() or (ts > 1).any() or (ts[1:] >= ts[:-1]).any():
            raise ValueError(f"generator timesteps must be decreasing continuous times in [0, 1], got {ts.tolist()}")
        self.timesteps = ts
        self.sampler = sampler

    @classmethod
    def from_teacher(
        cls,
        teacher: Teacher,
        mode: str = "full",
        *,
        timesteps=(1.0,),
        sampler="consistency",
        lora_rank: int = 64,
        lora_alpha=None,
        adapter_name: str = "generator",
        target_modules=None,
        w_embedding_dim: int = 0,
    ) -> "Generator":
        """Initialise the student from the teacher's weights: a full trainable copy, or a LoRA adapter on
        the teacher's network (the teacher then runs with adapters off). ``w_embedding_dim > 0`` gives a full
        student a guidance-scale input (``time_cond_proj_dim``; the new projection starts at zero, so the
        student starts as the teacher). With a LoRA student the projection is added to the shared base (the
        teacher's net is replaced by its w-conditioned version, which the teacher runs without the guidance
        input, i.e. as before) and trains as a full parameter beside the adapter
        (:func:`guidance_projection_params`; LoRA-enhanced guided distillation)."""
        if mode == "full":
            net = copy.deepcopy(_unwrap(teacher.net))
            if w_embedding_dim and teacher.w_embedding_dim != w_embedding_dim:
                net = with_guidance_embedding(net, w_embedding_dim)
            net = net.requires_grad_(True).train()
            return cls(
                net,
                teacher.schedule,
                teacher.prediction_type,
                timesteps=timesteps,
                sampler=sampler,
                cfg_convention=teacher.cfg_convention,
            )
        if mode != "lora":
            raise ValueError(f"generator mode must be 'full' or 'lora', got {mode!r}")
        net = _unwrap(teacher.net)
        if w_embedding_dim and teacher.w_embedding_dim != w_embedding_dim:
            net = with_guidance_embedding(net, w_embedding_dim).eval().requires_grad_(False)
            teacher.replace_net(net)  # one copy of the weights: the teacher never passes the guidance input
        add_lora(net, lora_rank, lora_alpha, adapter_name=adapter_name, target_modules=target_modules)
        for p in guidance_projection_params(net):
            p.requires_grad_(True)
        teacher.shares_base = True
        gen = cls(
            net,
            teacher.schedule,
            teacher.prediction_type,
            timesteps=timesteps,
            sampler=sampler,
            cfg_convention=teacher.cfg_convention,
        )
        gen.adapter_name = adapter_name
        return gen

    def _forward(self, x_t, t, kwargs):
        if self.adapter_name is None:
            out = super()._forward(x_t, t, kwargs)
        else:
            with adapter_active(_unwrap(self.net), self.adapter_name):
                out = super()._forward(x_t, t, kwargs)
        return self._anchored(out, x_t, t, kwargs)

    def with_net(self, net) -> "Generator":
        """A generator of the same type, times, sampler and anchor on another network (an EMA target copy)."""
        other = Generator(
            net,
            self.schedule,
            self.prediction_type,
            timesteps=self.timesteps,
            sampler=self.sampler,
            cfg_convention=self.cfg_convention,
        )
        other.set_anchor(self.anchor, self.anchor_weight)
        other.input_scale = self.input_scale
        return other

    def forward(self, x_t: torch.Tensor, cond: Cond | None = None, t=None, guidance_scale=None) -> torch.Tensor:
        """x0 predicted from x_t at time t (default: the first trained time)."""
        if t is None:
            t = self.timesteps[0]
        return self.predict(x_t, t, cond, target="x0", guidance_scale=guidance_scale)

    def initial_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * (initial_noise_scale(self.schedule, self.timesteps[0]) * self.input_scale)

    @torch.no_grad()
    def sample(
        self,
        noise: torch.Tensor,
        cond: Cond | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        guidance_scale=None,
    ) -> torch.Tensor:
        """Run the first ``num_steps`` (default all) trained steps from ``noise`` ~ N(0, I)."""
        n = len(self.timesteps) if num_steps is None else num_steps
        if not 1 <= n <= len(self.timesteps):
            raise ValueError(f"num_steps must be in [1, {len(self.timesteps)}] for this generator, got {n}")
        ts = self.timesteps[:n]
        x = self.initial_noise(noise)
        for i in range(n):
            t = ts[i].expand(x.shape[0])
            x0 = self.predict(x, t, cond, target="x0", guidance_scale=guidance_scale)
            if i + 1 == n:
                return x0
            t_next = ts[i + 1].expand(x.shape[0])
            if self.sampler == "consistency":
                z = rnd.randn(
                    x.shape,
                    generator=generator,
                    dtype=x.dtype,
                    device=generator.device if generator is not None else x.device,
                ).to(x.device)
                x = self.schedule.add_noise(x0, z, t_next)
            else:
                eps = self.schedule.to_x0_eps(x0, x, t, "x0")[1]
                x = ddim_step(self.schedule, x0, eps, t, t_next)
        return x
