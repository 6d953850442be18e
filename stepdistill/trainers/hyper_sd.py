"""Hyper-SD beyond TSCD (Ren et al., NeurIPS 2024, arXiv 2404.13686): human-feedback learning and the one-step stage.

Hyper-SD trains in three stages: trajectory-segmented consistency distillation (TSCD: ``method: consistency``,
``mode: multiphase``), then human-feedback learning (HFL) of the TSCD student, then a one-step stage. This trainer
runs the last two on a student started from a TSCD checkpoint (``init_generator``):

* ``stage: hfl`` (ReFL-style; Xu et al. 2023, THUDM/ImageReward): per step, one of the student's trained steps k is
  drawn from ``reward_steps`` (shared by every process); the student's own sampler runs steps 0..k-1 without
  gradient, then one differentiable step predicts x0 from x_{t_k}; it is decoded (latent models) and scored by every
  reward d: L = sum_d w_d mean ReLU(alpha_d - r_d(x0, c)) (Hyper-SD's HFL loss; ReFL's is alpha = 2, w = 1e-3).
  ``reward_steps`` defaults to the later half of the trained steps (ReFL stops at a random step of the last quarter
  of its 40-step sampler: the reward models read late, nearly clean, predictions); a one-step student has [0].
  Plus Hyper-SD's perceptual term (``perception_weight``): real images noised to a trained step's time, the
  student's x0 from there, and a frozen perception model's task loss against the image's annotation (Hyper-SD: an
  instance-segmentation model's loss against ground-truth masks; the digits analogue here: the digits classifier's
  cross-entropy against the real label). Only the generator is trained (no fake score).
* ``stage: one_step``: score distillation on the TSCD student turned one-step generator, as DMD2 (the fake score,
  the two-time-scale rule, ``dm_loss_weight``: :mod:`stepdistill.trainers.dmd2`), plus Hyper-SD's MSE term to the
  TSCD model's own output (``regression_weight`` with ``regression_source: init_generator``: pairs of noise and
  the starting student's ``init_timesteps`` sample from that noise, made once at build; DMD v1's teacher pairs
  with ``regression_source: teacher``), plus the HFL terms on the generator's output.

Rewards (``rewards:``, see :mod:`stepdistill.rewards`): ``{kind: digits | clip | aesthetic, weight, margin, ...}``;
in Python any callable image -> score (``HyperSDTrainer(config, rewards=[fn, ...], perception=fn)``).

Example::

    stepdistill train --config recipes/consistency/digits_tscd.yaml   # TSCD 8 -> 4 segments
    stepdistill train --config recipes/hyper_sd/digits.yaml           # HFL on it
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from ..losses import denoising_loss
from ..models.denoiser import _unwrap
from ..rewards import RewardTerm, as_reward, build_reward, check_entry, freeze
from ..sampling import ddim_step
from . import randomness as rnd
from .base import NetSpec
from .dmd2 import DMD2Config, DMD2Trainer, _init_weights
from .student import _decode

STAGES = ("hfl", "one_step")


@dataclass
class HyperSDConfig(DMD2Config):
    """Hyper-SD's HFL and one-step stages. Teacher, data, generator mode and the DMD2 keys (fake score, DM loss,
    GAN, regression, ``init_generator``): :class:`~stepdistill.trainers.dmd2.DMD2Config`.

    > Stage
    stage (`str`, `"hfl"`): "hfl" (reward fine-tune of the generator alone) or "one_step" (DMD2's score
        distillation + MSE to the starting student + the HFL terms).
    generator_sampler (`str`, `"ddim"`): the student's sampler between its trained steps: "ddim" (deterministic
        trailing DDIM: a TSCD student) or "consistency" (x0 re-noised with fresh noise). Exported likewise.
    > Human feedback
    rewards (`list[dict]`, `[]`): reward terms ``{kind, weight (1), margin (0), ...}`` (:func:`stepdistill.rewards.
        build_reward`): digits (the bundled classifier's log-confidence in the batch's label; ``classifier``: a
        folder), clip (open_clip image-caption cosine; ``model``, ``pretrained`` file, ``model_config`` JSON,
        ``text_prefix``, ``label_template``), aesthetic (a linear head on open_clip embeddings; ``head``
        safetensors, ``model``, ``pretrained``, ``model_config``).
    reward_steps (`list[int]`, `[]`: hfl: the later half of the trained steps, [n // 2 .. n - 1]; one_step: all):
        indices of the trained steps at which the differentiable step is taken (the steps before it run without
        gradient; in the one-step stage also the DM loss's step).
    perception_weight (`float`, `0.0`: off): Hyper-SD's perceptual term: a perception model's task loss on the
        student's x0 of real images noised to a ``reward_steps`` time, against the image's annotation. Built in:
        ``perception: digits`` (the digits classifier's cross-entropy against the real label; needs real images).
    perception (`str`, `"digits"`), perception_classifier (`str`, `""`: the bundled classifier).
    keep_weight (`float`, `0.0`: off): hfl: weight of mean |x0 - x0_start|^2, the student's differentiable x0
        against a frozen copy of the starting student's at the same input (ours, against reward hacking; ReFL
        regularises with the pre-training loss instead). The copy costs one more network's weights.
    > MSE to the starting student (one-step stage)
    regression_source (`str`, `"teacher"`): "teacher" (DMD v1: teacher DDIM pairs) or "init_generator" (the
        generator's starting weights, from ``init_generator``, sampled at ``init_timesteps`` with ``init_sampler``
        from the same noise: Hyper-SD's MSE target, the TSCD model's output).
    init_timesteps (`list[int]`, `[]`: ``denoising_timesteps``): the starting student's trained timesteps.
    init_sampler (`str`, `"ddim"`): the starting student's sampler ("ddim" or "consistency").
    """

    stage: str = "hfl"
    generator_sampler: str = "ddim"
    rewards: list[dict] = field(default_factory=list)
    reward_steps: list[int] = field(default_factory=list)
    perception_weight: float = 0.0
    perception: str = "digits"
    perception_classifier: str = ""
    keep_weight: float = 0.0
    regression_source: str = "teacher"
    init_timesteps: list[int] = field(default_factory=list)
    init_sampler: str = "ddim"

    def check(self):
        super().check()
        for key, allowed in (
            ("stage", STAGES),
            ("generator_sampler", ("ddim", "consistency")),
            ("init_sampler", ("ddim", "consistency")),
            ("regression_source", ("teacher", "init_generator")),
            ("perception", ("digits",)),
        ):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        for i, entry in enumerate(self.rewards):
            check_entry(entry, i)
        for key in ("perception_weight", "keep_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.stage == "one_step" and self.keep_weight > 0:
            raise ConfigError("keep_weight is an HFL-stage term (stage: hfl); the one-step stage has regression_weight")
        if self.stage == "hfl" and self.gan_generator_weight > 0:
            raise ConfigError(
                "gan_generator_weight > 0 with stage: hfl: the GAN head sits on the fake score, which the HFL stage "
                "does not train; use stage: one_step or gan_generator_weight: 0"
            )


class HyperSDTrainer(DMD2Trainer):
    """Hyper-SD's HFL stage (generator only) and one-step stage (DMD2 + MSE + HFL) on the shared loop."""

    config_class = HyperSDConfig
    method_name = "Hyper-SD"

    def __init__(self, config, accelerator=None, *, rewards=None, perception=None, **objects):
        super().__init__(config, accelerator, **objects)
        self.reward_objects = list(rewards or [])
        self.perception_object = perception

    # ---------------------------------------------------------------- setup
    def validate(self):
        super().validate()
        c = self.config
        if c.stage == "hfl" and not (c.rewards or self.reward_objects or c.perception_weight > 0):
            raise ConfigError("stage: hfl needs rewards (or perception_weight > 0): nothing would be trained")

    def make_generator(self, timesteps, *, sampler=None, w_embedding_dim: int = 0):
        return super().make_generator(
            timesteps, sampler=sampler or self.config.generator_sampler, w_embedding_dim=w_embedding_dim
        )

    def build(self):
        c = self.config
        device = self.accelerator.device
        if c.stage == "one_step":
            super().build()
        else:  # the generator alone: no fake score, no GAN head
            self.build_teacher()
            self.gen_times = self.generator_times()
            self.student_prediction(self.gen_times)
            self.generator = self.make_generator(self.gen_times)
            if c.init_generator:
                _init_weights(self.generator, c.init_generator, "generator", "init_generator")
                self.generator.set_anchor(None)
            self.use_gan = False
            self._pairs = None
            self._cache = None
        self.export_scheduler = "ddim" if c.generator_sampler == "ddim" else "lcm"
        if self.vae is not None:
            freeze(self.vae)
        n = len(self.gen_times)
        default = range(n // 2, n) if c.stage == "hfl" else range(n)
        self.reward_step_indices = list(c.reward_steps) or list(default)
        bad = [k for k in self.reward_step_indices if not 0 <= k < n]
        if bad:
            raise ConfigError(f"reward_steps: {bad} are not indices of the {n} trained steps (0..{n - 1})")
        self.reward_terms = [build_reward(e, device, i) for i, e in enumerate(c.rewards)]
        for i, fn in enumerate(self.reward_objects):
            if isinstance(fn, RewardTerm):
                freeze(fn.fn)
            self.reward_terms.append(fn if isinstance(fn, RewardTerm) else build_reward({"fn": fn}, device, i))
        self.perception_fn = None
        if c.perception_weight > 0:
            if not self.dataset.has_images:
                raise ConfigError("perception_weight > 0 needs real images (the perceptual term noises them)")
            if self.perception_object is not None:
                self.perception_fn = as_reward(freeze(self.perception_object))
            else:
                from ..rewards import DigitsPerception

                self.perception_fn = DigitsPerception(c.perception_classifier or None).to(device)
        self.start_generator = None
        if c.keep_weight > 0:  # a frozen copy of the starting student (full, or base + adapters)
            start = self.generator.with_net(freeze(copy.deepcopy(_unwrap(self.generator.net))))
            start.adapter_name = self.generator.adapter_name
            self.start_generator = start
        if c.regression_weight > 0 and c.regression_source == "init_generator":
            # made now, from the starting weights (a resume rebuilds them from init_generator too)
            self._pairs = (self.teacher, self._make_regression_pairs())

    def networks(self):
        if self.config.stage == "one_step":
            return super().networks()
        c = self.config
        return {"generator": NetSpec(self.generator.net, lr=c.generator_lr or None, params=self.generator_params())}

    def on_prepared(self):
        if self.config.stage == "one_step":
            return super().on_prepared()
        self.generator.net = self.specs["generator"].module

    def phase(self, step):
        if self.config.stage == "one_step":
            return super().phase(step)
        return [("generator",)]

    def ema_decay_now(self) -> float:
        if self.config.stage == "hfl" and self.config.ema_warmup:  # every step updates the generator
            s = self.global_step
            return 0.0 if s <= 0 else min(self.config.ema_decay, (1 + s) / (10 + s))
        return super().ema_decay_now()

    # ---------------------------------------------------------------- the student's own steps
    def shared_step_index(self, step: int) -> int:
        """The step k of the differentiable step, drawn from ``reward_steps`` (identical on every process)."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        idx = self.reward_step_indices
        return idx[int(torch.randint(len(idx), (1,), generator=g))]

    def generate(self, batch, cond, step: int, grad: bool):
        k = self.shared_step_index(step)  # a one-step generator: [0]
        x_t = self._generator_input(batch, cond, k)
        with torch.set_grad_enabled(grad):
            return self.generator(x_t, cond, self.gen_times[k].expand(x_t.shape[0]))

    def _generator_input(self, batch, cond, k: int):
        """x at the k-th trained time: the student's own sampler from noise without gradient (a DDIM student's
        deterministic steps), or noised real images without backward simulation."""
        if k == 0 or not self.config.backward_simulation or self.generator.sampler != "ddim":
            return super()._generator_input(batch, cond, k)
        n = len(batch["_n"])
        x = self.generator.initial_noise(rnd.randn(n, *self.sample_shape, device=self.accelerator.device))
        with torch.no_grad():
            for i in range(k):
                t, t_next = self.gen_times[i].expand(n), self.gen_times[i + 1].expand(n)
                x0 = self.generator(x, cond, t)
                x = ddim_step(self.schedule, x0, self.schedule.to_x0_eps(x0, x, t, "x0")[1], t, t_next)
        return x

    # ---------------------------------------------------------------- human feedback
    def images(self, x):
        """Generator outputs as images in [-1, 1] (latents decoded by the frozen VAE, differentiably)."""
        return _decode(self.vae, x) if self.vae is not None else x

    def hfl_loss(self, x, cond, batch) -> tuple[torch.Tensor, dict]:
        """sum_d w_d mean ReLU(alpha_d - r_d(x)) over the reward terms, plus the perceptual term."""
        out, loss = {}, x.new_zeros(())
        if self.reward_terms:
            images = self.images(x)
            for i, term in enumerate(self.reward_terms):
                name = term.name if sum(t.name == term.name for t in self.reward_terms) == 1 else f"{term.name}{i}"
                part, scores = term.loss(images, batch)
                loss = loss + part
                out[f"reward_{name}"] = scores.mean()
            out["loss_reward"] = loss.detach()
        if self.perception_fn is not None:
            part = self.perception_loss(batch, cond)
            loss = loss + self.config.perception_weight * part
            out["loss_percep"] = part.detach()
        return loss, out

    def perception_loss(self, batch, cond):
        """Hyper-SD's perceptual term: real images noised to a ``reward_steps`` time, the student's x0 from there,
        and the perception model's per-sample task loss against the batch's annotation, averaged."""
        real = batch["image"].to(self.accelerator.device)
        k = self.shared_step_index(self.global_step)
        t = self.gen_times[k].expand(real.shape[0]).to(real.device)
        x0 = self.generator(self.schedule.add_noise(real, rnd.randn_like(real), t), cond, t)
        return self.perception_fn(self.images(x0), batch).mean()

    def generator_loss(self, x, cond):
        """The one-step stage's generator loss: DMD2's (DM) plus the HFL terms on the generator's output."""
        loss, out = super().generator_loss(x, cond)
        extra, more = self.hfl_loss(x, cond, self._batch)
        return loss + extra, {**out, **more}

    def compute_loss(self, batch, phase):
        if self.config.stage == "one_step":
            self._batch = batch
            return super().compute_loss(batch, phase)
        cond = self._cond_batch(batch)
        k = self.shared_step_index(self.global_step)
        x_t = self._generator_input(batch, cond, k)
        t = self.gen_times[k].expand(x_t.shape[0])
        x = self.generator(x_t, cond, t)
        loss, out = self.hfl_loss(x, cond, batch)
        if self.start_generator is not None:
            with torch.no_grad():
                x_start = self.start_generator(x_t, cond, t)
            loss_keep = denoising_loss(x, x_start)
            loss = loss + self.config.keep_weight * loss_keep
            out["loss_keep"] = loss_keep.detach()
        if self.pairs is not None:
            loss_r = self.regression_loss()
            loss = loss + self.config.regression_weight * loss_r
            out["loss_reg"] = loss_r.detach()
        return {"loss": loss, **out}

    # ---------------------------------------------------------------- MSE to the starting student
    def regression_images(self, noise, cond, start: int):
        """``regression_source: init_generator``: the starting student's samples (its ``init_timesteps`` and
        ``init_sampler``); the pairs are made at build, from the starting weights."""
        c = self.config
        if c.regression_source == "teacher":
            return super().regression_images(noise, cond, start)
        times = self.timesteps_to_t(c.init_timesteps, "init_timesteps") if c.init_timesteps else self.gen_times
        first = self.generator.with_net(self.generator.net)
        first.timesteps, first.sampler, first.adapter_name = times, c.init_sampler, self.generator.adapter_name
        return first.sample(noise, cond, generator=torch.Generator().manual_seed(c.seed + 8 + start))
