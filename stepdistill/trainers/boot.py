"""BOOT: data-free distillation by bootstrapping (Gu et al., "BOOT: Data-free Distillation of Denoising Diffusion
Models with Bootstrapping", arXiv 2306.05544; ICML 2024).

The student g(eps, t) never sees a noisy image: from a noise sample eps alone it predicts the *signal*
y_t = (x_t - sigma_t eps) / alpha_t of the point x_t at time t on the teacher's deterministic (DDIM) trajectory that
starts from eps. y follows the Signal-ODE dy/dt = -lambda'(t) (f(x_t, t) - y), lambda = log(sigma / alpha), f the
teacher's x0 prediction (with CFG); with f frozen over one step it is solved exactly by a DDIM step written in y:

    y_s = y_t + delta_ts (f(x_t, t) - y_t),   delta_ts = 1 - (sigma_s alpha_t) / (alpha_s sigma_t),   s < t.

Training bootstraps along a grid t_0 > t_1 > ... > t_{N-1} > clean (the teacher's trailing DDIM grid): for a
step t = t_i -> s = t_{i+1},

    y^_t = sg g(eps, t),  x^_t = alpha_t y^_t + sigma_t eps,  y*_s = sg[y^_t + delta (f(x^_t, t) - y^_t)]
    L_BS = mean_b (1 / delta_b^2) mean ||g(eps, s) - y*_s||^2        (the last step lands on x0: delta = 1)
    L_BC = mean ||g(eps, t_0) - f(eps, t_0)||^2                       (the boundary at the noise end)
    L    = L_BS + boundary_weight * L_BC

Sampling is ONE network call: x0 = y_clean = g(eps, t = 0). No images are read (class labels or prompts only),
no EMA target, no fake score. Cost per iteration: the student twice (once without gradients) on the batch
and once more with gradients at t_0 for L_BC (the two gradient passes run as one batch of 2B), the teacher once
on a batch of 2B (4B with CFG).

The student network is the teacher's (a full copy or a LoRA), fed eps and the time t; its raw output is read as
``student_prediction`` at the grid's top time t_0 with x = eps: y = convert(raw, x=eps, t_0). With the teacher's
own type ("auto", except for eps teachers: v), g(eps, t_0) = f(eps, t_0) holds exactly at initialisation (without
CFG).

Example::

    stepdistill train --config recipes/boot/digits.yaml
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..data.validate import dataset_kind
from ..models import Generator
from ..schedules import _bcast
from . import randomness as rnd
from .base import NetSpec
from .student import StudentConfig, StudentTrainer, is_object_label

WEIGHTINGS = ("inv_delta_sq", "constant")


# ------------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------------
def boot_delta(alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """Step size of the Signal-ODE's exact DDIM step from t to s < t (Gu et al. 2023, Sec. 3.1; 1 - e^(lambda_s -
    lambda_t) with lambda = log(sigma / alpha)): delta = 1 - (sigma_s alpha_t) / (alpha_s sigma_t). 1 onto clean
    data (sigma_s = 0) and from the zero-SNR end (alpha_t = 0)."""
    return 1.0 - (sigma_s * alpha_t) / (alpha_s * sigma_t)


def boot_target(y_t: torch.Tensor, f: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The bootstrapped target y*_s = y_t + delta (f - y_t) (Gu et al. 2023, eq. of L_BS): one teacher DDIM step in
    signal space from the student's own y_t; ``delta`` (B,). Callers pass detached tensors."""
    return y_t + _bcast(delta.to(y_t.dtype), y_t) * (f - y_t)


def boot_loss(y_s: torch.Tensor, target: torch.Tensor, delta: torch.Tensor, weighting: str = "inv_delta_sq"):
    """BOOT's bootstrapping loss (Gu et al. 2023, L_BS): mean_b w_b mean_{C,H,W} (y_s - y*_s)^2 with w = 1 / delta^2
    ("inv_delta_sq": the residual of the Signal-ODE per unit of lambda) or 1 ("constant")."""
    if y_s.shape != target.shape:
        raise ValueError(f"student shape {tuple(y_s.shape)} != target shape {tuple(target.shape)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown BOOT weighting {weighting!r}; expected one of {WEIGHTINGS}")
    err = ((y_s.float() - target.float()) ** 2).reshape(y_s.shape[0], -1).mean(dim=1)
    if weighting == "constant":
        return err.mean()
    return (err / delta.to(err).pow(2)).mean()


# ------------------------------------------------------------------------------------------------------
# the student: noise and a time in, the signal y_t out
# ------------------------------------------------------------------------------------------------------
class BootGenerator(Generator):
    """``g(eps, t)``: the teacher's network (or a LoRA on it) called on the noise ``eps`` at time t; its raw output
    is read as ``prediction_type`` at the reference time ``t_ref`` (the grid's top) with x = eps, giving y_t.
    ``sample(noise)`` is one call at the trained time (t = 0: y_0 = x0)."""

    t_ref: float = 1.0

    def predict(self, x_t, t, cond=None, *, target="x0", guidance_scale=None, float64=False):
        """The signal y_t = g(eps = x_t, t) (``target`` must be "x0": y is BOOT's x0-like output)."""
        if target != "x0":
            raise ValueError(f"a BOOT student predicts the signal y_t (target 'x0'), not {target!r}")
        out = self.raw(x_t, t, cond, guidance_scale)
        dtype = torch.float64 if float64 else out.dtype
        ref = torch.full((x_t.shape[0],), self.t_ref, dtype=torch.float64)
        y = self.schedule.convert(out.to(dtype), x_t.to(dtype), ref, self.prediction_type, "x0")
        return y if float64 else y.to(x_t.dtype)

    @torch.no_grad()
    def sample(self, noise, cond=None, num_steps=None, generator=None, guidance_scale=None):
        """x0 = g(noise, t) at the trained time (one network evaluation)."""
        if num_steps not in (None, 1):
            raise ValueError(f"a BOOT student samples in one step, got num_steps={num_steps}")
        return self.predict(noise, self.timesteps[0].expand(noise.shape[0]), cond, guidance_scale=guidance_scale)


# ------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------
@dataclass
class BOOTConfig(StudentConfig):
    """BOOT settings. Teacher, data, LoRA, memory and export keys:
    :class:`~stepdistill.trainers.student.StudentConfig` (``dataset``: class labels ("digits") or a prompt file;
    image folders are refused: BOOT is data-free).

    > Bootstrapping
    num_steps (`int`, `50`): N, the teacher's trailing DDIM grid the student bootstraps along (t and s are
        neighbours on it; the last step lands on clean data). Not published for the paper's runs; a finer grid
        follows the ODE more closely but needs more bootstrapping generations to carry the boundary to the data.
    weighting (`str`, `"inv_delta_sq"`): "inv_delta_sq" (1 / delta^2, as in the paper's L_BS) or "constant".
    boundary_weight (`float`, `1.0`): lambda_BC on L_BC = ||g(eps, t_0) - f(eps, t_0)||^2 (0: off, no extra pass).
    guidance_scale (`float`, `1.0`): classifier-free guidance of the teacher in the targets (uncond + w (cond -
        uncond)); the student is unguided (one evaluation per sample).
    student_prediction (`str`, `"auto"`): how the student's raw output is read at t_0 with x = eps: "auto" = the
        teacher's type (then g(eps, t_0) = f(eps, t_0) at initialisation), except that an eps teacher gets a v
        student (eps read at t_0 divides the network's error by alpha(t_0), 0.0064 on a linear 1000-step schedule:
        a 500-step toy run with such a teacher ended 15x above the sampling-noise floor reading eps, 1.2x reading
        v); or "x0", "v", "eps".
    learning_rate (`float`, `1e-4`).
    """

    num_steps: int = 50
    weighting: str = "inv_delta_sq"
    boundary_weight: float = 1.0
    guidance_scale: float = 1.0
    student_prediction: str = "auto"
    learning_rate: float = 1e-4

    def check(self):
        super().check()
        if self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1 (the bootstrapping grid), got {self.num_steps}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.boundary_weight < 0:
            raise ConfigError(f"boundary_weight must be >= 0, got {self.boundary_weight}")
        if self.student_prediction not in ("auto", "x0", "sample", "v", "v_prediction", "eps", "epsilon"):
            raise ConfigError(f"student_prediction must be auto, x0, v or eps, got {self.student_prediction!r}")


# ------------------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------------------
class BOOTTrainer(StudentTrainer):
    """BOOT on the shared loop: hooks only."""

    config_class = BOOTConfig
    method_name = "BOOT"
    export_scheduler = "ddim"  # one deterministic step; the scheduler itself comes from export_scheduler_for

    def validate(self):
        c = self.config
        kind = None if self.dataset_object is not None or is_object_label(c.dataset) else dataset_kind(c.dataset)
        if kind in ("images", "latents") or (kind == "stream" and c.image_key != "none"):
            what = {"images": "an image folder", "latents": "a latent cache"}.get(kind, "a streamed image dataset")
            raise ConfigError(
                f"dataset: {c.dataset!r} is {what}, but BOOT is data-free: it reads class labels or prompts only; "
                "give a prompt file (.txt / .jsonl), 'digits' (the bundled labels) or, for a stream, image_key: none"
            )
        super().validate()

    def build(self):
        c = self.config
        self.build_teacher()
        if self.schedule.kind != "vp":
            raise ConfigError(
                f"teacher: BOOT here supports discrete VP teachers (DDPM / DDIM schedules), not a {self.schedule.kind} "
                "schedule"
            )
        T = self.schedule.num_train_timesteps
        grid = self.schedule.timesteps(c.num_steps, "trailing")
        if float(self.schedule.t_to_timestep(grid[-1])) < 0.5:
            raise ConfigError(
                f"num_steps={c.num_steps}: the trailing grid reaches timestep 0, which BOOT keeps for the clean end; "
                f"use fewer steps (e.g. {T // 2})"
            )
        if c.guidance_scale != 1.0:
            self.require_guidance("guidance_scale", c.guidance_scale)
        # the student's times: the grid, then the clean end (t = 0, read with alpha = 1, sigma = 0)
        self.times = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
        base = self.make_generator([0.0], sampler="ddim")
        pred = c.student_prediction
        if pred == "auto":  # eps read at the noise end is x0 = (eps - sigma raw) / alpha: errors grow by 1 / alpha
            pred = "v" if self.teacher.prediction_type == "eps" else self.teacher.prediction_type
        gen = BootGenerator(
            base.net,
            self.schedule,
            pred,
            timesteps=base.timesteps,
            sampler=base.sampler,
            cfg_convention=base.cfg_convention,
        )
        gen.adapter_name = base.adapter_name
        gen.t_ref = float(grid[0])
        self.generator = gen

    def networks(self):
        return {"generator": NetSpec(self.generator.net, params=self.generator_params())}

    def on_prepared(self):
        self.generator.net = self.specs["generator"].module

    # ---------------------------------------------------------------- the loss
    def coefficients(self, idx: torch.Tensor):
        """(alpha, sigma) at the student's times ``self.times[idx]``; the clean end is exactly (1, 0)."""
        t = self.times[idx]
        clean = idx == len(self.times) - 1
        a = torch.where(clean, torch.ones_like(t), self.schedule.alpha(t))
        s = torch.where(clean, torch.zeros_like(t), self.schedule.sigma(t))
        return t, a, s

    @torch.no_grad()
    def bootstrap_targets(self, eps, i, cond, boundary: bool = False):
        """For the steps ``times[i] -> times[i + 1]`` from noise ``eps``: (s, y*_s, delta, f_top). y^_t = g(eps, t)
        rebuilt into x^_t = alpha_t y^_t + sigma_t eps, one teacher DDIM step in signal space; ``boundary`` also
        returns the teacher's f(eps, t_0) (one batched teacher call for both), else f_top is None."""
        c = self.config
        t, a_t, s_t = self.coefficients(i)
        s, a_s, s_s = self.coefficients(i + 1)
        delta = boot_delta(a_t, s_t, a_s, s_s).to(eps.device)
        y_t = self.generator.predict(eps, t, cond, float64=True)
        x_t = (_bcast(a_t, y_t) * y_t + _bcast(s_t, y_t) * eps.double()).to(eps.dtype)
        if boundary:
            top = self.times[:1].expand(len(eps))
            both = (torch.cat([x_t, eps]), torch.cat([t, top]), _cat_cond(cond))
            f, f_top = self.teacher.predict(*both, guidance_scale=c.guidance_scale, float64=True).chunk(2)
        else:
            f = self.teacher.predict(x_t, t, cond, guidance_scale=c.guidance_scale, float64=True)
            f_top = None
        return s, boot_target(y_t, f, delta).to(eps.dtype), delta, f_top

    def compute_loss(self, batch, phase):
        c = self.config
        cond = self._cond_batch(batch)
        n = len(batch["_n"])
        eps = rnd.randn(n, *self.sample_shape).to(self.accelerator.device)
        i = rnd.randint(len(self.times) - 1, (n,))
        use_bc = c.boundary_weight > 0
        s, target, delta, f_top = self.bootstrap_targets(eps, i, cond, boundary=use_bc)
        if not use_bc:
            loss = boot_loss(self.generator.predict(eps, s, cond), target, delta, c.weighting)
            return {"loss": loss, "loss_bs": loss.detach()}
        top = self.times[:1].expand(n)  # both gradient passes in one batch: g(eps, s) and g(eps, t_0)
        pred, pred_top = self.generator.predict(torch.cat([eps, eps]), torch.cat([s, top]), _cat_cond(cond)).chunk(2)
        loss_bs = boot_loss(pred, target, delta, c.weighting)
        loss_bc = torch.nn.functional.mse_loss(pred_top.float(), f_top.float())
        return {"loss": loss_bs + c.boundary_weight * loss_bc, "loss_bs": loss_bs.detach(), "loss_bc": loss_bc.detach()}

    # ---------------------------------------------------------------- export
    def student_json_extra(self) -> dict:
        """A network-only export (teacher / generator objects): how the one BOOT call reads its output."""
        ref = torch.tensor(self.generator.t_ref, dtype=torch.float64)
        return {
            "sampler": "boot",
            "boot": (
                "x0 = convert(network(z, timestep 0), x = z) from prediction_type to x0 with alpha_ref / sigma_ref "
                "(the grid's top time), z ~ N(0, I): one network evaluation"
            ),
            "alpha_ref": float(self.schedule.alpha(ref)),
            "sigma_ref": float(self.schedule.sigma(ref)),
        }

    def export_scheduler_for(self, sched_cfg: dict):
        """The one-step scheduler of the export: the pipeline calls the network at timestep 0 (the student's clean
        end) and the step reads its output at alpha_bar(t_0) with x = noise, landing on x0. A DDIMScheduler with
        one training timestep whose alpha_bar is the teacher's at t_0 (trained_betas) does exactly that."""
        return boot_scheduler(sched_cfg, float(self.schedule.alpha(self.generator.t_ref) ** 2))


def boot_scheduler(sched_cfg: dict, alpha_bar_ref: float):
    """DDIMScheduler(num_train_timesteps=1, trained_betas=[1 - alpha_bar_ref]): ``set_timesteps(1)`` gives [0],
    ``step`` converts the output of ``prediction_type`` at alpha_bar_ref and returns x0 (set_alpha_to_one). diffusers
    keeps betas in float32: an alpha_bar_ref below ~6e-8 (the cosine schedule's 2.4e-9 at 999) becomes 0, which moves
    x0 by alpha_ref * noise (5e-5 there)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1,
        trained_betas=[1.0 - alpha_bar_ref],
        prediction_type=sched_cfg.get("prediction_type", "epsilon"),
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,  # unused by trailing spacing; 1 keeps StableDiffusionPipeline from calling it outdated
    )


def _cat_cond(cond):
    """The condition of a doubled batch [x; x]."""
    return None if cond is None else cond.index(torch.arange(len(cond)).repeat(2))
