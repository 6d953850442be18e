"""VSD as SwiftBrush uses it (Nguyen & Tran, CVPR 2024; variational score distillation, Wang et al. 2023).

Same machinery as DMD2; the fake score is by default a LoRA on the teacher's frozen base (the teacher is the
base with adapters off), trained by an alpha_bar-weighted eps loss with 10% null conditions; the generator
gradient is g = w(t) (eps_teacher - eps_fake), w(t) = 1 - alpha_bar_t, with the SAME guidance scale on the
teacher and the fake score, applied as 0.5 * mse(x, sg(x - g)). Image-free (prompts or labels only).

Example::

    stepdistill train --config recipes/vsd/digits.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from ..losses import distribution_matching_loss, vsd_gradient
from . import randomness as rnd
from .dmd2 import DMD2Config, DMD2Trainer


@dataclass
class VSDConfig(DMD2Config):
    """VSD / SwiftBrush settings (defaults from VinAIResearch/SwiftBrush ``train_swiftbrush.py`` and README).

    fake_score_mode (`str`, `"lora"`), lora_rank (`int`, `64`), lora_alpha (`float`, `108.0`),
    lora_target_modules (`list[str]`, `["to_q", "to_v"]`; empty = stepdistill's default set).
    real_guidance_scale (`float`, `4.5`): applied to the teacher AND the fake score (README command).
    fake_cond_dropout (`float`, `0.1`), fake_cond_dropout_mode (`str`, `"batch"`): SwiftBrush replaces the
        whole batch's prompts by the null prompt with probability 0.1 in the LoRA loss ("sample": per prompt).
    ema_warmup (`bool`, `false`): diffusers' EMAModel warm-up, as SwiftBrush's ``--use_ema`` (on in the recipe).
    min_step_percent / max_step_percent (`0.02` / `0.98`: SwiftBrush's randint(20, 981), i.e. [20, 980]),
    dfake_gen_update_ratio (`1`),
    learning_rate (`1e-6`, student), fake_lr (`1e-3`, LoRA), max_grad_norm (`1.0`), weight_decay (`0.0`).
    """

    fake_score_mode: str = "lora"
    lora_alpha: float = 108.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_v"])
    real_guidance_scale: float = 4.5
    fake_cond_dropout: float = 0.1
    fake_cond_dropout_mode: str = "batch"
    max_step_percent: float = 0.98
    dfake_gen_update_ratio: int = 1
    learning_rate: float = 1e-6
    fake_lr: float = 1e-3
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0

    def check(self):
        super().check()
        if self.fake_guidance_scale != 1.0:
            raise ConfigError(
                f"fake_guidance_scale={self.fake_guidance_scale}: VSD reads its fake score with real_guidance_scale "
                "(SwiftBrush's one guidance_scale) and fits it without CFG; leave fake_guidance_scale at 1"
            )


class VSDTrainer(DMD2Trainer):
    """Variational score distillation on DMD2's shared fake-score machinery."""

    config_class = VSDConfig
    method_name = "VSD"

    def fake_loss(self, x, cond):
        c = self.config
        t = self.draw_t(x.shape[0], c.fake_min_step_percent, c.fake_max_step_percent, x.device)
        # SwiftBrush: mse(sqrt(ab) eps_hat, sqrt(ab) eps) = alpha_bar-weighted eps loss
        return self.fake.dsm_loss(
            x, self.fake_cond(cond), t=t, weighting="eps", weight_fn=lambda t: self.vp_alpha_sigma(t)[0] ** 2
        )

    def vp_alpha_sigma(self, t):
        """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) of the variance-preserving process equivalent to the teacher's
        at t: alpha / r and sigma / r with r = sqrt(alpha^2 + sigma^2) (VP teachers: alpha and sigma themselves;
        EDM: 1 / sqrt(1 + sigma^2), sigma / sqrt(1 + sigma^2)), so that SwiftBrush's weights read on any teacher."""
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        r = (a * a + s * s).sqrt()
        return a / r, s / r

    def generator_loss(self, x, cond):
        c = self.config
        t = self.draw_t(x.shape[0], c.min_step_percent, c.max_step_percent, x.device)
        x_t = self.schedule.add_noise(x.detach(), rnd.randn_like(x), t)
        w = c.real_guidance_scale
        eps_real = self.real_score.predict(x_t, t, cond, target="eps", guidance_scale=w, float64=True)
        with torch.no_grad():
            eps_fake = self.fake.predict(x_t, t, cond, target="eps", guidance_scale=w, float64=True)
        g = vsd_gradient(eps_real, eps_fake, self.vp_alpha_sigma(t)[1].to(x.device))
        loss = distribution_matching_loss(x, g)
        return loss, {"loss_vsd": loss.detach()}
