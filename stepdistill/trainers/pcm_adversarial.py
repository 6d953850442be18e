"""PCM's optional adversarial loss (Wang et al. 2024, Phased Consistency Models; G-U-N/Phased-Consistency-Model
``code/text_to_image_sdxl/{train_pcm_lora_sdxl_adv.py, discriminator_sdxl.py}``), written from their description:

* the discriminator is the frozen teacher's encoder (every down block's output and the mid block's) with a small
  trainable head per feature map: 1x1 conv + GroupNorm + LeakyReLU, a residual 1x1 conv + GroupNorm + LeakyReLU,
  and a 1x1 conv to one logit per position;
* "real" is the consistency target and "fake" the student's jump, both at their segment start s, re-noised to a
  time u ~ U{s, ..., s + T / M - 1} (timesteps) with independent noise: x_u = sqrt(a_u / a_s) x_s +
  sqrt(1 - a_u / a_s) z (PCM's ``noise_travel``; a = alpha_bar);
* hinge losses averaged over the heads: discriminator relu(1 + D(fake)) + relu(1 - D(real)), generator
  relu(1 - D(fake)) (:func:`stepdistill.losses.hinge_discriminator_loss`, ``hinge_generator_loss``);
* even iterations update the discriminator only, odd iterations the student (consistency + adv_weight x generator
  term); the discriminator's AdamW uses betas (0, 0.999) and weight decay 1e-3.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.denoiser import Denoiser, _unwrap
from ..models.features import teacher_features

DISCRIMINATOR_BETAS = (0.0, 0.999)  # PCM's discriminator AdamW
DISCRIMINATOR_WEIGHT_DECAY = 1e-3


def encoder_features(teacher: Denoiser, x_t, t, cond) -> list[torch.Tensor]:
    """The outputs of every down block and of the mid block of the teacher's UNet at (x_t, t, cond), differentiable
    with respect to x_t (the weights stay frozen; a teacher sharing its base with a LoRA student runs with the
    adapters off). The up path is skipped (:func:`~stepdistill.models.features.teacher_features`)."""
    net = _unwrap(teacher.net)
    return teacher_features(teacher, [*net.down_blocks, net.mid_block], x_t, t, cond)


def supports_encoder_features(net) -> bool:
    net = _unwrap(net)
    return getattr(net, "down_blocks", None) is not None and getattr(net, "mid_block", None) is not None


class FeatureHead(nn.Module):
    """One feature map -> a map of logits: two 1x1 conv + GroupNorm + LeakyReLU blocks (the second residual) and a
    1x1 conv to one channel."""

    def __init__(self, channels: int):
        super().__init__()
        groups = math.gcd(32, channels)
        self.block1 = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.GroupNorm(groups, channels), nn.LeakyReLU())
        self.block2 = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.GroupNorm(groups, channels), nn.LeakyReLU())
        self.out = nn.Conv2d(channels, 1, 1)

    def forward(self, h):
        h = self.block1(h)
        return self.out(self.block2(h) + h)


class EncoderDiscriminatorHeads(nn.Module):
    """The trainable part of PCM's discriminator: one :class:`FeatureHead` per teacher encoder feature map."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.heads = nn.ModuleList(FeatureHead(c) for c in channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.heads):
            raise ValueError(f"{len(feats)} feature maps for {len(self.heads)} discriminator heads")
        return [head(f.float()) for head, f in zip(self.heads, feats)]


def renoise(schedule, x_s: torch.Tensor, noise: torch.Tensor, s, u) -> torch.Tensor:
    """Forward diffusion from time s to a later time u of a VP schedule (PCM's ``noise_travel``):
    sqrt(a_u / a_s) x_s + sqrt(1 - a_u / a_s) noise, a = alpha_bar = alpha^2."""
    ratio = (schedule.alpha(u) / schedule.alpha(s)) ** 2
    ratio = ratio.to(x_s.device, torch.float64).reshape(-1, *([1] * (x_s.ndim - 1)))
    return (ratio.sqrt() * x_s.double() + (1 - ratio).clamp_min(0).sqrt() * noise.double()).to(x_s.dtype)
