"""DMD2: improved distribution matching distillation (Yin et al., NeurIPS 2024; tianweiy/DMD2).

One iteration (two-time-scale rule): every step the fake score (and the GAN head) is fitted by denoising
score matching to the generator's current samples; every ``dfake_gen_update_ratio`` steps the generator is
updated first with the distribution-matching gradient

    g = (x0_fake - x0_real) / mean_{C,H,W} |x - x0_real|,    L_DM = 0.5 * mse(x, sg(x - g))

(x0_real from the teacher with CFG, x0_fake from the fake score without CFG, both at t in [0.02, 0.98] of
the schedule), plus an optional non-saturating GAN term from a head on the fake score's bottleneck and an
optional regression term on teacher noise / image pairs (DMD v1). N-step generators use backward simulation.

Example::

    stepdistill train --config recipes/dmd2/digits.yaml
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ConfigError
from ..losses import (
    denoising_loss,
    distribution_matching_loss,
    dmd_gradient,
    gan_discriminator_loss,
    gan_generator_loss,
)
from ..models import FakeScore
from ..models.denoiser import _unwrap
from ..ops import fused_dmd_gradient, resolve_backend, step_coefficients
from . import randomness as rnd
from .base import NetSpec
from .student import (  # noqa: F401  (re-exported: the family's helpers used to live here)
    DistillDataset,
    StudentConfig,
    StudentTrainer,
    _adapter_params,
    _conditioning_for,
    _dataset_for,
    _has_null,
    vae_scale_factor,
)


@dataclass
class DMD2Config(StudentConfig):
    """DMD2 settings (defaults from tianweiy/DMD2 ``main/train_sd.py`` and ``experiments/*`` unless noted).

    Teacher, data, generator mode and export keys: :class:`~stepdistill.trainers.student.StudentConfig`.

    > Models
    fake_score_mode (`str`, `"full"`): "full" copy of the teacher or "lora" adapter on it.
    lora_alpha (`float`, `8.0`: DMD2's SDXL LoRA uses rank 64, alpha 8).
    > Distribution matching
    real_guidance_scale (`float`, `1.0`): teacher CFG (uncond + w (cond - uncond)); DMD2 uses 1.75 (SD1.5),
        8 (SDXL); its ImageNet model uses none.
    min_step_percent / max_step_percent (`float`, `0.02` / `0.98`): DM timestep range.
    dfake_gen_update_ratio (`int`, `5`): fake-score updates per generator update (10 for SD1.5).
    dm_loss_weight (`float`, `1.0`).
    > Generator steps
    denoising_timesteps (`list[int]`, `[999]`): the generator's input timesteps (integer timesteps of the
        teacher schedule; [999, 749, 499, 249] for 4-step SDXL, [399] for 1-step SDXL).
    backward_simulation (`bool`, `true`): train step k on the generator's own k-step result (k shared by all
        processes) instead of on noised real images.
    > GAN (a head on the fake score's bottleneck)
    gan_generator_weight (`float`, `0.0`: off; DMD2: 3e-3 ImageNet, 1e-3 SD1.5 stage 2, 5e-3 SDXL),
    gan_discriminator_weight (`float`, `0.01`), gan_max_timestep (`int`, `1000`): diffusion-GAN noise range.
    > Regression warm start (DMD v1)
    regression_weight (`float`, `0.0`: off), regression_pairs (`int`, `1024`), regression_steps (`int`, `25`):
        teacher DDIM steps used to make (noise, image) pairs; regression_batch (`int`, `64`).
    > Optimisation (DMD2: AdamW wd 0.01, clip 10, 500 warm-up steps)
    generator_lr / fake_lr (`float`, `0`: use learning_rate).
    """

    fake_score_mode: str = "full"
    lora_alpha: float = 8.0
    real_guidance_scale: float = 1.0
    min_step_percent: float = 0.02
    max_step_percent: float = 0.98
    dfake_gen_update_ratio: int = 5
    dm_loss_weight: float = 1.0
    denoising_timesteps: list[int] = field(default_factory=lambda: [999])
    backward_simulation: bool = True
    gan_generator_weight: float = 0.0
    gan_discriminator_weight: float = 0.01
    gan_max_timestep: int = 1000
    regression_weight: float = 0.0
    regression_pairs: int = 1024
    regression_steps: int = 25
    regression_batch: int = 64
    generator_lr: float = 0.0
    fake_lr: float = 0.0
    weight_decay: float = 0.01
    max_grad_norm: float = 10.0

    def check(self):
        super().check()
        if self.fake_score_mode not in ("full", "lora"):
            raise ConfigError(f"fake_score_mode must be 'full' or 'lora', got {self.fake_score_mode!r}")
        if not 0 <= self.min_step_percent < self.max_step_percent <= 1:
            raise ConfigError(
                f"need 0 <= min_step_percent < max_step_percent <= 1, got "
                f"{self.min_step_percent}, {self.max_step_percent}"
            )
        if self.ema_decay > 0 and self.generator_mode == "lora":
            raise ConfigError(
                "ema_decay > 0 with generator_mode=lora is not supported (the EMA would cover the "
                "whole base network); use ema_decay: 0.0 or a full generator"
            )
        if self.dfake_gen_update_ratio < 1:
            raise ConfigError(f"dfake_gen_update_ratio must be >= 1, got {self.dfake_gen_update_ratio}")
        ts = self.denoising_timesteps
        if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or min(ts) < 0:
            raise ConfigError(f"denoising_timesteps must be decreasing non-negative integers, got {ts}")
        if self.gan_generator_weight > 0 and self.dataset.endswith((".txt", ".jsonl")):
            raise ConfigError(
                "gan_generator_weight > 0 needs real images, but dataset "
                f"{self.dataset!r} is a prompt file; use an image folder, or set it to 0"
            )
        if not self.backward_simulation and len(ts) > 1 and self.dataset.endswith((".txt", ".jsonl")):
            raise ConfigError(
                f"backward_simulation=false trains later steps on noised real images; dataset {self.dataset!r} has none"
            )


# --------------------------------------------------------------------------------------------------------
# the GAN head on the fake score's bottleneck
# --------------------------------------------------------------------------------------------------------


def bottleneck_module(net: nn.Module) -> nn.Module:
    """The module whose output is the bottleneck: a UNet's mid-block, a transformer's middle block."""
    net = _unwrap(net)
    if getattr(net, "mid_block", None) is not None:
        return net.mid_block
    blocks = getattr(net, "transformer_blocks", None)
    if blocks is not None and len(blocks):
        return blocks[len(blocks) // 2]
    if hasattr(net, "blocks") and len(net.blocks):
        return net.blocks[len(net.blocks) // 2]
    raise ValueError(f"{type(net).__name__} has no mid_block or transformer_blocks for the GAN head")


def _as_map(h):
    """Bottleneck output -> (B, C, H, W): tuples (SD3 blocks) take the image stream, tokens are unflattened,
    vectors become 1x1 maps."""
    if isinstance(h, (tuple, list)):
        h = h[-1]
    if h.ndim == 3:  # (B, N, D) patch tokens
        side = math.isqrt(h.shape[1])
        if side * side != h.shape[1]:
            raise ValueError(f"cannot fold {h.shape[1]} tokens into a square map for the GAN head")
        return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)
    if h.ndim == 2:
        return h[:, :, None, None]
    return h


class FeatureTap:
    """Captures the bottleneck output of every forward of ``net`` while active."""

    def __init__(self, net):
        self.module = bottleneck_module(net)
        self.value = None
        self.handle = None

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda m, i, o: setattr(self, "value", o))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class DiscriminatorHead(nn.Module):
    """Conv(4x4, s2) + GroupNorm + SiLU until the map is at most 2x2, then global average and a 1x1 conv to
    one logit (DMD2's head on the SD1.5 / EDM bottleneck has the same parts)."""

    def __init__(self, channels: int, spatial: int, width: int | None = None):
        super().__init__()
        width = width or channels
        layers, c, s = [], channels, spatial
        while s > 2:
            layers += [nn.Conv2d(c, width, 4, stride=2, padding=1), nn.GroupNorm(math.gcd(32, width), width), nn.SiLU()]
            c, s = width, s // 2
        layers += [nn.Conv2d(c, width, 1), nn.GroupNorm(math.gcd(32, width), width), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.logit = nn.Conv2d(width, 1, 1)

    def forward(self, h):
        return self.logit(self.body(h).mean(dim=(2, 3), keepdim=True)).flatten()


# --------------------------------------------------------------------------------------------------------


class DMD2Trainer(StudentTrainer):
    """DMD2 on the shared loop: hooks only."""

    config_class = DMD2Config
    method_name = "DMD2"
    find_unused_parameters = True  # the GAN head and the fake score's up path are idle in some groups
    trains_several_networks = True

    # ---------------------------------------------------------------- setup
    def validate(self):
        super().validate()
        c = self.config
        if c.generator_mode == "lora" and c.fake_score_mode == "lora" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "generator_mode=lora with fake_score_mode=lora puts both adapters on one shared base "
                "network, which DDP / FSDP cannot wrap twice; use fake_score_mode: full with several "
                "processes"
            )

    def build(self):
        c = self.config
        device = self.accelerator.device
        self.build_teacher()
        self.gen_times = self.timesteps_to_t(c.denoising_timesteps, "denoising_timesteps")
        if c.real_guidance_scale != 1.0:
            self.require_guidance("real_guidance_scale", c.real_guidance_scale)

        # full copies are taken before any LoRA adapter is added to the teacher's network, so that a full
        # fake score does not carry (and train) a copy of a LoRA generator's adapter
        def make_generator():
            return self.make_generator(self.gen_times)

        def make_fake():
            return FakeScore.from_teacher(
                self.teacher,
                c.fake_score_mode,
                lora_rank=c.lora_rank,
                lora_alpha=c.lora_alpha,
                target_modules=c.lora_target_modules or None,
            )

        if c.fake_score_mode == "full":
            self.fake = make_fake()
            self.generator = make_generator()
        else:
            self.generator = make_generator()
            self.fake = make_fake()
        self.use_gan = c.gan_generator_weight > 0
        if self.use_gan and not self.dataset.has_images:
            raise ConfigError("gan_generator_weight > 0 needs real images; the dataset has none")
        if self.use_gan:
            self.head = self._build_head(device)
        self.pairs = self._make_regression_pairs() if c.regression_weight > 0 else None
        self._cache = None

    def _build_head(self, device):
        with torch.no_grad(), FeatureTap(self.fake.net) as tap:
            x = torch.zeros(1, *self.sample_shape, device=device)
            self.fake.raw(x, torch.full((1,), 0.5, dtype=torch.float64), self._cond_batch(self.dataset.example(1)))
            h = _as_map(tap.value)
        return DiscriminatorHead(h.shape[1], h.shape[-1]).to(device)

    def on_step_skipped(self, step):
        self._cache = None

    def networks(self):
        c = self.config
        nets = {
            "generator": NetSpec(
                self.generator.net,
                lr=c.generator_lr or None,
                params=self.generator_params(),
            ),
            "fake_score": NetSpec(
                self.fake.net,
                lr=c.fake_lr or None,
                params=[p for p in self.fake.net.parameters() if p.requires_grad]
                if c.fake_score_mode == "full"
                else _adapter_params(self.fake),
            ),
        }
        if self.use_gan:
            nets["head"] = NetSpec(self.head, lr=c.fake_lr or None)
        return nets

    def on_prepared(self):
        # wrappers go around the prepared modules (DDP): the generator / fake score call through them
        self.generator.net = self.specs["generator"].module
        self.fake.net = self.specs["fake_score"].module
        if self.use_gan:
            self.head = self.specs["head"].module

    def ema_networks(self):
        return ("generator",)

    # ---------------------------------------------------------------- the schedule of updates
    def phase(self, step):
        fake_group = ("fake_score", "head") if self.use_gan else ("fake_score",)
        if step % self.config.dfake_gen_update_ratio == 0:
            return [("generator",), fake_group]
        return [fake_group]

    # ---------------------------------------------------------------- pieces
    def shared_step_index(self, step: int) -> int:
        """Backward simulation's step index k, identical on every process (seeded by the step, so it is also
        identical after a resume)."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        return int(torch.randint(len(self.gen_times), (1,), generator=g))

    def _generator_input(self, batch, cond, k: int):
        """x_t at the generator's k-th time: pure noise (k = 0), the generator's own k-step result re-noised
        (backward simulation, no grad), or a noised real image."""
        device = self.accelerator.device
        n = len(batch["_n"])
        noise = rnd.randn(n, *self.sample_shape, device=device)
        x = self.generator.initial_noise(noise)
        if k == 0:
            return x
        t_k = self.gen_times[k].expand(n)
        if self.config.backward_simulation:
            with torch.no_grad():
                for i in range(k):
                    x0 = self.generator(x, cond, self.gen_times[i].expand(n))
                    x = self.schedule.add_noise(x0, rnd.randn_like(x0), self.gen_times[i + 1].expand(n))
            return x
        real = batch["image"].to(device)
        return self.schedule.add_noise(real, rnd.randn_like(real), t_k)

    def generate(self, batch, cond, step: int, grad: bool):
        k = self.shared_step_index(step) if len(self.gen_times) > 1 else 0
        x_t = self._generator_input(batch, cond, k)
        t = self.gen_times[k].expand(x_t.shape[0])
        with torch.set_grad_enabled(grad):
            return self.generator(x_t, cond, t)

    def _gan_input(self, x):
        """x noised at t ~ U[0, gan_max_timestep)."""
        T = self.schedule.num_train_timesteps
        hi = min(self.config.gan_max_timestep, T) - 1
        t = self.schedule.sample_t(x.shape[0], "uniform", t_min=0.0, t_max=hi / (T - 1)).to(x.device)
        return self.schedule.add_noise(x, rnd.randn_like(x), t), t

    def gan_logits(self, xs, cond):
        """Head logits on the fake score's bottleneck for each batch in ``xs`` (noised by ``_gan_input``, drawn
        batch by batch): one fake-score call for all of them, run only as far as the bottleneck."""
        drawn = [self._gan_input(x) for x in xs]
        k = len(drawn)
        x_t = torch.stack([d[0] for d in drawn], 1).flatten(0, 1)  # rows interleaved: cond.repeat(k) matches
        t = torch.stack([d[1] for d in drawn], 1).flatten(0, 1)
        h = self.fake.bottleneck(x_t, t, cond.repeat(k) if cond is not None else None, bottleneck_module(self.fake.net))
        logits = self.head(_as_map(h).float())
        return [logits[i::k] for i in range(k)]

    def dm_loss(self, x, cond):
        c = self.config
        t = self.schedule.sample_t(x.shape[0], "uniform", t_min=c.min_step_percent, t_max=c.max_step_percent)
        t = t.to(x.device)
        x_t = self.schedule.add_noise(x.detach(), rnd.randn_like(x), t)
        if resolve_backend(None, x) == "triton":  # CUDA: CFG'd teacher + fake -> x0 -> g in two fused passes
            with torch.no_grad():
                real = self.teacher.raw(x_t, t, cond, c.real_guidance_scale)
                fake = self.fake.raw(x_t, t, cond)
            a, s = step_coefficients(self.schedule, t, x.device)
            g = fused_dmd_gradient(
                x,
                x_t,
                real,
                fake,
                a,
                s,
                real_pred_type=self.teacher.prediction_type,
                fake_pred_type=self.fake.prediction_type,
            )
            return distribution_matching_loss(x, g)
        with torch.no_grad():
            x0_real = self.teacher.predict(
                x_t, t, cond, target="x0", guidance_scale=c.real_guidance_scale, float64=True
            )
            x0_fake = self.fake.predict(x_t, t, cond, target="x0", float64=True)
        g = dmd_gradient(x, x0_real, x0_fake)
        return distribution_matching_loss(x, g)

    # ---------------------------------------------------------------- hooks
    def generator_loss(self, x, cond):
        """DMD2's distribution-matching loss: the per-method part of the family (SIM / VSD override it)."""
        loss = self.dm_loss(x, cond)
        return self.config.dm_loss_weight * loss, {"loss_dm": loss.detach()}

    def fake_loss(self, x, cond):
        """Denoising score matching of the fake score on sg(x), full timestep range, no CFG."""
        return self.fake.dsm_loss(x.detach(), cond)

    def compute_loss(self, batch, phase):
        """The family's shared step: generator group = method loss (+ GAN, + regression); fake group =
        fake-score DSM (+ discriminator) on the same generated batch, detached."""
        c = self.config
        cond = self._cond_batch(batch)
        if "generator" in phase:
            x = self.generate(batch, cond, self.global_step, grad=True)
            self._cache = (x.detach(), cond)
            loss, out = self.generator_loss(x, cond)
            if self.use_gan:
                loss_g = gan_generator_loss(self.gan_logits([x], cond)[0])
                loss = loss + c.gan_generator_weight * loss_g
                out["loss_gan_g"] = loss_g.detach()
            if self.pairs is not None:
                loss_r = self.regression_loss()
                loss = loss + c.regression_weight * loss_r
                out["loss_reg"] = loss_r.detach()
            return {"loss": loss, **out}
        if self._cache is not None:
            x, cond = self._cache
            self._cache = None
        else:
            x = self.generate(batch, cond, self.global_step, grad=False)
        loss_fake = self.fake_loss(x.detach(), cond)
        loss = loss_fake
        out = {"loss_fake": loss_fake.detach()}
        if self.use_gan:
            real = batch["image"].to(x.device)
            loss_d = gan_discriminator_loss(*self.gan_logits([real, x.detach()], cond))
            loss = loss + c.gan_discriminator_weight * loss_d
            out["loss_gan_d"] = loss_d.detach()
        return {"loss": loss, **out}

    # ---------------------------------------------------------------- regression pairs (DMD v1)
    @torch.no_grad()
    def _make_regression_pairs(self):
        from ..sampling import sample

        c = self.config
        device = self.accelerator.device
        g = torch.Generator().manual_seed(c.seed + 7)
        batch = self.dataset.example(c.regression_pairs, generator=g)
        cond = self._cond_batch(batch)
        noise = torch.randn(c.regression_pairs, *self.sample_shape, generator=g).to(device)
        images = []
        for s in range(0, c.regression_pairs, 256):
            sl = slice(s, s + 256)
            cs = cond.index(sl) if cond is not None else None
            images.append(
                sample(
                    lambda x, t, cs=cs: self.teacher.raw(x, t, cs, c.real_guidance_scale),
                    self.schedule,
                    noise[sl],
                    c.regression_steps,
                    pred_type=self.teacher.prediction_type,
                )
            )
        return noise, torch.cat(images), batch

    def regression_loss(self):
        noise, images, batch = self.pairs
        idx = rnd.randint(len(noise), (min(self.config.regression_batch, len(noise)),))
        cond = self._cond_batch(
            {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx]) for k, v in batch.items() if k != "_n"}
        )
        x = self.generator(self.generator.initial_noise(noise[idx]), cond, self.gen_times[0].expand(len(idx)))
        return denoising_loss(x, images[idx])
