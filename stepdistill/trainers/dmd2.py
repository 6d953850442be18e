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
from ..sampling import initial_noise_scale
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
    min_step_percent / max_step_percent (`float`, `0.02` / `0.98`): DM timestep range, as DMD2 reads it:
        integer timesteps uniform in [int(min * T), int(max * T)] (both ends included; [20, 980] for T = 1000).
    dfake_gen_update_ratio (`int`, `5`): fake-score updates per generator update (10 for SD1.5).
    dm_loss_weight (`float`, `1.0`).
    > Generator steps
    denoising_timesteps (`list[int]`, `[]`: the top of the teacher's schedule, 999 for a 1000-step VP or EDM
        teacher, 1000 (t = 1, pure noise) for a flow-matching teacher): the generator's input timesteps (integer
        timesteps of the teacher schedule; [999, 749, 499, 249] for 4-step SDXL, [399] for 1-step SDXL). A flow
        teacher's timesteps run 0..T (diffusers' FlowMatch timesteps are sigma * T).
    backward_simulation (`bool`, `true`): train step k on the generator's own k-step result (k shared by all
        processes) instead of on noised real images.
    > GAN (a head on the fake score's bottleneck)
    gan_generator_weight (`float`, `0.0`: off; DMD2: 3e-3 ImageNet, 1e-3 SD1.5 stage 2, 5e-3 SDXL),
    gan_discriminator_weight (`float`, `0.01`), gan_max_timestep (`int`, `1000`): diffusion-GAN noise range,
        integer timesteps uniform in [0, gan_max_timestep) (DMD2's ``diffusion_gan_max_timestep``; >= 1).
    gan_noise (`str`, `"diffusion"`): "diffusion" (DMD2's ``--diffusion_gan``, every script) or "none"
        (DMD2 without it: the head sees clean samples at timestep 0).
    share_fake_forward (`bool`, `false`): the generator's GAN term reads the bottleneck of the DM loss's own
        fake-score forward (one fake forward per generator update instead of two: the DM's, run with the input
        gradient, its output detached). This changes the algorithm: DMD2 draws the GAN term's timestep and noise
        separately (uniform in [0, gan_max_timestep)); shared, the GAN generator term sees the DM's x_t (timesteps
        in [min_step_percent, max_step_percent]). The discriminator's inputs are drawn as before. DMD2 only,
        with the GAN on, gan_noise: diffusion and fake_guidance_scale: 1.
    gan_head (`str`, `"dmd2"`): "dmd2" (DMD2's ``cls_pred_branch``: Conv 4x4 s2 + GroupNorm + SiLU down to
        4x4, Conv 4x4 s4 + GroupNorm + SiLU to 1x1, Conv 1x1 to the logit) or "pooled" (stepdistill's earlier
        head: stride-2 convs down to 2x2, a 1x1 conv, global average, 1x1 logit).
    > Regression warm start (DMD v1)
    regression_weight (`float`, `0.0`: off), regression_pairs (`int`, `1024`), regression_steps (`int`, `25`):
        teacher DDIM steps used to make (noise, image) pairs; regression_batch (`int`, `64`).
    > Fake score (SiD-LSG / SwiftBrush options; the defaults are DMD2's)
    fake_guidance_scale (`float`, `1.0`): CFG on the fake score, both where it is fitted and where it is read
        in the generator loss (SiD-LSG's kappa1 = kappa2 = kappa3; DMD2 asserts 1). VSD does not use it:
        SwiftBrush reads its LoRA fake score with real_guidance_scale and fits it without CFG.
    fake_min_step_percent / fake_max_step_percent (`float`, `0.0` / `1.0`): the fake-score loss's timesteps,
        [int(min T), int(max T)] (DMD2, SwiftBrush: [0, 999]; SiD-LSG: [20, 980) = 0.02 / 0.979).
    fake_cond_dropout (`float`, `0.0`): probability of the null condition in the fake-score loss (SiD-LSG
        0.1 when its fake CFG is not 1; SwiftBrush 0.1).
    fake_cond_dropout_mode (`str`, `"sample"`): drop each sample's condition ("sample", SiD-LSG) or the whole
        batch's ("batch", SwiftBrush's ``random.random() < 0.1``).
    > Generator input and update order
    generator_input (`str`, `"noise"`): the first step's input: "noise" (z, DMD2 and SwiftBrush) or "scaled"
        (add_noise(0, z, t) = sigma(t) z at the first generator timestep: SiD-LSG's 0.9286 z at 625; one-step
        full generators; stock pipelines feed z, so the export is the network and student.json, not a pipeline).
    update_order (`str`, `"generator_first"`): "generator_first" (DMD2, SwiftBrush: the fake score then fits
        the generator's batch, detached) or "fake_first" (SiD, SiD-LSG: the fake score first, each update on
        freshly generated samples).
    > EMA of the generator (``ema_decay`` as for every method)
    ema_warmup (`bool`, `false`): diffusers' EMAModel decay, min(ema_decay, (1 + s) / (10 + s)) at the s-th
        generator update (0 at the first): SwiftBrush's EMA.
    ema_halflife_mimg (`float`, `0.0`: off): SiD's EMA (``--ema``, million images): decay 0.5 ** (global_batch
        / h) with h = min(half-life, images seen x ema_rampup_ratio); replaces ema_decay.
    ema_rampup_ratio (`float`, `0.05`): SiD's ramp-up (0: none).
    > Initialisation (DMD2's two-stage SD1.5 recipe: stage 2 starts from stage 1's networks, ``--ckpt_only_path``)
    init_generator (`str`, `""`): start the generator from a stepdistill checkpoint folder
        (``<output_dir>/checkpoints/step_N``: its generator weights, not its EMA) or an exported pipeline folder
        (``<output_dir>/pipeline``: its unet / transformer; full generators only).
    init_fake_score (`str`, `""`): start the fake score from a checkpoint folder's fake score.
        Unlike ``resume``, these load weights only: the teacher stays the one named by ``teacher`` (the real
        score), networks the checkpoint lacks (the GAN head) start fresh, and so do the step counter, the
        optimisers and the LR warm-up. ``resume`` of the new run's own checkpoints still works with them set.
    real_score (`str`, `""`: the teacher): distil against these frozen weights instead of the teacher's (a
        .safetensors file, a checkpoint folder's fake score, a diffusers model folder): loaded strictly into a
        copy of the teacher's network, with ``teacher_dtype`` / ``teacher_offload`` (stepdistill/models/frozen.py).
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
    denoising_timesteps: list[int] = field(default_factory=list)
    backward_simulation: bool = True
    gan_generator_weight: float = 0.0
    gan_discriminator_weight: float = 0.01
    gan_max_timestep: int = 1000
    gan_noise: str = "diffusion"
    gan_head: str = "dmd2"
    share_fake_forward: bool = False
    regression_weight: float = 0.0
    regression_pairs: int = 1024
    regression_steps: int = 25
    regression_batch: int = 64
    fake_guidance_scale: float = 1.0
    fake_min_step_percent: float = 0.0
    fake_max_step_percent: float = 1.0
    fake_cond_dropout: float = 0.0
    fake_cond_dropout_mode: str = "sample"
    generator_input: str = "noise"
    update_order: str = "generator_first"
    ema_warmup: bool = False
    ema_halflife_mimg: float = 0.0
    ema_rampup_ratio: float = 0.05
    init_generator: str = ""
    init_fake_score: str = ""
    real_score: str = ""
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
        if not 0 <= self.fake_min_step_percent < self.fake_max_step_percent <= 1:
            raise ConfigError(
                "need 0 <= fake_min_step_percent < fake_max_step_percent <= 1, got "
                f"{self.fake_min_step_percent}, {self.fake_max_step_percent}"
            )
        if not 0 <= self.fake_cond_dropout < 1:
            raise ConfigError(f"fake_cond_dropout must be in [0, 1), got {self.fake_cond_dropout}")
        for key, allowed in (
            ("fake_cond_dropout_mode", ("sample", "batch")),
            ("generator_input", ("noise", "scaled")),
            ("update_order", ("generator_first", "fake_first")),
        ):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.generator_input == "scaled" and (len(self.denoising_timesteps) > 1 or self.generator_mode != "full"):
            raise ConfigError(
                "generator_input=scaled (SiD-LSG's sigma(t) z input) is for one-step full generators; use one "
                "denoising timestep and generator_mode: full, or generator_input: noise"
            )
        if self.ema_halflife_mimg < 0 or self.ema_rampup_ratio < 0:
            raise ConfigError("ema_halflife_mimg and ema_rampup_ratio must be >= 0")
        if self.ema_halflife_mimg > 0 and self.ema_decay == 0:  # switches the EMA on; the decay is per step
            self.ema_decay = 0.5 ** (self.global_batch / (self.ema_halflife_mimg * 1e6))
        if self.ema_warmup and self.ema_decay == 0:
            raise ConfigError("ema_warmup=true needs ema_decay > 0 (its cap; SwiftBrush: 0.9999)")
        if self.ema_decay > 0 and self.generator_mode == "lora":
            raise ConfigError(
                "ema_decay > 0 with generator_mode=lora is not supported (the EMA would cover the "
                "whole base network); use ema_decay: 0.0 or a full generator"
            )
        if self.dfake_gen_update_ratio < 1:
            raise ConfigError(f"dfake_gen_update_ratio must be >= 1, got {self.dfake_gen_update_ratio}")
        ts = self.denoising_timesteps
        if ts and (any(b >= a for a, b in zip(ts, ts[1:])) or min(ts) < 0):
            raise ConfigError(f"denoising_timesteps must be decreasing non-negative integers, got {ts}")
        if self.real_score and not os.path.exists(self.real_score):
            raise ConfigError(f"real_score: {self.real_score!r} does not exist")
        for key in ("init_generator", "init_fake_score"):
            path = getattr(self, key)
            if path and not os.path.isdir(path):
                raise ConfigError(
                    f"{key}: folder {path!r} does not exist (a checkpoint folder or an exported pipeline)"
                )
        if self.init_fake_score and not _is_checkpoint(self.init_fake_score):
            raise ConfigError(
                f"init_fake_score: {self.init_fake_score!r} is not a checkpoint folder (checkpoints/step_N with "
                "fake_score.safetensors); an exported pipeline has no fake score"
            )
        if self.init_generator and not _is_checkpoint(self.init_generator) and self.generator_mode != "full":
            raise ConfigError(
                f"init_generator: {self.init_generator!r} is an exported pipeline (fused weights), which a LoRA "
                "generator cannot start from; use a checkpoint folder (checkpoints/step_N) or generator_mode: full"
            )
        if self.gan_max_timestep < 1:
            raise ConfigError(
                f"gan_max_timestep must be >= 1 (the diffusion-GAN noise is drawn from [0, gan_max_timestep)), got "
                f"{self.gan_max_timestep}; for DMD2's GAN on clean samples (timestep 0) set gan_noise: none"
            )
        if self.gan_noise not in ("diffusion", "none"):
            raise ConfigError(f"gan_noise must be 'diffusion' or 'none', got {self.gan_noise!r}")
        if self.gan_head not in ("dmd2", "pooled"):
            raise ConfigError(f"gan_head must be 'dmd2' or 'pooled', got {self.gan_head!r}")
        if self.share_fake_forward and (
            self.gan_generator_weight <= 0 or self.gan_noise != "diffusion" or self.fake_guidance_scale != 1.0
        ):
            raise ConfigError(
                "share_fake_forward=true shares the DM loss's fake-score forward with the GAN generator term: it "
                "needs gan_generator_weight > 0, gan_noise: diffusion and fake_guidance_scale: 1 (got "
                f"{self.gan_generator_weight}, {self.gan_noise!r}, {self.fake_guidance_scale})"
            )
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
# initialisation from an earlier run (two-stage training)
# --------------------------------------------------------------------------------------------------------


def _is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "trainer_state.json"))


def _init_weights(wrapper, path: str, name: str, key: str) -> None:
    """Load network ``name`` of a checkpoint folder (or an exported pipeline's unet / transformer) into
    ``wrapper.net``; a LoRA wrapper takes its own adapter's weights only."""
    from safetensors.torch import load_file

    net = _unwrap(wrapper.net)
    if _is_checkpoint(path):
        file = os.path.join(path, f"{name}.safetensors")
        if not os.path.isfile(file):
            raise ConfigError(f"{key}: checkpoint {path!r} has no {name}.safetensors")
        sd = load_file(file)
    else:
        sub = next((d for d in ("unet", "transformer") if os.path.isdir(os.path.join(path, d))), None)
        if sub is None:
            raise ConfigError(
                f"{key}: {path!r} is neither a checkpoint folder nor a pipeline with unet/ or transformer/"
            )
        sd = type(net).from_pretrained(path, subfolder=sub).state_dict()
    adapter = getattr(wrapper, "adapter_name", None)
    if adapter is not None:  # the shared base is the teacher: take the adapter's own weights only
        sd = {k: v for k, v in sd.items() if f".{adapter}." in k}
        if not sd:
            raise ConfigError(f"{key}: {path!r} has no weights of the LoRA adapter {adapter!r}")
        missing = [k for k in sd if k not in net.state_dict()]
        if missing:
            raise ConfigError(f"{key}: {path!r} has LoRA weights this network lacks (e.g. {missing[0]})")
        net.load_state_dict(sd, strict=False)
        return
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise ConfigError(f"{key}: the weights in {path!r} do not fit the {name} ({str(e).splitlines()[0]})") from e


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


def _weighted(g, weight):
    """g scaled per sample by ``weight`` (B,), or g itself when None."""
    return g if weight is None else g * weight.to(g).reshape(-1, *([1] * (g.ndim - 1)))


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
    """The GAN classifier on the fake score's bottleneck map (B, C, S, S).

    ``kind="dmd2"`` is DMD2's ``cls_pred_branch`` (tianweiy/DMD2 ``main/sd_guidance.py``, ``main/edm/
    edm_guidance.py``): Conv(4x4, s2, p1) + GroupNorm(32) + SiLU while the map is larger than 4x4, then
    Conv(4x4, s4) + GroupNorm + SiLU to 1x1 (a map smaller than 4 gets a kernel of its own size), then a
    1x1 conv to one logit; on SD1.5's 8x8 bottleneck that is exactly DMD2's three convs. ``kind="pooled"``
    is stepdistill's earlier head: stride-2 convs down to 2x2, a 1x1 conv, a global average, a 1x1 logit."""

    def __init__(self, channels: int, spatial: int, width: int | None = None, kind: str = "dmd2"):
        super().__init__()
        width = width or channels

        def block(cin, k, stride, pad):
            return [
                nn.Conv2d(cin, width, k, stride=stride, padding=pad),
                nn.GroupNorm(math.gcd(32, width), width),
                nn.SiLU(),
            ]

        layers, c, s = [], channels, spatial
        floor = 4 if kind == "dmd2" else 2
        while s > floor:
            layers += block(c, 4, 2, 1)
            c, s = width, s // 2
        layers += block(c, s, s, 0) if kind == "dmd2" else block(c, 1, 1, 0)
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
    has_fake_score = True  # accepts fake_score=<nn.Module> (see StudentTrainer)

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
        if c.share_fake_forward and type(self).generator_loss is not DMD2Trainer.generator_loss:
            raise ConfigError(
                f"share_fake_forward=true is DMD2's option (its DM loss's fake forward); {type(self).__name__} "
                "computes another generator loss: set share_fake_forward: false"
            )

    def build(self):
        c = self.config
        device = self.accelerator.device
        self.build_teacher()
        self.gen_times = self.generator_times()
        if c.real_guidance_scale != 1.0:
            self.require_guidance("real_guidance_scale", c.real_guidance_scale)
        if c.fake_guidance_scale != 1.0:
            self.require_guidance("fake_guidance_scale", c.fake_guidance_scale)
        if c.fake_cond_dropout > 0 and self.conditioner is not None:  # unconditional teachers: nothing to drop
            self.require_guidance("fake_cond_dropout", c.fake_cond_dropout)

        # full copies are taken before any LoRA adapter is added to the teacher's network, so that a full
        # fake score does not carry (and train) a copy of a LoRA generator's adapter
        def make_generator():
            return self.make_generator(self.gen_times)

        self.student_prediction(self.gen_times)  # the fake score is converted to the student's type too

        def make_fake():
            if self.fake_score_object is not None:
                return self.wrap_object(FakeScore, self.fake_score_object)
            self.check_copy_source("fake_score")
            fake = FakeScore.from_teacher(
                self.teacher,
                c.fake_score_mode,
                lora_rank=c.lora_rank,
                lora_alpha=c.lora_alpha,
                target_modules=c.lora_target_modules or None,
            )
            return self.reinterpret_fake_score(fake)

        if c.fake_score_mode == "full":
            self.fake = make_fake()
            self.generator = make_generator()
        else:
            self.generator = make_generator()
            self.fake = make_fake()
        if c.generator_input == "scaled":  # SiD-LSG: add_noise(0, z, t0) = sigma(t0) z
            t0 = self.gen_times[0]
            self.generator.input_scale = float(self.schedule.sigma(t0)) / initial_noise_scale(self.schedule, t0)
        if c.init_generator:
            _init_weights(self.generator, c.init_generator, "generator", "init_generator")
            self.generator.set_anchor(None)  # not the teacher's weights: no teacher term
        if c.init_fake_score:
            _init_weights(self.fake, c.init_fake_score, "fake_score", "init_fake_score")
        self.use_gan = c.gan_generator_weight > 0
        if self.use_gan and not self.has_real_images():
            raise ConfigError("gan_generator_weight > 0 needs real images; the dataset has none")
        if self.use_gan:
            try:
                self.head = self._build_head(device)
            except ValueError as e:  # a fake score without a bottleneck (a fake_score object of one's own)
                raise ConfigError(f"gan_generator_weight > 0: {e}; set gan_generator_weight: 0") from None
        if c.real_score:
            self.swap_real_score(c.real_score)
        self._pairs = None  # (teacher, pairs): made from the current teacher at first use (see ``pairs``)
        self._cache = None

    def has_real_images(self) -> bool:
        """Whether the GAN has real samples (f-distill: teacher samples stand in for them)."""
        return self.dataset.has_images

    def _build_head(self, device):
        with torch.no_grad(), FeatureTap(self.fake.net) as tap:
            x = torch.zeros(1, *self.sample_shape, device=device)
            self.fake.raw(x, torch.full((1,), 0.5, dtype=torch.float64), self._cond_batch(self.dataset.example(1)))
            h = _as_map(tap.value)
        return DiscriminatorHead(h.shape[1], h.shape[-1], kind=self.config.gan_head).to(device)

    def generator_times(self) -> torch.Tensor:
        """The generator's input times from ``denoising_timesteps`` (default: the top of the schedule)."""
        c = self.config
        top = self.schedule_levels() - (0 if self.schedule.kind == "flow" else 1)
        ts = list(c.denoising_timesteps) or [top]
        if self.schedule.kind == "flow" and ts[0] == top - 1:
            raise ConfigError(
                f"denoising_timesteps: {ts[0]} on a flow-matching teacher is t = {ts[0] / top:g}, but the generator's "
                f"first input is pure noise (t = 1); use {top} (a flow teacher's timesteps run 0..{top})"
            )
        return self.timesteps_to_t(ts, "denoising_timesteps")

    def schedule_levels(self) -> int:
        """T: the number of integer timesteps of the teacher's schedule (EDM: its Karras grid, DMD2's 1000)."""
        return int(self.schedule.num_train_timesteps)

    def draw_t(self, n: int, lo: float, hi: float, device=None) -> torch.Tensor:
        """Times of n integer timesteps uniform in [int(lo * T), int(hi * T)], both ends included and clipped to
        the schedule (DMD2's ``torch.randint(min_step, min(max_step + 1, T))``)."""
        T = self.schedule_levels()
        a = int(lo * T + 1e-9)
        b = min(int(hi * T + 1e-9), T - 1)
        idx = rnd.randint(a, max(b, a) + 1, (n,))
        return self.schedule.timestep_to_t(idx.to(torch.float64)).to(device)

    def fake_times(self, n: int, device=None) -> torch.Tensor:
        """The fake-score loss's times: integer timesteps in [fake_min, fake_max] (SIM adds SiD's log-normal)."""
        c = self.config
        return self.draw_t(n, c.fake_min_step_percent, c.fake_max_step_percent, device)

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
            if self.config.update_order == "fake_first":
                return [fake_group, ("generator",)]
            return [("generator",), fake_group]
        return [fake_group]

    def ema_decay_now(self) -> float:
        """SiD's half-life EMA or diffusers' EMAModel warm-up (``ema_warmup``), else the constant decay."""
        c = self.config
        if c.ema_halflife_mimg > 0:
            half = c.ema_halflife_mimg * 1e6
            if c.ema_rampup_ratio > 0:
                half = min(half, self.global_step * c.global_batch * c.ema_rampup_ratio)
            return 0.5 ** (c.global_batch / max(half, 1e-8))
        if c.ema_warmup:
            s = self.global_step // c.dfake_gen_update_ratio  # generator updates before this one
            return 0.0 if s <= 0 else min(c.ema_decay, (1 + s) / (10 + s))
        return c.ema_decay

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
        """x noised at integer timesteps uniform in [0, gan_max_timestep) (DMD2's diffusion GAN), or x itself at
        timestep 0 (``gan_noise: none``)."""
        c = self.config
        n = x.shape[0]
        if c.gan_noise == "none":
            return x, self.schedule.timestep_to_t(torch.zeros(n, dtype=torch.float64)).to(x.device)
        idx = rnd.randint(0, min(c.gan_max_timestep, self.schedule_levels()), (n,))
        t = self.schedule.timestep_to_t(idx.to(torch.float64)).to(x.device)
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

    def dm_loss(self, x, cond, with_gan: bool = False):
        """DMD2's distribution-matching loss at x_t drawn here. ``with_gan`` (``share_fake_forward``): the fake
        score's forward at this x_t also feeds the GAN head; returns (loss, the head's logits on x) then."""
        c = self.config
        t = self.draw_t(x.shape[0], c.min_step_percent, c.max_step_percent, x.device)
        x_t = self.schedule.add_noise(x.detach(), rnd.randn_like(x), t)
        fake, logits = self._shared_fake_forward(x, x_t, t, cond) if with_gan else (None, None)
        loss = self._dm_loss_at(x, x_t, t, cond, fake)
        return (loss, logits) if with_gan else loss

    def _shared_fake_forward(self, x, x_t, t, cond):
        """One fake-score forward at x_t, differentiable w.r.t. the generator's x (the fake score's weights are
        frozen in the generator group): its output (detached) for the DM loss and the GAN head's logits on its
        bottleneck. x_t + add_noise(x - sg(x), 0, t) has x_t's value and add_noise's gradient w.r.t. x."""
        x_g = x_t + self.schedule.add_noise(x - x.detach(), torch.zeros_like(x), t)
        with FeatureTap(self.fake.net) as tap:
            out = self.fake.raw(x_g, t, cond)
        return out.detach(), self.head(_as_map(tap.value).float())

    def _dm_loss_at(self, x, x_t, t, cond, fake=None, weight=None):
        """The DM loss at x_t; ``fake``: the fake score's raw output there when it is already computed; ``weight``
        (B,): a per-sample factor on the gradient g (f-distill's h(r))."""
        c = self.config
        if resolve_backend(None, x) == "triton":  # CUDA: CFG'd teacher + fake -> x0 -> g in two fused passes
            with torch.no_grad():
                real = self.real_score.raw(x_t, t, cond, c.real_guidance_scale)
                if fake is None:
                    fake = self.fake.raw(x_t, t, cond, c.fake_guidance_scale)
            a, s = step_coefficients(self.schedule, t, x.device)
            g = fused_dmd_gradient(
                x,
                x_t,
                real,
                fake,
                a,
                s,
                real_pred_type=self.real_score.prediction_type,
                fake_pred_type=self.fake.prediction_type,
            )
            return distribution_matching_loss(x, _weighted(g, weight))
        with torch.no_grad():
            x0_real = self.real_score.predict(
                x_t, t, cond, target="x0", guidance_scale=c.real_guidance_scale, float64=True
            )
            if fake is None:
                x0_fake = self.fake.predict(
                    x_t, t, cond, target="x0", guidance_scale=c.fake_guidance_scale, float64=True
                )
            else:  # as predict(float64=True) converts its raw output
                x0_fake = self.schedule.convert(fake.double(), x_t.double(), t, self.fake.prediction_type, "x0")
        g = dmd_gradient(x, x0_real, x0_fake)
        return distribution_matching_loss(x, _weighted(g, weight))

    # ---------------------------------------------------------------- hooks
    def generator_loss(self, x, cond):
        """DMD2's distribution-matching loss: the per-method part of the family (SIM / VSD override it)."""
        loss = self.dm_loss(x, cond)
        return self.config.dm_loss_weight * loss, {"loss_dm": loss.detach()}

    def fake_cond(self, cond):
        """The fake-score loss's condition with ``fake_cond_dropout`` applied (per sample or per batch)."""
        c = self.config
        if cond is None or c.fake_cond_dropout <= 0:
            return cond
        if c.fake_cond_dropout_mode == "batch":  # one draw shared by every process
            return cond.drop(1.0) if float(rnd.rand(())) < c.fake_cond_dropout else cond
        return cond.drop(c.fake_cond_dropout)

    def fake_loss(self, x, cond):
        """Denoising score matching of the fake score on sg(x) at timesteps [fake_min, fake_max] (DMD2: all),
        with ``fake_guidance_scale`` CFG (DMD2: none) and ``fake_cond_dropout``."""
        c = self.config
        t = self.fake_times(x.shape[0], x.device)
        kw = {}
        if self.schedule.kind == "edm":  # DMD2's EDM fake loss: (sigma^-2 + sigma_data^-2) |D_fake - x|^2
            sd = self.schedule.p.sigma_data
            kw = dict(weighting="x0", weight_fn=lambda t: self.schedule.sigma(t) ** -2 + sd**-2)
        return self.fake.dsm_loss(x.detach(), self.fake_cond(cond), t=t, guidance_scale=c.fake_guidance_scale, **kw)

    def compute_loss(self, batch, phase):
        """The family's shared step: generator group = method loss (+ GAN, + regression); fake group =
        fake-score DSM (+ discriminator) on the same generated batch, detached."""
        c = self.config
        cond = self._cond_batch(batch)
        if "generator" in phase:
            x = self.generate(batch, cond, self.global_step, grad=True)
            if c.update_order == "generator_first":  # the fake score then fits this batch
                self._cache = (x.detach(), cond)
            if c.share_fake_forward:  # one fake forward for the DM loss and the GAN generator term
                loss_dm, logits = self.dm_loss(x, cond, with_gan=True)
                loss, out = c.dm_loss_weight * loss_dm, {"loss_dm": loss_dm.detach()}
            else:
                loss, out = self.generator_loss(x, cond)
                logits = self.gan_logits([x], cond)[0] if self.use_gan else None
            if self.use_gan:
                loss_g = gan_generator_loss(logits)
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
    @property
    def pairs(self):
        """DMD v1's (noise, teacher image, batch) pairs, None with regression_weight 0. Made from the teacher
        at their first use, and again when ``self.teacher`` has been replaced since (a teacher swapped after
        ``setup()`` is the one the regression term follows). Seeded by ``seed``: a resume makes the same."""
        if self.config.regression_weight <= 0:
            return None
        if self._pairs is None or self._pairs[0] is not self.teacher:
            self._pairs = (self.teacher, self._make_regression_pairs())
        return self._pairs[1]

    @torch.no_grad()
    def _make_regression_pairs(self):
        c = self.config
        device = self.accelerator.device
        g = torch.Generator().manual_seed(c.seed + 7)
        batch = self.dataset.example(c.regression_pairs, generator=g)
        cond = self._cond_batch(batch)
        noise = torch.randn(c.regression_pairs, *self.sample_shape, generator=g).to(device)
        images = []
        for s in range(0, c.regression_pairs, 256):
            sl = slice(s, s + 256)
            images.append(self.regression_images(noise[sl], cond.index(sl) if cond is not None else None, s))
        return noise, torch.cat(images), batch

    def regression_images(self, noise, cond, start: int):
        """The pairs' images of a chunk of noise (``start``: its first pair): the teacher's DDIM samples."""
        from ..sampling import sample

        c = self.config
        return sample(
            lambda x, t: self.teacher.raw(x, t, cond, c.real_guidance_scale),
            self.schedule,
            noise,
            c.regression_steps,
            pred_type=self.teacher.prediction_type,
        )

    def regression_loss(self):
        noise, images, batch = self.pairs
        idx = rnd.randint(len(noise), (min(self.config.regression_batch, len(noise)),))
        cond = self._cond_batch(
            {k: (v[idx] if torch.is_tensor(v) else [v[i] for i in idx]) for k, v in batch.items() if k != "_n"}
        )
        x = self.generator(self.generator.initial_noise(noise[idx]), cond, self.gen_times[0].expand(len(idx)))
        return denoising_loss(x, images[idx])
