"""LADD: latent adversarial diffusion distillation (Sauer et al. 2024, "Fast High-Resolution Image Synthesis with
Latent Adversarial Diffusion Distillation", arXiv 2403.12015; NVlabs/FastGen ``distribution_matching/ladd.py``).

A pure adversarial loss, no distribution-matching term. The generator starts as a copy of the teacher; the
discriminator is the frozen teacher itself, read at several blocks, with a small trainable head per block:

    x_hat = G(z)  (or G(x_s, s) at a later step s: the real sample noised to s, as ADD / FastGen)
    x_t   = add_noise(x_hat, eps, t),     t ~ logit-normal(disc_t_mean, disc_t_std) = sigmoid(N(m, s)) in
            rectified-flow time, i.e. log(sigma_t / alpha_t) ~ N(m, s) on any schedule
    phi_k = the teacher's block k output at (x_t, t, c)    (teacher weights frozen; the gradient flows to x_t)
    L_G   = mean_k l_G(D_k(phi_k(x_t), t))
    L_D   = mean_k l_D(D_k(phi_k(x_real_t), t'), D_k(phi_k(sg x_t), t)) [+ r1_weight approximate R1]

with the hinge losses l_D = relu(1 - D(real)) + relu(1 + D(fake)), l_G = -D(fake) (``gan_loss: hinge``, ADD's and,
as we read LADD, its loss) or the non-saturating pair softplus(-D(real)) + softplus(D(fake)), softplus(-D(fake))
(``gan_loss: nonsaturating``, FastGen's). The approximate R1 of APT (FastGen's ``gan_r1_reg_weight``):
|D(phi(x_real_t)) - D(phi(x_real + alpha n)_t)|^2.

Paper settings followed here: the "real" data are teacher samples (``real_data: teacher``, made once from
``teacher_samples`` dataset conditions); the discriminator noise is logit-normal shifted to high noise (the paper's
figure on the (m, s) choice; m = 1, s = 1 here, as we read it; not checked against code, none is official);
the heads are conditioned on the noise level (FiLM from a sinusoidal t embedding; the teacher features carry the
class / text condition, the heads do not read it). Taps: a UNet's down blocks and mid block (the up path is cut
off), a transformer's blocks (SD3 / DiT ``transformer_blocks``; the paper taps every attention block), a plain
``blocks`` list; ``feature_blocks`` picks indices among them. The forward stops after the last tapped block.

Example::

    stepdistill train --config recipes/ladd/digits.yaml
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ConfigError
from ..models.denoiser import _unwrap
from ..models.features import teacher_features
from . import randomness as rnd
from .base import NetSpec
from .dmd2 import DMD2Trainer, _as_map
from .student import StudentConfig, StudentTrainer

# ------------------------------------------------------------------------------------------------------------
# teacher feature taps
# ------------------------------------------------------------------------------------------------------------


def tap_modules(net: nn.Module) -> list[nn.Module]:
    """The blocks LADD can read: a UNet's down blocks + mid block, a transformer's ``transformer_blocks``, else a
    ``blocks`` list (DiT-style or stepdistill's ToyMLP)."""
    net = _unwrap(net)
    if getattr(net, "down_blocks", None) is not None and getattr(net, "mid_block", None) is not None:
        return [*net.down_blocks, net.mid_block]
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(net, name, None)
        if blocks is not None and len(blocks):
            return list(blocks)
    raise ValueError(f"{type(net).__name__} has no down_blocks / mid_block, transformer_blocks or blocks to tap")


# ------------------------------------------------------------------------------------------------------------
# the heads
# ------------------------------------------------------------------------------------------------------------


def _time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float().reshape(-1, 1) * 1000.0) * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class FeatureHead(nn.Module):
    """One tapped feature map (B, C, H, W) and t -> a logit per position (B, 1, H, W): 1x1 conv + GroupNorm +
    SiLU, FiLM by t, 3x3 conv + GroupNorm + SiLU, 1x1 conv to one channel."""

    def __init__(self, channels: int, width: int = 128, time_dim: int = 64):
        super().__init__()
        g = math.gcd(32, width)
        self.time_dim = time_dim
        self.inp = nn.Sequential(nn.Conv2d(channels, width, 1), nn.GroupNorm(g, width), nn.SiLU())
        self.film = nn.Linear(time_dim, 2 * width)
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(g, width), nn.SiLU())
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.inp(h)
        scale, shift = self.film(_time_embedding(t, self.time_dim).to(x.device)).chunk(2, dim=1)
        x = x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.out(self.block(x))


class LADDHeads(nn.Module):
    """One :class:`FeatureHead` per tapped teacher block."""

    def __init__(self, channels: list[int], width: int = 128):
        super().__init__()
        self.heads = nn.ModuleList(FeatureHead(c, width) for c in channels)

    def forward(self, feats: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
        return [head(_as_map(f).float(), t) for head, f in zip(self.heads, feats)]


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Mean over heads of relu(1 - D(real)) + relu(1 + D(fake)) (hinge) or softplus(-D(real)) + softplus(D(fake))."""
    f = torch.relu if kind == "hinge" else torch.nn.functional.softplus
    one = 1.0 if kind == "hinge" else 0.0
    return torch.stack([f(one - r).mean() + f(one + k).mean() for r, k in zip(real, fake)]).mean()


def generator_loss(fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Mean over heads of -D(fake) (hinge generator) or softplus(-D(fake)) (non-saturating)."""
    if kind == "hinge":
        return torch.stack([-k.mean() for k in fake]).mean()
    return torch.stack([torch.nn.functional.softplus(-k).mean() for k in fake]).mean()


# ------------------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------------------


@dataclass
class LADDConfig(StudentConfig):
    """LADD settings (FastGen ``configs/methods/config_ladd.py`` unless noted).

    denoising_timesteps (`list[int]`, `[]`: the top of the schedule): the generator's input timesteps; step k > 0
        reads the real sample noised to its timestep (ADD / FastGen), sampling runs them in turn.
    feature_blocks (`list[int]`, `[]`: every tap): indices into the teacher's taps (UNet: down blocks then the mid
        block; transformers: their blocks). FastGen's Wan-1.3B: [15, 22, 29].
    head_width (`int`, `128`): channels of each head.
    disc_t (`str`, `"logit_normal"`): the discriminator's noise levels: "logit_normal" (rectified-flow time
        t = sigmoid(N(m, s)), i.e. log(sigma / alpha) ~ N(m, s), carried to the teacher's schedule by its noise
        level) or "uniform" (t uniform in [disc_t_min, disc_t_max]); disc_t_mean / disc_t_std (`float`, `1.0` /
        `1.0`): m and s (LADD: shifted to high noise, for 128x128 SD3 latents; small inputs need less noise or
        the heads stay at chance: the digits recipe (16x16) uses -1, the 2-D toy -2).
    disc_t_min / disc_t_max (`float`, `0.001` / `0.999`): clamp of t.
    gan_loss (`str`, `"hinge"`): "hinge" or "nonsaturating".
    dfake_gen_update_ratio (`int`, `5`): FastGen's ``student_update_freq``: the generator is updated at every 5th
        iteration, the heads at the others.
    same_t_noise (`bool`, `false`): real and fake share t and noise (FastGen's ``gan_use_same_t_noise``).
    r1_weight (`float`, `0.0`: off; FastGen: 100-1000 when on), r1_alpha (`float`, `0.1`): approximate R1.
    real_data (`str`, `"teacher"`): "teacher" (the paper's synthetic data: ``teacher_samples`` teacher samples of
        ``teacher_sample_steps`` DDIM steps at ``real_guidance_scale``, made once) or "dataset" (its images).
    teacher_samples (`int`, `1024`), teacher_sample_steps (`int`, `25`), real_guidance_scale (`float`, `1.0`).
    head_lr (`float`, `0`: learning_rate); FastGen's Wan: 2e-6 generator, 4e-6 discriminator; the digits and toy
        recipes: 10x the generator's, so that the heads learn before the generator drifts.
    """

    denoising_timesteps: list[int] = field(default_factory=list)
    feature_blocks: list[int] = field(default_factory=list)
    head_width: int = 128
    disc_t: str = "logit_normal"
    disc_t_mean: float = 1.0
    disc_t_std: float = 1.0
    disc_t_min: float = 0.001
    disc_t_max: float = 0.999
    gan_loss: str = "hinge"
    dfake_gen_update_ratio: int = 5
    same_t_noise: bool = False
    r1_weight: float = 0.0
    r1_alpha: float = 0.1
    real_data: str = "teacher"
    teacher_samples: int = 1024
    teacher_sample_steps: int = 25
    real_guidance_scale: float = 1.0
    head_lr: float = 0.0

    def check(self):
        super().check()
        for key, allowed in (
            ("disc_t", ("logit_normal", "uniform")),
            ("gan_loss", ("hinge", "nonsaturating")),
            ("real_data", ("teacher", "dataset")),
        ):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if not 0 <= self.disc_t_min < self.disc_t_max <= 1:
            raise ConfigError(f"need 0 <= disc_t_min < disc_t_max <= 1, got {self.disc_t_min}, {self.disc_t_max}")
        if self.disc_t_std <= 0 or self.head_width < 1 or self.dfake_gen_update_ratio < 1:
            raise ConfigError("disc_t_std must be > 0, head_width and dfake_gen_update_ratio >= 1")
        if self.r1_weight < 0 or self.r1_alpha < 0:
            raise ConfigError(f"r1_weight and r1_alpha must be >= 0, got {self.r1_weight}, {self.r1_alpha}")
        if self.real_data == "teacher" and (self.teacher_samples < 1 or self.teacher_sample_steps < 1):
            raise ConfigError("teacher_samples and teacher_sample_steps must be >= 1")
        if self.real_data == "dataset" and self.dataset.endswith((".txt", ".jsonl")):
            raise ConfigError(
                f"real_data: dataset needs real images, but dataset {self.dataset!r} is a prompt file; use an image "
                "folder, or real_data: teacher (the paper's synthetic data)"
            )
        ts = self.denoising_timesteps
        if ts and (any(b >= a for a, b in zip(ts, ts[1:])) or min(ts) < 0):
            raise ConfigError(f"denoising_timesteps must be decreasing non-negative integers, got {ts}")


class LADDTrainer(StudentTrainer):
    """LADD: a generator against per-block heads on the frozen teacher's features."""

    config_class = LADDConfig
    method_name = "LADD"
    trains_several_networks = True
    find_unused_parameters = True

    generator_times = DMD2Trainer.generator_times  # the same timestep rules (top of the schedule by default)
    schedule_levels = DMD2Trainer.schedule_levels
    shared_step_index = DMD2Trainer.shared_step_index

    def build(self):
        c = self.config
        self.build_teacher()
        if c.real_guidance_scale != 1.0:
            self.require_guidance("real_guidance_scale", c.real_guidance_scale)
        self.gen_times = self.generator_times()
        self.student_prediction(self.gen_times)
        self.generator = self.make_generator(self.gen_times)
        try:
            taps = tap_modules(self.teacher.net)
        except ValueError as e:
            raise ConfigError(f"LADD reads teacher blocks: {e}") from None
        picks = list(c.feature_blocks) or list(range(len(taps)))
        bad = [i for i in picks if not -len(taps) <= i < len(taps)]
        if bad:
            raise ConfigError(
                f"feature_blocks: {bad} out of range; the teacher has {len(taps)} taps (0..{len(taps) - 1})"
            )
        self.taps = [taps[i] for i in sorted({i % len(taps) for i in picks})]
        if c.real_data == "dataset" and not self.dataset.has_images:
            raise ConfigError("real_data: dataset needs real images; the dataset has none (use real_data: teacher)")
        self.synthetic = TeacherSamples.of(self)
        device = self.accelerator.device
        with torch.no_grad():
            x = torch.zeros(1, *self.sample_shape, device=device)
            t = torch.full((1,), 0.5, dtype=torch.float64)
            feats = teacher_features(self.teacher, self.taps, x, t, self._cond_batch(self.dataset.example(1)))
        self.heads = LADDHeads([_as_map(f).shape[1] for f in feats], c.head_width).to(device)

    def networks(self):
        c = self.config
        return {
            "generator": NetSpec(self.generator.net, params=self.generator_params()),
            "heads": NetSpec(self.heads, lr=c.head_lr or None),
        }

    def on_prepared(self):
        self.generator.net = self.specs["generator"].module
        self.heads = self.specs["heads"].module

    def ema_networks(self):
        return ("generator",)

    def phase(self, step):
        return ("generator",) if step % self.config.dfake_gen_update_ratio == 0 else ("heads",)

    # ---------------------------------------------------------------- pieces
    def disc_times(self, n: int, device) -> torch.Tensor:
        """The discriminator's noise levels. "logit_normal": LADD's t ~ sigmoid(N(m, s)) is rectified-flow time,
        where t / (1 - t) is the noise level sigma / alpha; so log(sigma / alpha) ~ N(m, s), mapped to the
        teacher's own time (a flow teacher: exactly sigmoid(N(m, s)); a VP or EDM teacher: the same
        signal-to-noise ratios). Clamped to [disc_t_min, disc_t_max]."""
        c = self.config
        if c.disc_t == "uniform":
            return self.schedule.sample_t(n, "uniform", t_min=c.disc_t_min, t_max=c.disc_t_max).to(device)
        z = rnd.randn(n, dtype=torch.float64)
        t = self.schedule.t_from_noise_level(torch.exp(c.disc_t_mean + c.disc_t_std * z))
        return t.clamp(c.disc_t_min, c.disc_t_max).to(device)

    def real_batch(self, batch):
        if self.synthetic is not None:
            return self.synthetic.batch(len(batch["_n"]))
        return batch

    def generate(self, batch, cond, step: int, grad: bool):
        """G at step k (shared by every process): pure noise for k = 0, else the real sample noised to t_k."""
        device = self.accelerator.device
        n = len(batch["_n"])
        k = self.shared_step_index(step) if len(self.gen_times) > 1 else 0
        x = self.generator.initial_noise(rnd.randn(n, *self.sample_shape, device=device))
        if k > 0:
            real = batch["image"].to(device)
            x = self.schedule.add_noise(real, rnd.randn_like(real), self.gen_times[k].expand(n))
        with torch.set_grad_enabled(grad):
            return self.generator(x, cond, self.gen_times[k].expand(n))

    def logits(self, x, t, cond, noise=None):
        """The heads' logits at x noised to t (features with the input gradient)."""
        noise = rnd.randn_like(x) if noise is None else noise
        x_t = self.schedule.add_noise(x, noise, t)
        return self.heads(teacher_features(self.teacher, self.taps, x_t, t, cond), t)

    def compute_loss(self, batch, phase):
        c = self.config
        batch = self.real_batch(batch)
        cond = self._cond_batch(batch)
        device = self.accelerator.device
        if "generator" in phase:
            x = self.generate(batch, cond, self.global_step, grad=True)
            t = self.disc_times(x.shape[0], device)
            loss = generator_loss(self.logits(x, t, cond), c.gan_loss)
            return {"loss": loss, "loss_gan_g": loss.detach()}
        x = self.generate(batch, cond, self.global_step, grad=False).detach()
        real = batch["image"].to(device)
        t = self.disc_times(x.shape[0], device)
        noise = rnd.randn_like(x)
        fake_logits = self.logits(x, t, cond, noise)
        if c.same_t_noise:
            t_real, noise_real = t, noise
        else:
            t_real, noise_real = self.disc_times(x.shape[0], device), rnd.randn_like(real)
        real_logits = self.logits(real, t_real, cond, noise_real)
        loss_d = discriminator_loss(real_logits, fake_logits, c.gan_loss)
        out = {"loss_gan_d": loss_d.detach()}
        if c.r1_weight > 0:  # approximate R1 (APT): the heads' logits move little under a small input perturbation
            near = self.logits(real + c.r1_alpha * rnd.randn_like(real), t_real, cond, noise_real)
            r1 = torch.stack([(a - b).square().mean() for a, b in zip(real_logits, near)]).mean()
            loss_d = loss_d + c.r1_weight * r1
            out["loss_r1"] = r1.detach()
        return {"loss": loss_d, **out}


class TeacherSamples:
    """A pool of teacher samples standing in for real data (LADD's synthetic data): ``n`` conditions drawn from the
    dataset (seeded by ``seed``), each with a teacher sample of ``steps`` DDIM steps at ``real_guidance_scale``;
    made at the first use. ``batch(k)`` returns k of them as a dataset batch (its conditions and ``image``)."""

    def __init__(self, trainer, n: int, steps: int):
        self.trainer, self.n, self.steps = trainer, n, steps
        self._pool = None

    @classmethod
    def of(cls, trainer):
        """The pool of ``trainer``'s config (``teacher_samples``, ``teacher_sample_steps``) when its ``real_data``
        is "teacher", else None."""
        c = trainer.config
        return cls(trainer, c.teacher_samples, c.teacher_sample_steps) if c.real_data == "teacher" else None

    @torch.no_grad()
    def _make(self):
        from ..sampling import sample

        tr = self.trainer
        c = tr.config
        device = tr.accelerator.device
        g = torch.Generator().manual_seed(c.seed + 11)
        batch = tr.dataset.example(self.n, generator=g)
        noise = torch.randn(self.n, *tr.sample_shape, generator=g).to(device)
        images = []
        for s in range(0, self.n, 256):
            sl = slice(s, s + 256)
            cond = tr._cond_batch(_index(batch, list(range(s, min(s + 256, self.n)))))
            images.append(
                sample(
                    lambda x, t, cs=cond: tr.teacher.raw(x, t, cs, getattr(c, "real_guidance_scale", 1.0)),
                    tr.schedule,
                    noise[sl],
                    self.steps,
                    pred_type=tr.teacher.prediction_type,
                ).cpu()
            )
        batch = {k: v for k, v in batch.items() if k != "image"}
        batch["image"] = torch.cat(images)
        return batch

    def batch(self, k: int) -> dict:
        if self._pool is None:
            self._pool = self._make()
        idx = rnd.randint(self.n, (k,)).tolist()
        out = _index(self._pool, idx)
        out["_n"] = idx
        return out


def _index(batch: dict, idx: list) -> dict:
    return {key: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx]) for key, v in batch.items()}
