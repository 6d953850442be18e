"""The consistency family: LCM / consistency distillation (full and LoRA), multiphase (PCM / TSCD), iCT / ECT.

One config, one trainer; ``mode`` chooses the method:

* ``lcm``: consistency distillation as LCM trains it (Luo et al. 2023; Song et al. 2023 for CD). A solver grid of
  ``num_ddim_timesteps`` points (skip step k = T / N on a discrete teacher); per sample an index n, the student
  f_theta(x_{t_n}, t_n) and the target sg f_target(x_hat_{t_{n-1}}, t_{n-1}), where x_hat is one teacher ODE step
  (DDIM for VP teachers, Heun / Euler for EDM and flow teachers) with classifier-free guidance w ~ U[w_min, w_max]
  (a w-embedding input for full students). f = c_skip x + c_out x0_hat, c_skip / c_out from LCM's
  timestep_scaling form (VP teachers) or CD's sigma_min form (EDM teachers). The target network is an EMA of the
  student (decay 0.95), or the student itself under no_grad (decay 0: a stop-gradient copy; LCM-LoRA, whose
  teacher is the same network with its adapters off, so one copy of the base weights is held).
* ``multiphase``: trajectory-segmented consistency distillation (PCM, Wang et al. 2024; Hyper-SD's TSCD): the time
  axis is cut into M segments at the trailing DDIM grid of M steps, whose points must be solver-grid points (the
  sampler's steps start there); student and target predict the DDIM jump to their segment's start (the lowest
  segment's to t = 0), the target is the solver result itself on the segment edge; ``multiphase: [8, 4, 2, 1]``
  with ``multiphase_steps`` runs the segment counts as successive stages. Exported as a deterministic
  trailing-DDIM (or TCD) pipeline with M steps.
* ``ict`` / ``ect``: consistency training without a teacher ODE step (Song & Dhariwal 2023; Geng et al. 2024):
  x_t and x_r share the noise of a real sample, the target is sg f(x_r, r); iCT's lognormal index over a Karras
  grid whose size doubles (N(k) = min(s0 2^floor(k / K'), s1) + 1), weight 1 / (sigma_{i+1} - sigma_i),
  pseudo-Huber c = 0.00054 sqrt(d), random initialisation; ECT's r(t) = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))),
  weight 1 / (t - r), L2 norm, f = the plain denoiser (no boundary form), target the clean sample where r = 0,
  initialised from the teacher.

Guidance scales are in stepdistill's (diffusers') convention out_u + w (out_c - out_u): LCM's scripts sample
w_LCM in [5, 15] (SD) / [3, 15] (SDXL) with out_c + w_LCM (out_c - out_u), i.e. w = w_LCM + 1: [6, 16] / [4, 16].

Example::

    stepdistill train --config recipes/consistency/digits_lcm.yaml
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from ..losses import consistency_loss, hinge_discriminator_loss, hinge_generator_loss, ict_huber_c
from ..models.denoiser import Denoiser, _unwrap
from ..sampling import cd_scalings, consistency_sample, ddim_step, heun_step, lcm_scalings
from ..schedules import _bcast
from . import randomness as rnd
from .base import NetSpec
from .pcm_adversarial import (
    DISCRIMINATOR_BETAS,
    DISCRIMINATOR_WEIGHT_DECAY,
    EncoderDiscriminatorHeads,
    encoder_features,
    renoise,
    supports_encoder_features,
)
from .student import StudentConfig, StudentTrainer

MODES = ("lcm", "multiphase", "ict", "ect")
SOLVERS = ("auto", "ddim", "euler", "heun")
BOUNDARIES = ("auto", "lcm", "edm", "none")
LOSSES = ("auto", "l2", "huber", "pseudo_huber")


@dataclass
class ConsistencyConfig(StudentConfig):
    """Consistency-family settings (defaults from the official code unless noted; "auto" values depend on the
    mode and on the teacher's schedule kind).

    Teacher, data, generator mode (full / LoRA) and export keys: :class:`~stepdistill.trainers.student.StudentConfig`.

    > Method
    mode (`str`, `"lcm"`): "lcm" (consistency distillation), "multiphase" (PCM / TSCD), "ict", "ect".
    > Solver grid (lcm, multiphase)
    num_ddim_timesteps (`int`, `0`: 50, LCM's default, or T / skip_step): solver steps N over the teacher's time.
    skip_step (`int`, `0`: T / num_ddim_timesteps): LCM's k, discrete teachers only; must divide T.
    solver (`str`, `"auto"`): "ddim" (VP teachers; LCM), "euler", "heun" (EDM teachers; CD); auto picks those,
        and "euler" for flow teachers. DDIM and Euler are the same update written in (x0, eps).
    > Guidance (uncond + w (cond - uncond); w = 1 is no guidance)
    w_min / w_max (`float`, `1.0`): the teacher's CFG scale per sample, w ~ U[w_min, w_max] (LCM: [6, 16] SD,
        [4, 16] SDXL in this convention).
    w_embedding_dim (`int`, `0`: none): a guidance-scale input for full students (LCM's time_cond_proj_dim 256).
    guidance_scale (`float | None`, `None`: (w_min + w_max) / 2): the default scale of an exported
        w-conditioned student.
    > Consistency function
    boundary (`str`, `"auto"`): "lcm" (c_skip = s_d^2 / ((10 t)^2 + s_d^2), c_out = 10 t / sqrt((10 t)^2 + s_d^2),
        discrete t; VP teachers), "edm" (CD's sigma_min form on the EDM output; EDM teachers), "none" (x0 itself:
        the plain denoiser; flow teachers, where x0 = x_t at t = 0 already, and ECT, whose f is the EDM
        denoiser D(x, t)). auto: none for ect, else lcm / edm / none by the teacher's schedule.
    timestep_scaling (`float`, `10.0`).
    sigma_data (`float`, `0.5`): the data's standard deviation: in the lcm / edm boundaries, and for ect the
        scale of the noise levels (ECT's lognormal(-1.1, 2.0) is set for data of std 0.5; its levels are
        multiplied by sigma_data / 0.5). For data of another scale set it to the training data's (latents')
        standard deviation.
    target_ema_decay (`float | None`, `None`): EMA decay of the target network; None = 0.95 for full lcm /
        multiphase students (LCM, CD), 0 (the student under no_grad: a stop-gradient copy) for LoRA students
        (LCM-LoRA), iCT and ECT.
    > Loss
    loss (`str`, `"auto"`): "l2", "huber" (element-wise, LCM), "pseudo_huber" (per sample, iCT / ECT); auto: l2
        for lcm / multiphase (LCM's script default; its README uses huber), pseudo_huber for ict / ect.
    huber_c (`float | str`, `"auto"`): c of the Huber losses; "ict" = 0.00054 sqrt(d); auto: 0.001 (LCM) for
        huber, "ict" for ict, 0 for ect.
    > Multiphase (PCM / TSCD)
    multiphase (`list[int]`, `[4]`): segment counts, one per stage (e.g. [8, 4, 2, 1]).
    multiphase_steps (`list[int]`, `[]`): iterations of each stage (sum = max_steps); empty for one stage.
    multiphase_scheduler (`str`, `"ddim"`): exported scheduler, "ddim" (trailing) or "tcd".
    adv_weight (`float`, `0.0`: off): PCM's adversarial loss (its SDXL script: 0.1): heads on the frozen teacher's
        encoder features judge the re-noised consistency target (real) against the student's jump (fake) with
        hinge losses; even iterations update the discriminator, odd ones the student (consistency +
        adv_weight x its hinge term). See :mod:`stepdistill.trainers.pcm_adversarial`. Multiphase, VP UNet
        teachers.
    adv_lr (`float`, `1e-5`): the discriminator heads' learning rate (PCM's; AdamW betas (0, 0.999), wd 1e-3).
    > Consistency training (ict, ect)
    init (`str`, `"auto"`): "teacher" weights or "scratch" (random); auto: scratch for ict, teacher otherwise.
    p_mean / p_std (`float`, `-1.1` / `2.0`): lognormal noise levels (iCT, ECT).
    rho (`float`, `7.0`): Karras grid exponent (iCT).
    ict_s0 / ict_s1 (`int`, `10` / `1280`): iCT's discretisation curriculum.
    ect_q / ect_k / ect_b (`float`, `2.0` / `8.0` / `1.0`): ECT's r(t) schedule; ect_double_every (`int`, `0`:
        max_steps // 8): iterations per ECT stage (ECT counts it in training ticks: not converted).
    > Sampling and export
    inference_steps (`int`, `4`): steps of the exported pipeline: LCMScheduler's choice of grid points for lcm
        (4 of 50: [999, 759, 499, 259]); the trailing grid for ict / ect; multiphase: the last stage's M.
    > Optimisation (LCM scripts: AdamW, wd 0.01 (README runs 0), clip 1.0, constant LR with warm-up)
    """

    mode: str = "lcm"
    num_ddim_timesteps: int = 0
    skip_step: int = 0
    solver: str = "auto"
    w_min: float = 1.0
    w_max: float = 1.0
    w_embedding_dim: int = 0
    guidance_scale: float | None = None
    boundary: str = "auto"
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    target_ema_decay: float | None = None
    loss: str = "auto"
    huber_c: float | str = "auto"
    multiphase: list[int] = field(default_factory=lambda: [4])
    multiphase_steps: list[int] = field(default_factory=list)
    multiphase_scheduler: str = "ddim"
    adv_weight: float = 0.0
    adv_lr: float = 1e-5
    init: str = "auto"
    p_mean: float = -1.1
    p_std: float = 2.0
    rho: float = 7.0
    ict_s0: int = 10
    ict_s1: int = 1280
    ect_q: float = 2.0
    ect_k: float = 8.0
    ect_b: float = 1.0
    ect_double_every: int = 0
    inference_steps: int = 4
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0

    def check(self):
        super().check()
        for key, value, valid in (
            ("mode", self.mode, MODES),
            ("solver", self.solver, SOLVERS),
            ("boundary", self.boundary, BOUNDARIES),
            ("loss", self.loss, LOSSES),
            ("multiphase_scheduler", self.multiphase_scheduler, ("ddim", "tcd")),
            ("init", self.init, ("auto", "teacher", "scratch")),
        ):
            if value not in valid:
                raise ConfigError(f"{key} must be one of {valid}, got {value!r}")
        if self.w_min > self.w_max:
            raise ConfigError(f"w_min={self.w_min} > w_max={self.w_max}: the guidance range must be w_min <= w_max")
        if self.w_min < 0:
            raise ConfigError(f"w_min must be >= 0, got {self.w_min}")
        if self.w_embedding_dim and self.generator_mode == "lora":
            raise ConfigError(
                f"w_embedding_dim={self.w_embedding_dim} with generator_mode=lora: a guidance-scale embedding needs "
                "new weights (a time_cond_proj_dim projection) that a LoRA on the frozen base cannot add; set "
                "w_embedding_dim: 0 (LCM-LoRA distils the guidance range [w_min, w_max] into the LoRA) or use "
                "generator_mode: full"
            )
        if self.w_embedding_dim < 0 or 0 < self.w_embedding_dim < 4:
            raise ConfigError(f"w_embedding_dim must be 0 (off) or >= 4, got {self.w_embedding_dim}")
        if self.num_ddim_timesteps < 0 or self.skip_step < 0:
            raise ConfigError(
                f"num_ddim_timesteps and skip_step must be >= 0, got {self.num_ddim_timesteps}, {self.skip_step}"
            )
        if self.target_ema_decay is not None and not 0.0 <= self.target_ema_decay < 1.0:
            raise ConfigError(f"target_ema_decay must be in [0, 1), got {self.target_ema_decay}")
        if self.generator_mode == "lora" and self.target_ema_decay:
            raise ConfigError(
                f"target_ema_decay={self.target_ema_decay} with generator_mode=lora: LCM-LoRA's target is the same "
                "LoRA network under no_grad (no EMA copy of the shared base); set target_ema_decay: 0"
            )
        if self.ema_decay > 0 and self.generator_mode == "lora":
            raise ConfigError(
                "ema_decay > 0 with generator_mode=lora is not supported (the EMA would cover the whole base "
                "network); use ema_decay: 0.0 or a full generator"
            )
        if isinstance(self.huber_c, str) and self.huber_c not in ("auto", "ict"):
            raise ConfigError(f"huber_c must be a number, 'ict' (0.00054 sqrt(d)) or 'auto', got {self.huber_c!r}")
        if not isinstance(self.huber_c, str) and self.huber_c < 0:
            raise ConfigError(f"huber_c must be >= 0, got {self.huber_c}")
        if not self.multiphase or min(self.multiphase) < 1:
            raise ConfigError(f"multiphase must be a non-empty list of segment counts >= 1, got {self.multiphase}")
        if self.mode == "multiphase":
            steps = self.multiphase_steps
            if len(self.multiphase) > 1 or steps:
                if len(steps) != len(self.multiphase) or min(steps, default=0) < 1 or sum(steps) != self.max_steps:
                    raise ConfigError(
                        f"multiphase_steps={steps} must give the iterations of each stage of multiphase="
                        f"{self.multiphase} (one positive count per stage) and sum to max_steps={self.max_steps}"
                    )
        if self.adv_weight < 0 or self.adv_lr <= 0:
            raise ConfigError(f"need adv_weight >= 0 and adv_lr > 0, got {self.adv_weight}, {self.adv_lr}")
        if self.adv_weight > 0 and self.mode != "multiphase":
            raise ConfigError(
                f"adv_weight={self.adv_weight} with mode={self.mode}: PCM's adversarial loss re-noises from the "
                "segment starts of mode: multiphase"
            )
        if self.inference_steps < 1:
            raise ConfigError(f"inference_steps must be >= 1, got {self.inference_steps}")
        if self.init == "scratch" and self.generator_mode == "lora":
            raise ConfigError("init=scratch with generator_mode=lora: a LoRA needs the pretrained base; use full")
        if self.init == "scratch" and self.mode in ("lcm", "multiphase"):
            raise ConfigError(f"init=scratch with mode={self.mode}: distillation starts from the teacher's weights")
        if self.ict_s0 < 1 or self.ict_s1 < self.ict_s0:
            raise ConfigError(f"need 1 <= ict_s0 <= ict_s1, got ict_s0={self.ict_s0}, ict_s1={self.ict_s1}")
        if self.p_std <= 0 or self.rho <= 0 or self.ect_q <= 1:
            raise ConfigError(f"need p_std > 0, rho > 0, ect_q > 1; got {self.p_std}, {self.rho}, {self.ect_q}")
        if self.dataset.endswith((".txt", ".jsonl")):
            raise ConfigError(
                f"dataset: {self.dataset!r} is a prompt file, but consistency distillation and training noise real "
                "images (latents); use an image folder with captions"
            )


# --------------------------------------------------------------------------------------------------------
# pure helpers: grids, curricula
# --------------------------------------------------------------------------------------------------------


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n noise levels, ascending, (sigma_min^(1/rho) + i / (n - 1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho
    (Karras et al. 2022, eq. 5; iCT's discretisation)."""
    i = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    out = (lo + i * (hi - lo)) ** rho
    out[0], out[-1] = sigma_min, sigma_max  # exact ends (the root and power round)
    return out


def ict_num_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's discretisation curriculum (Song & Dhariwal 2023, eq. 8): N(k) = min(s0 2^floor(k / K'), s1) + 1 with
    K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    k_prime = max(total_steps // (int(math.log2(s1 // s0)) + 1), 1)
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """iCT's probability of the interval [sigma_i, sigma_{i+1}]: proportional to
    erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((ln sigma_i - P_mean) / (sqrt(2) P_std))."""
    e = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    p = (e[1:] - e[:-1]).clamp_min(0)
    if p.sum() <= 0:
        return torch.full_like(p, 1.0 / len(p))
    return p / p.sum()


def ect_r(t: torch.Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT's r(t) (Geng et al. 2024; locuslab/ect ``t_to_r_sigmoid``): r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))),
    clamped at 0; as the stage grows r -> t."""
    ratio = 1 - q ** -(stage + 1) * (1 + k * torch.sigmoid(-b * t))
    return (t * ratio).clamp_min(0)


def _mask(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample boolean (B,) shaped to broadcast against ``like`` (B, ...)."""
    return m.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def lcm_inference_indices(num_grid: int, steps: int) -> list[int]:
    """LCMScheduler's choice of ``steps`` points among ``num_grid`` grid points taken noisiest first:
    floor(linspace(0, num_grid, steps, endpoint=False))."""
    return [int(math.floor(i * num_grid / steps)) for i in range(steps)]


def segment_starts(t: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The start (lower edge) of the multiphase segment of each time: the largest edge strictly below t
    (``edges`` ascending, edges[0] = 0: the lowest segment starts at the boundary)."""
    idx = torch.searchsorted(edges.to(t.device), t, right=False) - 1
    return edges.to(t.device)[idx.clamp_min(0)]


# --------------------------------------------------------------------------------------------------------


class ConsistencyTrainer(StudentTrainer):
    """LCM / CD, LCM-LoRA, multiphase (PCM / TSCD), iCT and ECT on the shared loop: hooks only."""

    config_class = ConsistencyConfig

    @property
    def method_name(self) -> str:  # the model card's tag
        return f"consistency-{self.config.mode}"

    @property
    def adversarial(self) -> bool:
        return self.config.adv_weight > 0

    @property
    def trains_several_networks(self) -> bool:  # the PCM discriminator heads (DeepSpeed check)
        return self.adversarial

    @property
    def find_unused_parameters(self) -> bool:  # alternating student / discriminator updates (DDP)
        return self.adversarial

    # ---------------------------------------------------------------- setup
    def build(self):
        c = self.config
        self.build_teacher()
        sched = self.schedule
        self.kind = sched.kind
        self.pred_type = self.teacher.prediction_type
        auto_boundary = "none" if c.mode == "ect" else {"vp": "lcm", "edm": "edm"}.get(self.kind, "none")
        self.boundary = c.boundary if c.boundary != "auto" else auto_boundary
        if self.boundary == "lcm" and self.kind != "vp":
            raise ConfigError(f"boundary=lcm needs a discrete (VP) teacher, this one is {self.kind}; use edm or none")
        if self.boundary == "edm" and self.kind != "edm":
            raise ConfigError(f"boundary=edm needs an EDM teacher, this one is {self.kind}; use lcm or none")
        self.solver = c.solver if c.solver != "auto" else {"vp": "ddim", "edm": "heun"}.get(self.kind, "euler")
        if not self.dataset.has_images:
            raise ConfigError(f"mode={c.mode} noises real samples; dataset {c.dataset!r} has none")
        distil = c.mode in ("lcm", "multiphase")
        self.w_range = (c.w_min, c.w_max)
        guided = self.w_range != (1.0, 1.0)
        if guided and not distil:
            raise ConfigError(f"w_min / w_max set with mode={c.mode}: consistency training has no teacher to guide")
        if guided:
            self.require_guidance("w_min/w_max", list(self.w_range))
        if c.w_embedding_dim:
            name = type(_unwrap(self.teacher.net)).__name__
            if name not in ("UNet2DModel", "UNet2DConditionModel"):
                raise ConfigError(
                    f"w_embedding_dim={c.w_embedding_dim}: a guidance-scale input is supported for UNet2DModel and "
                    f"UNet2DConditionModel students, not {name}"
                )
        self.metric = c.loss if c.loss != "auto" else ("l2" if distil else "pseudo_huber")
        d = math.prod(self.sample_shape)
        if c.huber_c == "auto":
            self.huber_c = {"lcm": 0.001, "multiphase": 0.001, "ict": ict_huber_c(d), "ect": 0.0}[c.mode]
        else:
            self.huber_c = ict_huber_c(d) if c.huber_c == "ict" else float(c.huber_c)
        self.target_decay = (
            c.target_ema_decay
            if c.target_ema_decay is not None
            else (0.95 if distil and c.generator_mode == "full" else 0.0)
        )
        if distil:
            self.grid = self._solver_grid()
        hi = float(sched.noise_level(1.0))
        if not math.isfinite(hi):  # rectified flow: pure noise at t = 1
            hi = float(sched.noise_level(0.999))
        self.levels = (float(sched.noise_level(0.0)), hi)
        # the stages (multiphase) and the export grid
        if c.mode == "multiphase":
            n_solver = len(self.grid) - 1
            for m in c.multiphase:
                if m > n_solver:
                    raise ConfigError(
                        f"multiphase: {m} segments is more than the {n_solver} solver steps (num_ddim_timesteps); "
                        "use at most one segment per solver step"
                    )
            self.stage_edges = [self._edges(m) for m in c.multiphase]
            self._check_edges_on_grid()
            self.stage_ends = torch.tensor(c.multiphase_steps or [c.max_steps]).cumsum(0).tolist()
            infer = sched.timesteps(c.multiphase[-1], "trailing")
        elif c.mode == "lcm":
            if c.inference_steps > len(self.grid) - 1:
                raise ConfigError(
                    f"inference_steps={c.inference_steps} is more than the {len(self.grid) - 1} solver grid points"
                )
            top_down = self.grid[1:].flip(0)
            infer = top_down[lcm_inference_indices(len(top_down), c.inference_steps)]
        else:
            infer = sched.timesteps(c.inference_steps, "trailing")
        self.export_scheduler = c.multiphase_scheduler if c.mode == "multiphase" else "lcm"
        sampler = "ddim" if c.mode == "multiphase" else "consistency"
        self.generator = self.make_generator(infer, sampler=sampler, w_embedding_dim=c.w_embedding_dim)
        init = c.init if c.init != "auto" else ("scratch" if c.mode == "ict" else "teacher")
        if init == "scratch":
            self._reinitialise(_unwrap(self.generator.net))
            self.generator.set_anchor(None)  # not the teacher's weights: no teacher term
        self.export_guidance_scale = None
        if self.generator.w_conditioned:
            self.export_guidance_scale = float(
                c.guidance_scale if c.guidance_scale is not None else 0.5 * (c.w_min + c.w_max)
            )
        # the target network: an EMA copy (full students), else the student itself under no_grad
        self.target = None
        if self.target_decay > 0:
            net = copy.deepcopy(_unwrap(self.generator.net)).requires_grad_(False)
            self.target = self.generator.with_net(net)  # the student's output type (and teacher term)
        if self.adversarial:
            self.disc_heads = self._build_discriminator()

    def _build_discriminator(self) -> EncoderDiscriminatorHeads:
        """PCM's discriminator heads, one per encoder feature map of the frozen teacher."""
        if self.kind != "vp":
            raise ConfigError(f"adv_weight > 0 needs a discrete (VP) teacher (PCM re-noises); this one is {self.kind}")
        if not supports_encoder_features(self.teacher.net):
            name = type(_unwrap(self.teacher.net)).__name__
            raise ConfigError(
                f"adv_weight > 0 needs a UNet teacher (down blocks, a mid block) for its features, not {name}"
            )
        device = self.accelerator.device
        with torch.no_grad():
            x = torch.zeros(1, *self.sample_shape, device=device)
            feats = encoder_features(self.teacher, x, 0.5, self._cond_batch(self.dataset.example(1)))
        return EncoderDiscriminatorHeads([f.shape[1] for f in feats]).to(device)

    def _reinitialise(self, net):
        """Random weights of the same architecture (iCT trains from scratch); a plain module (a generator
        object) gets each layer's own ``reset_parameters``."""
        if not hasattr(net, "from_config"):
            for m in net.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            return
        fresh = type(net).from_config(net.config)
        net.load_state_dict(fresh.state_dict())

    def _solver_grid(self) -> torch.Tensor:
        """Continuous times g_0 = 0 < g_1 < ... < g_N = 1 of the solver: LCM's DDIM timesteps k i - 1 (and 0) on
        a discrete teacher, N + 1 uniform times otherwise (the Karras grid of an EDM teacher)."""
        return self._grid_of(self._num_solver_steps())

    def _grid_of(self, n: int) -> torch.Tensor:
        """The solver grid of ``n`` steps (see :meth:`_solver_grid`)."""
        if self.kind == "vp":
            k = self.schedule.num_train_timesteps // n
            steps = torch.tensor([0] + [k * i - 1 for i in range(1, n + 1)], dtype=torch.float64)
            return self.schedule.timestep_to_t(steps)
        return torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)

    def _num_solver_steps(self) -> int:
        """N: num_ddim_timesteps, or T / skip_step, validated against the teacher."""
        c = self.config
        T = getattr(self.schedule, "num_train_timesteps", None)
        if self.kind == "vp":
            if c.skip_step:
                if T % c.skip_step:
                    raise ConfigError(
                        f"skip_step={c.skip_step} does not divide the teacher's {T} timesteps; choose a divisor "
                        "(LCM: 20 for T = 1000)"
                    )
                n = T // c.skip_step
                if c.num_ddim_timesteps and c.num_ddim_timesteps != n:
                    raise ConfigError(
                        f"num_ddim_timesteps={c.num_ddim_timesteps} and skip_step={c.skip_step} disagree: "
                        f"T / skip_step = {n}; set one of them"
                    )
            else:
                n = c.num_ddim_timesteps or 50
                if T % n:
                    raise ConfigError(
                        f"num_ddim_timesteps={n} does not divide the teacher's {T} timesteps (skip step T / N must be "
                        "an integer, or the grid never reaches the noisiest timestep); choose a divisor such as 50"
                    )
            return n
        if c.skip_step:
            raise ConfigError(f"skip_step needs a discrete teacher; this one is {self.kind}: use num_ddim_timesteps")
        return c.num_ddim_timesteps or 50

    def _check_edges_on_grid(self):
        """Every segment edge must be a solver-grid point: the exported sampler starts its steps at the edges
        (and the top), so each of them must be a time the student is trained at (PCM's edges are grid
        points by construction; its trailing-DDIM inference grid is not, PCM#14)."""

        def missing(grid):
            return [float(e) for edges in self.stage_edges for e in edges if not torch.isclose(grid, e).any()]

        off = missing(self.grid)
        if not off:
            return
        T = getattr(self.schedule, "num_train_timesteps", None)
        ns = [n for n in range(max(self.config.multiphase), 1001) if self.kind != "vp" or T % n == 0]
        fits = [n for n in ns if not missing(self._grid_of(n))]
        n_now = len(self.grid) - 1
        fits = sorted(fits, key=lambda n: (abs(n - n_now), n))[:4]
        shown = [round(float(self.schedule.t_to_timestep(e)), 3) for e in torch.tensor(off)] if T else off
        raise ConfigError(
            f"multiphase={self.config.multiphase}: segment edges {sorted(set(shown))} are not points of the "
            f"{n_now}-step solver grid (num_ddim_timesteps={n_now}), so the exported sampler would start steps "
            f"at times the student never trained at; choose num_ddim_timesteps so that every edge is on the grid "
            f"(e.g. {', '.join(map(str, sorted(fits)))}; PCM's SDXL script uses 40)"
        )

    def _edges(self, m: int) -> torch.Tensor:
        """Segment starts of an m-segment split: 0 and the trailing DDIM grid of m steps without its top."""
        trailing = self.schedule.timesteps(m, "trailing")
        return torch.cat([torch.zeros(1, dtype=torch.float64), trailing[1:].flip(0)])

    def networks(self):
        nets = {"generator": NetSpec(self.generator.net, params=self.generator_params())}
        if self.adversarial:
            nets["discriminator"] = NetSpec(
                self.disc_heads,
                lr=self.config.adv_lr,
                betas=DISCRIMINATOR_BETAS,
                weight_decay=DISCRIMINATOR_WEIGHT_DECAY,
            )
        return nets

    def on_prepared(self):
        self.generator.net = self.specs["generator"].module
        if self.adversarial:
            self.disc_heads = self.specs["discriminator"].module

    def ema_networks(self):
        return ("generator",)

    # ---------------------------------------------------------------- schedules of the run
    def phase(self, step):
        """PCM with its adversarial loss: the discriminator on even iterations, the student on odd ones."""
        if self.adversarial:
            return ("discriminator",) if step % 2 == 0 else ("generator",)
        return ("generator",)

    def stage(self, step: int) -> int:
        """Multiphase stage index at ``step`` (0 for a single stage)."""
        return next((i for i, end in enumerate(self.stage_ends) if step < end), len(self.stage_ends) - 1)

    def ect_stage(self, step: int) -> int:
        every = self.config.ect_double_every or max(self.config.max_steps // 8, 1)
        return step // every

    # ---------------------------------------------------------------- the consistency function
    def consistency_fn(self, model: Denoiser, x_t, t, cond, w=None, start=None):
        """f(x_t, t): the boundary form (c_skip x_t + c_out x0_hat) or, for multiphase (``start`` given), the
        DDIM jump of the model's (x0, eps) to the segment start (PCM's ``ddim_style_multiphase`` with c_skip = 0,
        c_out = 1), the lowest segment included: its jump lands at t = 0 (alpha_0 on a VP teacher)."""
        raw = model.raw(x_t, t, cond, w if model.w_conditioned else None).float()
        x_t = x_t.float()
        sched = self.schedule
        x0, eps = sched.to_x0_eps(raw, x_t, t, model.prediction_type)
        if start is not None:
            return ddim_step(sched, x0, eps, t, start)
        if self.boundary == "lcm":
            c_skip, c_out = lcm_scalings(sched, t, self.config.sigma_data, self.config.timestep_scaling)
            f = _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * x0
        elif self.boundary == "edm":
            F = sched.convert(raw, x_t, t, model.prediction_type, "edm")
            c_skip, c_out = cd_scalings(sched.sigma(t), float(sched.sigma(0.0)), self.config.sigma_data)
            f = _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * F
        else:
            f = x0
        return f

    @torch.no_grad()
    def solver_step(self, x_t, t, s, cond, w):
        """One teacher ODE step t -> s with classifier-free guidance w (None: none): DDIM / Euler or Heun."""
        sched = self.schedule

        def x0_eps(x, tt):
            raw = self.teacher.raw(x.float(), tt, cond, w)
            return sched.to_x0_eps(raw.double(), x.double(), tt, self.pred_type)

        x0, eps = x0_eps(x_t, t)
        if self.solver == "heun":
            return heun_step(sched, x_t.double(), eps, t, s, lambda x, tt: x0_eps(x, tt)[1]).float()
        return ddim_step(sched, x0, eps, t, s).float()

    def _target_model(self) -> Denoiser:
        return self.target if self.target is not None else self.generator

    # ---------------------------------------------------------------- the losses
    def compute_loss(self, batch, phase):
        if self.config.mode in ("lcm", "multiphase"):
            return self.distillation_loss(batch, phase)
        return self.training_loss(batch)

    def _sample_w(self, n, device):
        lo, hi = self.w_range
        if (lo, hi) == (1.0, 1.0):
            return None
        return (lo + (hi - lo) * rnd.rand(n)).to(device)

    def distillation_loss(self, batch, phase=("generator",)):
        """LCM / CD (and PCM's segment jumps): d(f(x_{t_n}, t_n, w), sg f_target(x_hat_{t_{n-1}}, t_{n-1}, w))."""
        device = self.accelerator.device
        x = batch["image"].to(device)
        cond = self._cond_batch(batch)
        n = x.shape[0]
        grid = self.grid
        idx = rnd.randint(1, len(grid), (n,))
        t, s = grid[idx], grid[idx - 1]
        start = None
        if self.config.mode == "multiphase":
            start = segment_starts(t, self.stage_edges[self.stage(self.global_step)])  # edges are grid points
        noise = rnd.randn_like(x)
        x_t = self.schedule.add_noise(x, noise, t)
        w = self._sample_w(n, device)
        pred = self.consistency_fn(self.generator, x_t, t, cond, w, start)
        x_s = self.solver_step(x_t, t, s, cond, w)
        with torch.no_grad():
            target = self.consistency_fn(self._target_model(), x_s, s, cond, w, start)
            on_edge = s <= (start if start is not None else torch.zeros_like(s))
            target = torch.where(_mask(on_edge, x_s), x_s, target)
        loss = consistency_loss(pred, target.detach(), self.metric, self.huber_c)
        if self.adversarial:
            return self.adversarial_loss(pred, target.detach(), start, cond, loss, phase)
        return {"loss": loss}

    def adversarial_loss(self, pred, target, start, cond, consistency, phase):
        """PCM's adversarial terms: real = the target, fake = the student's jump, both re-noised from their
        segment start s to u ~ U{s, ..., s + T / M - 1} (timesteps). Discriminator phase: the hinge loss of the
        heads; student phase: the consistency loss + adv_weight x the generator's hinge term."""
        sched, n = self.schedule, pred.shape[0]
        T = sched.num_train_timesteps
        m = self.config.multiphase[self.stage(self.global_step)]
        s_steps = sched.t_to_timestep(start).round()
        u_steps = (s_steps + rnd.randint(T // m, (n,), dtype=torch.float64)).clamp(max=T - 1)
        u = sched.timestep_to_t(u_steps)
        real = renoise(sched, target, rnd.randn_like(target), start, u)
        fake = renoise(sched, pred, rnd.randn_like(pred), start, u)
        if "discriminator" in phase:
            logits_real, logits_fake = self._discriminate(real, u, cond), self._discriminate(fake.detach(), u, cond)
            d_loss = hinge_discriminator_loss(logits_real, logits_fake)
            return {"loss": d_loss, "loss_adv_d": d_loss.detach()}
        g_loss = hinge_generator_loss(self._discriminate(fake, u, cond))
        loss = consistency + self.config.adv_weight * g_loss
        return {"loss": loss, "loss_consistency": consistency.detach(), "loss_adv_g": g_loss.detach()}

    def _discriminate(self, x, u, cond):
        return self.disc_heads(encoder_features(self.teacher, x, u, cond))

    def training_loss(self, batch):
        """iCT / ECT: d(f(x + t z, t), sg f(x + r z, r)) weighted by 1 / (t - r) (noise levels), no teacher."""
        c = self.config
        device = self.accelerator.device
        x = batch["image"].to(device)
        cond = self._cond_batch(batch)
        n = x.shape[0]
        if c.mode == "ict":
            lo, hi = self.levels
            sigmas = karras_sigmas(ict_num_scales(self.global_step, c.max_steps, c.ict_s0, c.ict_s1), lo, hi, c.rho)
            i = rnd.multinomial(lognormal_index_probs(sigmas, c.p_mean, c.p_std), n, replacement=True)
            sig_t, sig_r = sigmas[i + 1], sigmas[i]
            t = self.schedule.t_from_noise_level(sig_t)
            r = torch.where(sig_r <= lo, torch.zeros_like(sig_r), self.schedule.t_from_noise_level(sig_r))
            clean = None
        else:
            sig_t, sig_r, t, r, clean = self.ect_levels(n)
        noise = rnd.randn_like(x)
        x_t = self.schedule.add_noise(x, noise, t)
        x_r = self.schedule.add_noise(x, noise, r)
        pred = self.consistency_fn(self.generator, x_t, t, cond)
        with torch.no_grad():
            target = self.consistency_fn(self._target_model(), x_r, r, cond)
            if clean is not None:  # ECT: r = 0 means the clean sample itself
                target = torch.where(_mask(clean, x), x.float(), target)
        weight = 1.0 / (sig_t - sig_r).clamp_min(1e-12)
        loss = consistency_loss(pred, target.detach(), self.metric, self.huber_c, weight.float().to(device))
        return {"loss": loss}

    def ect_levels(self, n: int):
        """ECT's noise levels (locuslab/ect ``ECMLoss``): t ~ lognormal(P_mean, P_std), r = t_to_r(t), both times
        sigma_data / 0.5 (ECT's distribution is set for data of std 0.5: scaling the levels with the data is
        training ECT on data rescaled to std 0.5). Returns (sigma_t, sigma_r, t, r, clean): ``clean`` marks the
        samples whose target is the clean sample, ECT's r = 0 only. Nothing is clamped where the teacher's
        schedule has the level (EDM: any sigma > 0, extrapolating its Karras map; flow: any level); a discrete VP
        network has inputs only for its table's levels [sigma(0), sigma(1)]: sigma_t and sigma_r are clamped into
        it, and where that makes r = t (sigma_t at the table's lowest level) the target is the clean sample."""
        c = self.config
        scale = c.sigma_data / 0.5
        sig_t = scale * torch.exp(c.p_mean + c.p_std * rnd.randn(n, dtype=torch.float64))
        if self.kind == "vp":
            sig_t = sig_t.clamp(*self.levels)
        sig_r = scale * ect_r(sig_t / scale, self.ect_stage(self.global_step), c.ect_q, c.ect_k, c.ect_b)
        t, r = self._t_of_level(sig_t), self._t_of_level(sig_r)
        clean = (sig_r <= 0) | (r >= t)
        return sig_t, sig_r, t, torch.where(clean, torch.zeros_like(r), r), clean

    def _t_of_level(self, s: torch.Tensor) -> torch.Tensor:
        """t with noise_level(t) = s, without clamping s to the schedule's [sigma_min, sigma_max] where the
        schedule extends past it (EDM's sigma(t) is defined for every t with sigma > 0)."""
        sched = self.schedule
        if self.kind == "edm":
            p = sched.p
            lo, hi = p.sigma_min ** (1 / p.rho), p.sigma_max ** (1 / p.rho)
            return (s.double().clamp_min(0) ** (1 / p.rho) - lo) / (hi - lo)
        return sched.t_from_noise_level(s)

    # ---------------------------------------------------------------- the target network
    @torch.no_grad()
    def on_step_end(self, step):
        if self.target is None or "generator" not in self.phase(step):
            return
        mu = self.target_decay
        student = self._inner("generator").state_dict()
        for k, v in self.target.net.state_dict().items():
            if v.dtype.is_floating_point:
                v.lerp_(student[k].detach().to(v.dtype), 1 - mu)
            else:
                v.copy_(student[k])

    def extra_state(self):
        if self.target is None:
            return {}, {}
        tensors = {f"target.{k}": v for k, v in self.target.net.state_dict().items()}
        return tensors, {"target_ema_decay": self.target_decay}

    def load_extra_state(self, tensors, meta):
        if self.target is None:
            return
        sd = {k[len("target.") :]: v for k, v in tensors.items() if k.startswith("target.")}
        if not sd:  # a checkpoint without a target (e.g. decay switched on at resume): start it from the student
            sd = self._inner("generator").state_dict()
        self.target.net.load_state_dict(sd)

    # ---------------------------------------------------------------- sampling and export
    def inference_times(self, steps: int | None = None) -> torch.Tensor:
        """The trained sampling times (``steps`` of them for lcm: LCMScheduler's choice among the solver grid)."""
        if steps is None or steps == len(self.generator.timesteps):
            return self.generator.timesteps
        if self.config.mode == "lcm":
            top_down = self.grid[1:].flip(0)
            return top_down[lcm_inference_indices(len(top_down), steps)]
        return self.schedule.timesteps(steps, "trailing")

    @torch.no_grad()
    def sample(self, noise, cond=None, steps: int | None = None, generator=None, guidance_scale=None):
        """Samples from ``noise`` ~ N(0, I): multistep consistency sampling with the consistency function (lcm,
        ict, ect; fresh noise between steps), deterministic DDIM jumps through the segments (multiphase); with
        the weights the export writes (:meth:`export_weights`)."""
        w = guidance_scale if guidance_scale is not None else self.export_guidance_scale
        ts = self.inference_times(steps)
        with self.export_weights():
            if self.config.mode == "multiphase":
                gen = copy.copy(self.generator)
                gen.timesteps = ts
                return gen.sample(noise, cond, guidance_scale=w)
            n = noise.shape[0]
            wt = None if w is None else torch.full((n,), float(w), device=noise.device)
            return consistency_sample(
                lambda x, t: self.consistency_fn(self.generator, x, t, cond, wt),
                self.schedule,
                noise,
                ts,
                generator=generator,
            )

    @torch.no_grad()
    def sample_images(self, step):
        n = 20
        batch = self.dataset.example(n, generator=torch.Generator().manual_seed(0))
        cond = self._cond_batch(batch)
        noise = torch.randn(n, *self.sample_shape, generator=torch.Generator().manual_seed(0))
        x = self.sample(noise.to(self.accelerator.device), cond, generator=torch.Generator().manual_seed(1))
        if self.vae is not None:
            from .student import _decode

            x = _decode(self.vae, x)
        return x if x.ndim == 4 else None

    def export(self, path: str | None = None) -> str:
        """The diffusers folder; an LCM student's LCMScheduler gets ``original_inference_steps`` = the solver
        grid size, so that a stock call with another step count picks points of the trained grid."""
        import json

        path = super().export(path)
        c = self.config
        cfg_file = os.path.join(path, "scheduler", "scheduler_config.json")
        if c.mode == "lcm" and self.kind == "vp" and self.accelerator.is_main_process and os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                cfg = json.load(f)
            if cfg.get("_class_name") == "LCMScheduler":
                from ..io import write_json

                cfg["original_inference_steps"] = len(self.grid) - 1
                write_json(cfg_file, cfg, sort_keys=True)  # temp file + fsync + rename
        self.accelerator.wait_for_everyone()
        return path
