"""Denoising score matching: train a diffusion model (a teacher) from data.

This is what makes the bundled digits teacher, and what a user runs to get a teacher for a new small
dataset. Loss: Ho et al. 2020 (eq. 14) in the network's own parameterisation (eps, x0 or v; Salimans & Ho
2022 for v), with label dropout so that classifier-free guidance works (Ho & Salimans 2022).

Example::

    stepdistill train --config recipes/teacher/digits.yaml max_steps=2000
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from ..data import NUM_CLASSES, DigitsDataset, ImageFolderDataset
from ..models.conditioning import ClassConditioner
from ..models.denoiser import Denoiser
from ..sampling import sample
from ..schedules import VPSchedule
from .base import DistillTrainer, NetSpec, TrainConfig


@dataclass
class DSMConfig(TrainConfig):
    """Teacher training. Network, schedule and data settings on top of :class:`TrainConfig`.

    > Data
    dataset (`str`, `"digits"`): "digits" (bundled, class-conditional), "toy2d:<name>" (e.g. toy2d:gmm8; a
        small MLP denoiser, unconditional unless ``toy_classes``) or a folder of images.
    toy_classes (`bool`, `false`): toy2d: a class-conditional MLP (class = mixture component, its labels passed as
        ``cond``; no null class, so label_dropout must be 0), e.g. the teacher of recipes/sfd/toy2d.yaml.
    resolution (`int`, `16`): image side; must be divisible by 2^(len(block_out_channels) - 1).
    label_dropout (`float`, `0.1`): probability of replacing the label by the null class (CFG).
    > Network (diffusers UNet2DModel)
    block_out_channels (`list[int]`, `[32, 64, 64]`), layers_per_block (`int`, `1`),
    attention_levels (`list[bool]`, `[false, false, true]`): self-attention at these resolutions.
    > Schedule (saved as the exported scheduler config)
    num_train_timesteps (`int`, `1000`), beta_schedule (`str`, `"squaredcos_cap_v2"`),
    prediction_type (`str`, `"v_prediction"`): v is well defined at every noise level, including the
    near-zero-SNR end of the cosine schedule, where eps prediction cannot recover x0.
    > Export
    export_dir (`str`, `""`: ``<output_dir>/model``): diffusers folder written at the end (EMA weights if on).
    """

    dataset: str = "digits"
    resolution: int = 16
    label_dropout: float = 0.1
    toy_classes: bool = False
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"
    export_dir: str = ""
    sample_steps: int = 25
    toy_samples: int = 20000

    def check(self):
        levels = len(self.block_out_channels)
        if len(self.attention_levels) != levels:
            raise ConfigError(f"attention_levels has {len(self.attention_levels)} entries, block_out_channels {levels}")
        factor = 2 ** (levels - 1)
        if self.resolution < 1 or self.resolution % factor:
            raise ConfigError(
                f"resolution={self.resolution} cannot go through a UNet with {levels} levels: it must be a "
                f"multiple of {factor} (2^(levels-1))"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(
                f"block_out_channels {self.block_out_channels} must be multiples of "
                f"norm_num_groups={self.norm_num_groups}"
            )
        if self.toy_classes and (not self.dataset.startswith("toy2d:") or self.label_dropout != 0):
            raise ConfigError("toy_classes: true is for toy2d datasets, with label_dropout: 0 (no null class)")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.dataset.startswith("toy2d:"):
            from ..data import TOY2D_NAMES

            if self.dataset[6:] not in TOY2D_NAMES:
                raise ConfigError(f"dataset: unknown toy distribution {self.dataset[6:]!r}; one of {TOY2D_NAMES}")
        elif self.dataset != "digits" and not os.path.isdir(self.dataset):
            raise ConfigError(f"dataset: {self.dataset!r} is neither 'digits', 'toy2d:<name>' nor an existing folder")
        try:
            VPSchedule.from_config(self.scheduler_config()).check_prediction_type(self.prediction_type)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def scheduler_config(self) -> dict:
        return dict(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            clip_sample=False,
            set_alpha_to_one=True,
            timestep_spacing="trailing",
            steps_offset=0,
        )


def build_unet(cfg: DSMConfig, in_channels: int, num_class_embeds: int | None):
    from diffusers import UNet2DModel

    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)]
    return UNet2DModel(
        sample_size=cfg.resolution,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    )


class DSMTrainer(DistillTrainer):
    """Train a diffusion model by denoising score matching (one network, one phase)."""

    config_class = DSMConfig

    def build(self):
        c = self.config
        self.schedule = VPSchedule.from_config(c.scheduler_config())
        if c.dataset.startswith("toy2d:"):
            from ..data import Toy2DDataset
            from ..models.toy import ToyMLP
            from .student import PlainLabels

            self.dataset = Toy2DDataset(c.dataset[6:], c.toy_samples, seed=c.seed)
            classes = int(self.dataset.labels.max()) + 1 if c.toy_classes else None
            self.conditioner = PlainLabels(classes) if classes else None
            self.unet = ToyMLP(
                hidden=c.block_out_channels[-1], layers=len(c.block_out_channels), num_class_embeds=classes
            )
            return
        if c.dataset == "digits":
            self.dataset = DigitsDataset("train", c.resolution)
            self.conditioner = ClassConditioner(NUM_CLASSES)  # null class = 10
            in_ch, n_embeds = 1, NUM_CLASSES + 1
        else:
            self.dataset = ImageFolderDataset(c.dataset, c.resolution)
            self.conditioner = None
            in_ch, n_embeds = 3, None
        self.unet = build_unet(c, in_ch, n_embeds)

    def networks(self):
        return {"model": NetSpec(self.unet)}

    def on_prepared(self):
        self.model = Denoiser(self.specs["model"].module, self.schedule, self.config.prediction_type)

    def train_dataset(self):
        return self.dataset

    def _cond(self, batch, drop: float):
        if self.conditioner is None:
            return None
        cond = self.conditioner(batch["label"].to(self.accelerator.device))
        return cond.drop(drop) if drop > 0 else cond

    def compute_loss(self, batch, phase):
        x0 = (batch["image"] if "image" in batch else batch["x"]).to(self.accelerator.device)
        loss = self.model.dsm_loss(x0, self._cond(batch, self.config.label_dropout))
        return {"loss": loss}

    @torch.no_grad()
    def sample_images(self, step):
        if self.config.dataset.startswith("toy2d:"):
            return None
        net = self.accelerator.unwrap_model(self.specs["model"].module)
        was = net.training
        net.eval()
        try:
            labels = torch.arange(20, device=self.accelerator.device) % NUM_CLASSES
            cond = self.conditioner(labels) if self.conditioner is not None else None
            noise = torch.randn(
                len(labels), *self.dataset[0]["image"].shape, generator=torch.Generator().manual_seed(0)
            ).to(self.accelerator.device)
            model = Denoiser(net, self.schedule, self.config.prediction_type)
            return sample(
                lambda x, t: model.raw(x, t, cond),
                self.schedule,
                noise,
                self.config.sample_steps,
                pred_type=self.config.prediction_type,
            )
        finally:
            net.train(was)

    def export_target(self) -> str:
        return self.config.export_dir or os.path.join(self.config.output_dir, "model")

    def export(self, path: str | None = None) -> str:
        """Write ``unet/`` + ``scheduler/`` (diffusers format; EMA weights when EMA is on)."""
        from diffusers import DDIMScheduler

        from ..io import export_folder

        c = self.config
        path = path or self.export_target()
        net = self.accelerator.unwrap_model(self.specs["model"].module)
        if "model" in self.ema:
            import copy

            net = copy.deepcopy(net)
            net.load_state_dict(
                {k: v.to(net.dtype if v.is_floating_point() else v.dtype) for k, v in self.ema["model"].items()}
            )
        if self.accelerator.is_main_process:
            with export_folder(path, "teacher") as tmp:  # written beside path, swapped in when complete
                net.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
                DDIMScheduler(**c.scheduler_config()).save_pretrained(os.path.join(tmp, "scheduler"))
                # what distillers need to know about how the teacher was trained (guided distillation checks
                # that the unconditional branch was trained)
                with open(os.path.join(tmp, "training.json"), "w") as f:
                    json.dump({"method": "dsm", "label_dropout": c.label_dropout, "max_steps": c.max_steps}, f)
        self.accelerator.wait_for_everyone()
        return path
