"""f-distill: distribution matching with an f-divergence (Xu, Nie & Vahdat 2025, "One-step Diffusion Models with
f-Divergence Distribution Matching", arXiv 2502.15681; NVlabs/FastGen ``distribution_matching/f_distill.py``).

DMD2 with a per-sample weight. The gradient of D_f(p_t || q_t) w.r.t. the generator is the score difference
weighted by h(r) = f''(r) r^2 of the density ratio r = p_t / q_t (teacher over generator) at the noised sample
(paper, Thm. 1); reverse KL (f = -log r) gives h = 1, i.e. DMD / VSD. Here

    r  = clip(exp(clamp(D(x_t, t), -10, 10)), ratio_min, ratio_max)
    r <- r / mean_{same t-bin}(r)                     (ratio_normalization; EMA over steps with ratio_ema > 0)
    h  = h_f(r) / mean_batch(h_f(r))                  (mean over the global batch)
    g  = h (x0_fake - x0_real) / mean_{C,H,W} |x - x0_real|,    L_DM = 0.5 mse(x, sg(x - g))

D is DMD2's GAN head (:class:`~stepdistill.trainers.dmd2.DiscriminatorHead`) on the fake score's bottleneck, read
at the DM loss's own x_t and t (the fake-score forward the DM loss runs anyway, so no extra network pass). It is
a logistic discriminator trained with softplus(D(fake)) + softplus(-D(real)) on noised real and generated
samples; at its optimum sigmoid(D) = p_t / (p_t + q_t), so exp(D) estimates r = p_t / q_t. r is a constant for
the generator. The GAN generator term softplus(-D) of DMD2 stays on (f-distill needs the head trained, so
``gan_generator_weight`` > 0). Real images are required; ``real_data: teacher`` uses teacher samples instead.

Example::

    stepdistill train --config recipes/fdistill/digits.yaml
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from . import randomness as rnd
from .dmd2 import DMD2Config, DMD2Trainer, FeatureTap, _as_map
from .ladd import TeacherSamples

# ------------------------------------------------------------------------------------------------------------
# the weighting functions h(r) = f''(r) r^2 (paper Table 1; FastGen's ``all_f_div_weighting_function``, whose
# constants differ by positive factors that the normalisation by mean(h) removes)
# ------------------------------------------------------------------------------------------------------------


def h_reverse_kl(r: torch.Tensor) -> torch.Tensor:
    """f = -log r (reverse KL, DMD / VSD): h = 1."""
    return torch.ones_like(r)


def h_forward_kl(r: torch.Tensor) -> torch.Tensor:
    """f = r log r (forward KL): h = r."""
    return r


def h_jensen_shannon(r: torch.Tensor) -> torch.Tensor:
    """f = r log r - (1 + r) log((1 + r) / 2) (Jensen-Shannon): h = r / (1 + r)."""
    return r / (1 + r)


def h_softened_reverse_kl(r: torch.Tensor) -> torch.Tensor:
    """f = (1 + r) log((1 + r) / (2 r)) (softened reverse KL): h = 1 / (1 + r)."""
    return 1 / (1 + r)


def h_squared_hellinger(r: torch.Tensor) -> torch.Tensor:
    """f = (sqrt(r) - 1)^2 (squared Hellinger): h = sqrt(r) / 2."""
    return r.sqrt() / 2


def h_jeffreys(r: torch.Tensor) -> torch.Tensor:
    """f = (r - 1) log r (Jeffreys): h = 1 + r."""
    return 1 + r


def h_neyman_chi2(r: torch.Tensor) -> torch.Tensor:
    """f = (1 - r)^2 / r (Neyman chi^2; FastGen's "neyman"): h = 2 / r."""
    return 2 / r


# name -> (f, h): f is the divergence's generator (f(1) = 0, convex), kept for the tests (h = f'' r^2)
F_DIVERGENCES = {
    "rkl": (lambda r: -torch.log(r), h_reverse_kl),
    "kl": (lambda r: r * torch.log(r), h_forward_kl),
    "js": (lambda r: r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2), h_jensen_shannon),
    "sf": (lambda r: (1 + r) * torch.log((1 + r) / (2 * r)), h_softened_reverse_kl),
    "sh": (lambda r: (r.sqrt() - 1) ** 2, h_squared_hellinger),
    "jf": (lambda r: (r - 1) * torch.log(r), h_jeffreys),
    "neyman": (lambda r: (1 - r) ** 2 / r, h_neyman_chi2),
}

LOGIT_CLAMP = 10.0  # FastGen clamps the logit before exp (exp(10) ~ 2.2e4, then clipped to ratio_max)


def density_ratio(logits: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """r = clip(exp(clamp(logit, -10, 10)), lo, hi): a logistic discriminator's p / q estimate, float32, detached."""
    return logits.detach().float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP).exp().clamp(lo, hi)


def _global_sum(x: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def normalized_weights(h: torch.Tensor) -> torch.Tensor:
    """h / mean(h) over the global batch (paper Sec. 4.2: the weights average 1, so the f only redistributes DMD's
    gradient among samples)."""
    total = _global_sum(torch.stack([h.sum(), torch.tensor(float(h.numel()), device=h.device)]))
    return h / (total[0] / total[1]).clamp_min(1e-12)


@dataclass
class FDistillConfig(DMD2Config):
    """f-distill settings on top of :class:`DMD2Config` (defaults from FastGen ``configs/methods/
    config_f_distill.py`` unless noted).

    f_divergence (`str`, `"js"`): the f of D_f(p || q): "js" (Jensen-Shannon, the paper's best), "kl" (forward KL,
        FastGen's CIFAR-10), "rkl" (reverse KL: DMD2 exactly), "sf" (softened reverse KL), "sh" (squared
        Hellinger), "jf" (Jeffreys), "neyman" (Neyman chi^2).
    ratio_min / ratio_max (`float`, `0.1` / `20.0`): clip of the density ratio r before h.
    ratio_normalization (`bool`, `true`): divide r by its mean over the samples in the same t-bin.
    ratio_bins (`int`, `10`): the t-bins ([0, 1] cut in equal parts).
    ratio_ema (`float`, `0.0`): EMA of the per-bin means across steps (0: this batch's; FastGen ImageNet-64: 0.5).
    real_data (`str`, `"dataset"`): the discriminator's real samples: "dataset" (its images) or "teacher"
        (teacher samples, made once: ``teacher_samples`` of them, ``teacher_sample_steps`` DDIM steps at
        ``real_guidance_scale``; for a prompt-only dataset).
    teacher_samples (`int`, `1024`), teacher_sample_steps (`int`, `25`).
    gan_generator_weight (`float`, `3e-3`: FastGen ImageNet-64 / DMD2 ImageNet; must be > 0: the head estimates r).
    """

    f_divergence: str = "js"
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    ratio_normalization: bool = True
    ratio_bins: int = 10
    ratio_ema: float = 0.0
    real_data: str = "dataset"
    teacher_samples: int = 1024
    teacher_sample_steps: int = 25
    gan_generator_weight: float = 3e-3

    def check(self):
        if self.f_divergence not in F_DIVERGENCES:
            raise ConfigError(f"f_divergence must be one of {sorted(F_DIVERGENCES)}, got {self.f_divergence!r}")
        if self.gan_generator_weight <= 0:
            raise ConfigError(
                "f-distill estimates the density ratio with the GAN head, which needs training: "
                f"gan_generator_weight must be > 0, got {self.gan_generator_weight}"
            )
        if self.real_data not in ("dataset", "teacher"):
            raise ConfigError(f"real_data must be 'dataset' or 'teacher', got {self.real_data!r}")
        if self.real_data == "dataset" and self.dataset.endswith((".txt", ".jsonl")):
            raise ConfigError(
                f"f-distill's discriminator needs real images, but dataset {self.dataset!r} is a prompt file; use an "
                "image folder, or real_data: teacher (teacher samples as the real data)"
            )
        if not 0 < self.ratio_min < 1 < self.ratio_max:
            raise ConfigError(f"need 0 < ratio_min < 1 < ratio_max, got {self.ratio_min}, {self.ratio_max}")
        if self.ratio_bins < 1 or not 0 <= self.ratio_ema < 1:
            raise ConfigError(f"need ratio_bins >= 1 and 0 <= ratio_ema < 1, got {self.ratio_bins}, {self.ratio_ema}")
        if self.fake_guidance_scale != 1.0:
            raise ConfigError(
                f"fake_guidance_scale={self.fake_guidance_scale}: f-distill reads the head on the fake score's one "
                "forward at the DM x_t; leave fake_guidance_scale at 1"
            )
        if self.gan_noise != "diffusion" or self.gan_max_timestep < int(self.max_step_percent * 1000 + 1e-9):
            raise ConfigError(
                "f-distill reads the discriminator at the DM timesteps (up to max_step_percent): it must be trained "
                f"there: gan_noise: diffusion and gan_max_timestep >= {int(self.max_step_percent * 1000 + 1e-9)} "
                f"(got {self.gan_noise!r}, {self.gan_max_timestep})"
            )
        if self.real_data == "teacher" and (self.teacher_samples < 1 or self.teacher_sample_steps < 1):
            raise ConfigError("teacher_samples and teacher_sample_steps must be >= 1")
        if self.real_data == "teacher":  # DMD2's check refuses a prompt file with the GAN on: the images come from us
            dataset, self.dataset = self.dataset, "teacher-samples"
            try:
                super().check()
            finally:
                self.dataset = dataset
            return
        super().check()


class FDistillTrainer(DMD2Trainer):
    """f-distill: DMD2's generator gradient weighted by h(r), r from the GAN head at the DM x_t."""

    config_class = FDistillConfig
    method_name = "f-distill"

    def build(self):
        c = self.config
        super().build()
        self.synthetic = TeacherSamples.of(self)
        self.ratio_bins = torch.ones(c.ratio_bins, dtype=torch.float64)
        self._weights = None

    def has_real_images(self) -> bool:
        return self.config.real_data == "teacher" or super().has_real_images()

    # ---------------------------------------------------------------- the weight
    def f_weights(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Normalised h(r) per sample from the head's logits at (x_t, t); updates the per-bin ratio means."""
        c = self.config
        r = density_ratio(logits.reshape(len(t), -1).mean(1), c.ratio_min, c.ratio_max).double()
        if c.ratio_normalization:
            idx = (t.detach().double().cpu() * c.ratio_bins).floor().long().clamp(0, c.ratio_bins - 1)
            stats = torch.stack([torch.bincount(idx, minlength=c.ratio_bins).double(),
                                 torch.bincount(idx, weights=r.cpu(), minlength=c.ratio_bins)])
            stats = _global_sum(stats.to(r.device)).cpu()
            seen = stats[0] > 0
            mean = stats[1][seen] / stats[0][seen]
            self.ratio_bins[seen] = c.ratio_ema * self.ratio_bins[seen] + (1 - c.ratio_ema) * mean
            r = r / self.ratio_bins[idx].to(r.device)
        h = F_DIVERGENCES[c.f_divergence][1](r)
        return normalized_weights(h)

    def dm_loss(self, x, cond, with_gan: bool = False):
        """DMD2's DM loss (same draws of t and noise) with the gradient weighted by h(r) at the DM x_t."""
        c = self.config
        t = self.draw_t(x.shape[0], c.min_step_percent, c.max_step_percent, x.device)
        x_t = self.schedule.add_noise(x.detach(), rnd.randn_like(x), t)
        if with_gan:  # share_fake_forward: the same logits feed the GAN generator term
            fake, logits = self._shared_fake_forward(x, x_t, t, cond)
            read = logits.detach()
        else:
            with torch.no_grad(), FeatureTap(self.fake.net) as tap:
                fake = self.fake.raw(x_t, t, cond)
                read = self.head(_as_map(tap.value).float())
        w = self.f_weights(read, t)
        self._weights = w.detach()
        loss = self._dm_loss_at(x, x_t, t, cond, fake, weight=w)
        return (loss, logits) if with_gan else loss

    # ---------------------------------------------------------------- real data and logging
    def compute_loss(self, batch, phase):
        if self.synthetic is not None:
            batch = self.synthetic.batch(len(batch["_n"]))
        out = super().compute_loss(batch, phase)
        if "generator" in phase and self._weights is not None:
            w = self._weights
            out.update(h_min=w.min().float(), h_max=w.max().float())
            self._weights = None
        return out

    def extra_state(self):
        return {"ratio_bins": self.ratio_bins.clone()}, {}

    def load_extra_state(self, tensors, meta):
        if "ratio_bins" in tensors and tensors["ratio_bins"].shape == self.ratio_bins.shape:
            self.ratio_bins = tensors["ratio_bins"].double().clone()


__all__ = ["F_DIVERGENCES", "FDistillConfig", "FDistillTrainer", "density_ratio", "normalized_weights"]
