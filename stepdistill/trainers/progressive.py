"""Progressive distillation (Salimans & Ho, ICLR 2022) and guided distillation (Meng et al., CVPR 2023).

Progressive: the student starts as the teacher; in each round it learns to take in ONE deterministic DDIM
step what the round's teacher takes in TWO, on the trailing grid of N student steps. After
``steps_per_round`` updates the student becomes the teacher and N halves, from ``start_steps / 2`` down to
``final_steps``. One update, with z_t = alpha_t x + sigma_t eps from a data batch at a student grid time t:

    z'  = DDIM_teacher(z_t: t -> t - 1/(2N)),   z'' = DDIM_teacher(z': t - 1/(2N) -> t - 1/N)
    x~  = (z'' - (sigma''/sigma_t) z_t) / (alpha'' - (sigma''/sigma_t) alpha_t)   (x~ = z'' at the last step)
    L   = w(t) * ||x^_student(z_t) - x~||^2,  w = max(SNR, 1) ("snr_trunc", the paper's default)

Guided (two stages): stage one fits a w-conditioned student (guidance-scale embedding) to the
classifier-free-guided teacher, x^(z_t, w) ~ x_u + w (x_c - x_u), for w ~ U[w_min, w_max]; stage two runs
the progressive rounds on it with w kept as an input, so the exported sampler costs one network
evaluation per step instead of two.

LoRA (Golnari 2023, LoRA-enhanced distillation): each round trains a LoRA on the frozen base (the teacher
is the base with the adapter off: no second copy of the weights), folded into the base when the round ends.
Guided + LoRA: the paper has no code and does not say how w enters the student; here the w-embedding
projection (``time_embedding.cond_proj``, zero at the start) is added to the shared base and trained as a full
parameter beside the LoRA in stage one (the teacher runs the base without the guidance input, as before). Stage
one's LoRA is then folded into the base and the projection frozen: from then on the base with its projection is
the rounds' w-conditioned teacher (one evaluation per step), and each round trains a fresh LoRA only.

Example::

    stepdistill train --config recipes/progressive/digits.yaml
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..models import Teacher
from ..models.adapters import fold_lora_into_base
from ..models.denoiser import _unwrap
from ..models.generator import guidance_projection_params
from ..schedules import _bcast
from . import randomness as rnd
from .base import NetSpec
from .student import StudentConfig, StudentTrainer

WEIGHTINGS = ("snr_trunc", "snr", "constant", "v_mse")


# ------------------------------------------------------------------------------------------------------
# pure functions
# ------------------------------------------------------------------------------------------------------
def progressive_target(z_t, t_alpha, t_sigma, z_next, next_alpha, next_sigma) -> torch.Tensor:
    """The x0 whose single DDIM step from (z_t, t) lands on the teacher's two-step result z'' at t''
    (Salimans & Ho 2022, Alg. 2): x~ = (z'' - (s''/s) z_t) / (a'' - (s''/s) a). Per-sample alpha / sigma
    (B,); with s'' = 0, a'' = 1 (the last step, onto data) it is z'' itself. Computed in float64."""
    z_t, z_next = z_t.double(), z_next.double()
    a, s = _bcast(t_alpha.double(), z_t), _bcast(t_sigma.double(), z_t)
    a2, s2 = _bcast(next_alpha.double(), z_t), _bcast(next_sigma.double(), z_t)
    ratio = s2 / s
    return (z_next - ratio * z_t) / (a2 - ratio * a)


def progressive_weight(snr: torch.Tensor, weighting: str = "snr_trunc") -> torch.Tensor:
    """Per-sample weight on the x0 error (Salimans & Ho 2022, sec. 4): ``snr_trunc`` max(SNR, 1) (= max of the
    x- and eps-MSE), ``snr`` SNR (= eps-MSE), ``constant`` 1 (x-MSE), ``v_mse`` 1 + SNR (= v-MSE)."""
    if weighting == "snr_trunc":
        return snr.clamp_min(1.0)
    if weighting == "snr":
        return snr
    if weighting == "constant":
        return torch.ones_like(snr)
    if weighting == "v_mse":
        return 1.0 + snr
    raise ValueError(f"unknown progressive weighting {weighting!r}; expected one of {WEIGHTINGS}")


def progressive_loss(x0_student, x0_target, snr, weighting: str = "snr_trunc") -> torch.Tensor:
    """mean_b w(SNR_b) * mean_{C,H,W} (x^ - x~)^2 (Salimans & Ho 2022, eq. 9 with their weightings)."""
    if x0_student.shape != x0_target.shape:
        raise ValueError(f"student shape {tuple(x0_student.shape)} != target shape {tuple(x0_target.shape)}")
    err = ((x0_student.float() - x0_target.float()) ** 2).reshape(x0_student.shape[0], -1).mean(dim=1)
    return (progressive_weight(snr.to(err), weighting) * err).mean()


# ------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------
@dataclass
class ProgressiveConfig(StudentConfig):
    """Progressive / guided distillation (defaults: google-research ``diffusion_distillation`` configs unless
    noted). Teacher, data, LoRA and export keys: :class:`~stepdistill.trainers.student.StudentConfig`.

    > Rounds
    start_steps (`int`, `64`): the first round's teacher samples in this many DDIM steps (trailing grid);
        the student of round r takes start_steps / 2^(r+1) steps (paper: 8192 -> 1 CIFAR, 1024 -> 1 ImageNet).
    final_steps (`int`, `1`): the last round's student step count; start_steps / final_steps must be a
        power of two.
    steps_per_round (`int`, `50000`): updates per halving (the paper's CIFAR-10 / ImageNet configs; the digits
        recipes use 250); ``max_steps`` 0 = derived.
    weighting (`str`, `"snr_trunc"`): snr_trunc | snr | constant | v_mse.
    anneal_lr (`bool`, `true`): learning rate linearly to 0 within each round (paper).
    save_rounds (`bool`, `false`): export a pipeline after every round to ``<output_dir>/rounds/<N>_steps``.
    > Guided distillation
    guided (`bool`, `false`): stage one (w-conditioned student matches the CFG teacher) before the rounds.
    guided_steps (`int`, `0`): stage-one updates (required > 0 when guided).
    w_min / w_max (`float`, `1.0` / `5.0`): guidance range, diffusers convention out_u + w (out_c - out_u)
        (Meng et al. write (1 + w) x_c - w x_u with w in [0, 4]: the same range).
    w_embedding_dim (`int`, `256`): size of the sinusoidal guidance embedding (LCM's).
    guidance_scale (`float`, `3.0`): the exported pipeline's default scale.
    teacher_cond_dropout (`float`, `-1`): the teacher's condition-dropout rate when known (the unconditional
        branch is only defined if it was > 0); -1 = read it from the teacher folder, or warn if unknown.
    """

    start_steps: int = 64
    final_steps: int = 1
    steps_per_round: int = 50000
    weighting: str = "snr_trunc"
    anneal_lr: bool = True
    save_rounds: bool = False
    guided: bool = False
    guided_steps: int = 0
    w_min: float = 1.0
    w_max: float = 5.0
    w_embedding_dim: int = 256
    guidance_scale: float = 3.0
    teacher_cond_dropout: float = -1.0
    max_steps: int = 0
    learning_rate: float = 5e-5

    @property
    def rounds(self) -> int:
        return int(round(math.log2(self.start_steps / self.final_steps)))

    def check(self):
        super().check()
        if self.start_steps < 2 or self.final_steps < 1:
            raise ConfigError(f"need start_steps >= 2 and final_steps >= 1, got {self.start_steps}, {self.final_steps}")
        ratio = self.start_steps / self.final_steps
        if self.start_steps % self.final_steps or ratio < 2 or 2 ** round(math.log2(ratio)) != ratio:
            raise ConfigError(
                f"final_steps={self.final_steps} is not reached by halving start_steps={self.start_steps} "
                "(start_steps / final_steps must be a power of two >= 2, e.g. 64 -> 1 or 32 -> 4)"
            )
        if self.steps_per_round < 1:
            raise ConfigError(f"steps_per_round must be >= 1 (updates per halving round), got {self.steps_per_round}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.guided:
            if self.guided_steps < 1:
                raise ConfigError(f"guided=true needs guided_steps >= 1 (stage-one updates), got {self.guided_steps}")
            if not self.w_min <= self.w_max:
                raise ConfigError(f"need w_min <= w_max, got w_min={self.w_min}, w_max={self.w_max}")
        elif self.guided_steps:
            raise ConfigError(f"guided_steps={self.guided_steps} is set but guided is false")
        total = (self.guided_steps if self.guided else 0) + self.rounds * self.steps_per_round
        if self.max_steps == 0:
            self.max_steps = total
        elif self.max_steps != total:
            raise ConfigError(
                f"max_steps={self.max_steps} but guided_steps + rounds x steps_per_round = {total} "
                f"({self.rounds} rounds {self.start_steps} -> {self.final_steps}); set max_steps: 0 to derive it"
            )


# ------------------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------------------
class ProgressiveTrainer(StudentTrainer):
    """Progressive (and guided) distillation on the shared loop: hooks only."""

    config_class = ProgressiveConfig
    method_name = "progressive"
    export_scheduler = "ddim"  # deterministic DDIM on the trailing grid: what the student was trained on
    lora_folds_into_base = True  # LoRA rounds fold into the teacher's base (teacher_dtype must stay fp32)
    auto_amplification_limit = 2.0  # student_prediction auto: every eps teacher gets a v student (paper: x or v)

    # ---------------------------------------------------------------- setup
    def build(self):
        c = self.config
        self.build_teacher()
        if not self.dataset.has_images:
            raise ConfigError(
                f"dataset: {c.dataset!r} has no images; progressive distillation noises real data "
                "(use digits, toy2d:<name> or an image folder with captions)"
            )
        if getattr(self.schedule, "num_train_timesteps", None) is None:
            raise ConfigError("progressive distillation needs a discrete VP teacher schedule (DDPM / DDIM configs)")
        if c.start_steps > self.schedule.num_train_timesteps:
            raise ConfigError(f"start_steps={c.start_steps} exceeds the teacher's {self.schedule.num_train_timesteps}")
        if c.guided:
            self._check_guidance_teacher()
            self.export_guidance_scale = c.guidance_scale
        self.generator = self.make_generator(
            self.schedule.timesteps(c.start_steps // 2, "trailing"),
            sampler="ddim",
            w_embedding_dim=c.w_embedding_dim if c.guided else 0,
        )
        self.round_teacher = None  # round 0: the original teacher, read when used (guided: after stage one, a copy)
        self._read_as_student = False
        self._stage = None
        self._enter_stage(self.stage_at(0))

    @property
    def find_unused_parameters(self) -> bool:
        """Guided + LoRA: the w-projection stops training after stage one (DDP must not wait for its grads)."""
        return self.config.guided and self.config.generator_mode == "lora"

    def prediction_warmup_limit(self) -> int:
        """The first stage ends by replacing the teacher (a copy of the student, or the LoRA folded into the
        base): the generator's teacher term must be gone by then."""
        c = self.config
        return c.guided_steps if c.guided else c.steps_per_round

    def _check_guidance_teacher(self):
        c = self.config
        self.require_guidance("guided", True)
        rate = c.teacher_cond_dropout
        if rate < 0:
            rate = _recorded_cond_dropout(self._teacher_path()) if self.teacher_object is None else None
        if rate is None:
            warnings.warn(
                "guided distillation: cannot tell whether the teacher was trained with condition dropout; "
                "if it was not, its unconditional branch (and so the CFG target) is undefined. Set "
                "teacher_cond_dropout to the rate it was trained with to silence this",
                stacklevel=2,
            )
        elif rate <= 0:
            warnings.warn(
                f"guided distillation: the teacher was trained with condition dropout {rate}: its unconditional "
                "branch is undefined, so the classifier-free-guided target is meaningless",
                stacklevel=2,
            )

    def networks(self):
        return {"generator": NetSpec(self.generator.net, params=self.generator_params())}

    def on_prepared(self):
        self.generator.net = self.specs["generator"].module

    # ---------------------------------------------------------------- stages and rounds
    _own_round_teacher = None  # a frozen copy of an earlier stage's student (full rounds, guided stage one)
    _read_as_student = False  # LoRA rounds after the first: the folded base, read as the student's type

    @property
    def round_teacher(self):
        """The current round's teacher: a frozen copy of the previous round's student (full rounds), else
        ``self.teacher`` as it is now (so a teacher replaced after ``setup()`` is the one used), read with the
        student's prediction type in LoRA rounds after the first."""
        if self._own_round_teacher is not None:
            return self._own_round_teacher
        teacher = self.teacher
        if self._read_as_student and teacher is not None:
            w_dim = self.generator.w_embedding_dim
            if teacher.prediction_type != self.generator.prediction_type or teacher.w_embedding_dim != w_dim:
                teacher = copy.copy(teacher)  # the same shared base, read as the student's type
                teacher.prediction_type = self.generator.prediction_type
                teacher.w_embedding_dim = w_dim  # guided: the base now takes w as an input (one evaluation)
        return teacher

    @round_teacher.setter
    def round_teacher(self, teacher):
        """A teacher of its own for the following rounds (None: follow ``self.teacher``)."""
        self._own_round_teacher = teacher

    def stage_at(self, step: int):
        """("guided", None) during guided stage one, else ("round", r) with r = 0 .. rounds - 1."""
        c = self.config
        g = c.guided_steps if c.guided else 0
        if step < g:
            return ("guided", None)
        return ("round", min((step - g) // c.steps_per_round, c.rounds - 1))

    def student_steps(self, r: int) -> int:
        return self.config.start_steps // 2 ** (r + 1)

    def _enter_stage(self, stage):
        """Set the generator's trained grid for ``stage`` (a full round teacher is swapped by
        ``_finish_stage``). LoRA rounds after the first read the folded base with the student's prediction type:
        folding the adapter made the base compute the student (an eps teacher's base now outputs v)."""
        self._stage = stage
        n = self.config.start_steps // 2 if stage[0] == "guided" else self.student_steps(stage[1])
        self.generator.timesteps = self.schedule.timesteps(n, "trailing")
        if self.config.generator_mode == "lora" and stage[0] == "round":
            self.round_teacher = None
            self._read_as_student = stage[1] > 0 or self.config.guided  # guided: stage one's student is folded in
        if self.config.generator_mode == "lora" and self.config.guided:
            self._train_projection(stage[0] == "guided")

    def _train_projection(self, on: bool):
        """Guided + LoRA: the w-projection trains in stage one and is frozen in the rounds (part of their
        teacher): off, it leaves the generator's trained parameters, which the loop's phases switch on."""
        proj = guidance_projection_params(self.generator.net)
        for p in proj:
            p.requires_grad_(on)
        params = getattr(self, "params", {}).get("generator")
        if params is not None:
            ids = {id(p) for p in proj}
            self.params["generator"] = [p for p in params if id(p) not in ids] + (proj if on else [])

    def lr_factor(self, name, step):
        c = self.config
        if not c.anneal_lr:
            return 1.0
        g = c.guided_steps if c.guided else 0
        if step < g:
            return 1.0 - step / g
        return 1.0 - ((step - g) % c.steps_per_round) / c.steps_per_round

    def on_step_end(self, step):
        c = self.config
        nxt = step + 1
        stage = self.stage_at(step)
        ends = (stage[0] == "guided" and nxt == c.guided_steps) or (
            stage[0] == "round" and (nxt - (c.guided_steps if c.guided else 0)) % c.steps_per_round == 0
        )
        if not ends:
            return
        if c.save_rounds and stage[0] == "round":
            n = self.student_steps(stage[1])
            self.export(os.path.join(c.output_dir, "rounds", f"{n}_steps"))
        if nxt < c.max_steps:
            self._finish_stage()
            self._enter_stage(self.stage_at(nxt))

    def _finish_stage(self):
        """The student becomes the teacher: a frozen copy (full), or the LoRA folded into the shared base."""
        inner = _unwrap(self.accelerator.unwrap_model(self.specs["generator"].module))
        if self.config.generator_mode == "lora":
            fold_lora_into_base(inner, self.generator.adapter_name)
        else:
            self._set_round_teacher(copy.deepcopy(inner))
        for opt in self.opts.values():  # each round starts its own optimisation
            opt.optimizer.state.clear()

    def _set_round_teacher(self, net):
        self.round_teacher = Teacher(
            net.to(self.accelerator.device),
            self.schedule,
            self.generator.prediction_type,
            cfg_convention=self.generator.cfg_convention,
        )
        if self.teacher is not None and self.teacher is not self.round_teacher and not self.config.guided:
            self.teacher = None  # the original teacher is not needed again (guided: stage one keeps its copy)

    # ---------------------------------------------------------------- checkpoints
    def extra_state(self):
        own = self._own_round_teacher is not None and self.config.generator_mode == "full"
        tensors = (
            {f"round_teacher.{k}": v for k, v in _unwrap(self.round_teacher.net).state_dict().items()} if own else {}
        )
        return tensors, {"stage": list(self._stage), "own_round_teacher": own}

    def load_extra_state(self, tensors, meta):
        if meta.get("own_round_teacher"):
            net = copy.deepcopy(_unwrap(self.accelerator.unwrap_model(self.specs["generator"].module)))
            net.load_state_dict({k[len("round_teacher.") :]: v for k, v in tensors.items()})
            self._set_round_teacher(net.eval())
        if meta.get("stage"):
            self._enter_stage(tuple(meta["stage"]))

    # ---------------------------------------------------------------- the loss
    def _guidance(self, n: int, device):
        c = self.config
        if not c.guided:
            return None
        return (c.w_min + (c.w_max - c.w_min) * rnd.rand(n)).to(device)

    def compute_loss(self, batch, phase):
        c = self.config
        device = self.accelerator.device
        x = batch["image"].to(device)
        cond = self._cond_batch(batch)
        n = x.shape[0]
        w = self._guidance(n, device)
        sched = self.schedule
        stage = self.stage_at(self.global_step)
        if stage != self._stage:  # e.g. right after a resume
            self._enter_stage(stage)
        noise = rnd.randn_like(x)
        if stage[0] == "guided":
            t = sched.sample_t(n, "uniform").to(device)
            z = sched.add_noise(x, noise, t)
            target = self.teacher.predict(z, t, cond, target="x0", guidance_scale=w, float64=True)
        else:
            t, z, target = self._two_step_target(x, noise, cond, w, self.student_steps(stage[1]))
        pred = self.generator.predict(z, t, cond, target="x0", guidance_scale=w)
        snr = (sched.alpha(t) / sched.sigma(t)) ** 2
        loss = progressive_loss(pred, target, snr.to(device), c.weighting)
        return {"loss": loss}

    @torch.no_grad()
    def _two_step_target(self, x, noise, cond, w, n_student: int):
        """Student grid time t, z_t, and the target x~ from two teacher DDIM steps t -> t_mid -> t_next."""
        sched, teacher = self.schedule, self.round_teacher
        grid = sched.timesteps(2 * n_student, "trailing").to(x.device)  # the round teacher's grid
        b = x.shape[0]
        i = rnd.randint(n_student, (b,)).to(x.device)
        t, t_mid = grid[2 * i], grid[2 * i + 1]
        last = 2 * i + 2 >= len(grid)
        t_next = grid[(2 * i + 2).clamp(max=len(grid) - 1)]
        z = sched.add_noise(x, noise, t)
        x0, eps = sched.to_x0_eps(teacher.raw(z, t, cond, w).double(), z.double(), t, teacher.prediction_type)
        z_mid = _bcast(sched.alpha(t_mid), x0) * x0 + _bcast(sched.sigma(t_mid), x0) * eps
        out = teacher.raw(z_mid.to(x.dtype), t_mid, cond, w).double()
        x0_2, eps_2 = sched.to_x0_eps(out, z_mid, t_mid, teacher.prediction_type)
        a_next = torch.where(last, torch.ones_like(t_next), sched.alpha(t_next))
        s_next = torch.where(last, torch.zeros_like(t_next), sched.sigma(t_next))
        z_next = _bcast(a_next, x0_2) * x0_2 + _bcast(s_next, x0_2) * eps_2
        target = progressive_target(z, sched.alpha(t), sched.sigma(t), z_next, a_next, s_next)
        return t, z, target


def _recorded_cond_dropout(path: str):
    """The condition-dropout rate a stepdistill-trained teacher recorded (``training.json``), else None."""
    import json

    if not os.path.isdir(path):
        return None
    f = os.path.join(path, "training.json")
    if os.path.isfile(f):
        with open(f) as fh:
            data = json.load(fh)
        for key in ("label_dropout", "cond_dropout", "caption_dropout"):
            if key in data:
                return float(data[key])
    return None
