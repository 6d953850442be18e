"""The student-teacher trainer every distillation method builds on.

``StudentTrainer`` owns what DMD2, SIM, VSD, progressive and consistency distillation share: loading the
frozen teacher (bundled digits, a local diffusers folder or a hub id), its conditioning (class labels or
text encoders) and VAE, the dataset of labels / prompts / real images, the generator (a full copy or a LoRA
on the teacher, optionally with a guidance-scale embedding), sample grids and the export to a diffusers
folder. A method adds its networks, ``phase`` and ``compute_loss``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from ..models import Generator, Teacher
from ..models.conditioning import ClassConditioner, Cond
from ..models.denoiser import _unwrap
from .base import DistillTrainer, TrainConfig


@dataclass
class StudentConfig(TrainConfig):
    """Settings of every teacher -> student method.

    > Models
    teacher (`str`, `"digits"`): diffusers folder or hub id of the teacher; "digits" = the bundled teacher.
    generator_mode (`str`, `"full"`): "full" copy of the teacher or "lora" adapter on it.
    lora_rank (`int`, `64`), lora_alpha (`float`, `64.0`), lora_target_modules (`list[str]`, `[]`: peft's
        attention / conv defaults of :func:`stepdistill.models.adapters.add_lora`).
    > Data and conditioning
    dataset (`str`, `"digits"`): source of labels / prompts and of real images: "digits", "toy2d:<name>",
        an image folder with captions, an image folder with one sub-folder per class (labels: the sorted
        folder names, ImageNet's layout), or a prompt file (.txt / .jsonl; no real images).
    resolution (`int`, `0`): the generator's sample side: latents for latent models (64 = 512 px for SD1.5,
        128 = 1024 px for SDXL), pixels otherwise (0: the network config's sample_size).
    > Export
    export_dir (`str`, `""`): where ``export()`` writes the pipeline (default ``<output_dir>/pipeline``).
    """

    teacher: str = "digits"
    generator_mode: str = "full"
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_target_modules: list[str] = field(default_factory=list)
    dataset: str = "digits"
    resolution: int = 0
    export_dir: str = ""

    def check(self):
        if self.generator_mode not in ("full", "lora"):
            raise ConfigError(f"generator_mode must be 'full' or 'lora', got {self.generator_mode!r}")
        if self.teacher != "digits" and not os.path.exists(self.teacher) and not _hub_like(self.teacher):
            raise ConfigError(f"teacher: path {self.teacher!r} does not exist")


def _hub_like(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


class StudentTrainer(DistillTrainer):
    """Teacher, conditioning, data, generator and export; methods add losses and update rules.

    Export contract (read by :func:`stepdistill.export.export_generator`): ``export_timesteps()`` (integer
    timesteps of the trained steps), ``export_scheduler`` ("lcm": x0 then fresh noise; "ddim": trailing
    deterministic DDIM; "tcd") and ``export_guidance_scale`` (default call scale of w-conditioned students).
    """

    export_scheduler = "lcm"
    export_guidance_scale: float | None = None

    # ---------------------------------------------------------------- setup
    def _teacher_path(self):
        if self.config.teacher == "digits":
            from ..assets import digits_teacher_path

            return digits_teacher_path()
        return self.config.teacher

    def validate(self):
        super().validate()
        ds = self.config.dataset
        if ds != "digits" and not ds.startswith("toy2d:") and not os.path.exists(ds):
            raise ConfigError(f"dataset: path {ds!r} does not exist (an image folder with captions or a prompt file)")

    def build_teacher(self):
        """Load the teacher, its conditioning, VAE and the dataset (sets ``teacher``, ``schedule``,
        ``conditioner``, ``vae``, ``sample_shape``, ``dataset``)."""
        c = self.config
        device = self.accelerator.device
        path = self._teacher_path()
        self.teacher = Teacher.from_pretrained(path)
        self.teacher.net.to(device)
        self.schedule = self.teacher.schedule
        net = self.teacher.net
        self.conditioner, self.vae = _conditioning_for(path, net, c)
        if self.vae is not None:
            self.vae.to(device)
        if getattr(self.conditioner, "to", None) is not None and not isinstance(self.conditioner, ClassConditioner):
            self.conditioner.to(device)
        self.sample_shape = _sample_shape(net, c.resolution)
        self.dataset = _dataset_for(c, self.sample_shape, self.vae)
        _check_dataset_fits(self.conditioner, self.dataset, c.dataset)

    def timesteps_to_t(self, timesteps, key: str) -> torch.Tensor:
        """Integer teacher timesteps (a config list named ``key``) -> continuous times, range-checked."""
        T = getattr(self.schedule, "num_train_timesteps", None)
        for ts in timesteps:
            if T is None or not 0 <= ts <= T - 1:
                raise ConfigError(f"{key}: {ts} is outside the teacher's schedule (0..{(T or 0) - 1})")
        return self.schedule.timestep_to_t(torch.tensor(list(timesteps), dtype=torch.float64))

    def require_guidance(self, key: str, value):
        """A CFG setting other than 1 needs a teacher with an unconditional branch."""
        if not _has_null(self.conditioner):
            raise ConfigError(
                f"{key}={value} needs a teacher with an unconditional branch (class-conditional with a null "
                "class, or text-conditional)"
            )

    def make_generator(self, timesteps, *, sampler: str = "consistency", w_embedding_dim: int = 0) -> Generator:
        """The student from the teacher's weights (``generator_mode`` full or LoRA)."""
        c = self.config
        return Generator.from_teacher(
            self.teacher,
            c.generator_mode,
            timesteps=timesteps,
            sampler=sampler,
            lora_rank=c.lora_rank,
            lora_alpha=c.lora_alpha,
            target_modules=c.lora_target_modules or None,
            w_embedding_dim=w_embedding_dim,
        )

    def generator_params(self):
        if self.config.generator_mode == "full":
            return [p for p in self.generator.net.parameters() if p.requires_grad]
        return _adapter_params(self.generator)

    def train_dataset(self):
        return self.dataset

    def collate(self, items):
        return self.dataset.collate(items)

    def _cond_batch(self, batch) -> Cond | None:
        if self.conditioner is None:
            return None
        key = "label" if "label" in batch else "caption"
        values = batch[key]
        if key == "label":
            values = values.to(self.accelerator.device)
        return self.conditioner(values)

    # ---------------------------------------------------------------- samples and export
    def export_timesteps(self) -> list[int]:
        return [int(round(float(v))) for v in self.schedule.t_to_timestep(self.generator.timesteps)]

    @torch.no_grad()
    def sample_images(self, step):
        n = 20
        batch = self.dataset.example(n, generator=torch.Generator().manual_seed(0))
        cond = self._cond_batch(batch)
        noise = torch.randn(n, *self.sample_shape, generator=torch.Generator().manual_seed(0))
        x = self.generator.sample(
            noise.to(self.accelerator.device),
            cond,
            generator=torch.Generator().manual_seed(1),
            guidance_scale=self.export_guidance_scale,
        )
        if self.vae is not None:
            x = _decode(self.vae, x)
        return x if x.ndim == 4 else None

    def export(self, path: str | None = None) -> str:
        from ..export import export_generator

        c = self.config
        path = path or c.export_dir or os.path.join(c.output_dir, "pipeline")
        export_generator(self, path)
        self.accelerator.wait_for_everyone()
        return path


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def _adapter_params(wrapper):
    from ..models.adapters import lora_parameters

    return lora_parameters(_unwrap(wrapper.net), wrapper.adapter_name)


def _has_null(conditioner) -> bool:
    if conditioner is None:
        return False
    if isinstance(conditioner, ClassConditioner):
        return conditioner.supports_cfg
    return True


def _check_dataset_fits(conditioner, dataset, name):
    """The dataset must give what the teacher is conditioned on (captions for text, labels for classes)."""
    if conditioner is None:
        return
    if isinstance(conditioner, ClassConditioner):
        if dataset.labels is None:
            raise ConfigError(f"dataset: {name!r} has no class labels, but the teacher is class-conditional")
    elif dataset.captions is None:
        raise ConfigError(
            f"dataset: {name!r} has no captions, but the teacher is text-conditional; use an image folder with "
            "captions (.txt next to each image, or metadata.jsonl) or a prompt file (.txt / .jsonl)"
        )


def _read_model_index(path):
    f = os.path.join(path, "model_index.json")
    if os.path.isfile(f):
        with open(f) as fh:
            return json.load(fh)
    return {}


def _conditioning_for(path, net, c):
    """The conditioner (class labels or text) and the VAE (latent models) of a teacher."""
    name = type(_unwrap(net)).__name__
    index = _read_model_index(path) if os.path.isdir(path) else None
    vae = None
    if index is None or "vae" in (index or {}):
        try:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
            vae.requires_grad_(False).eval()
        except (OSError, ValueError):
            vae = None
    if name in ("UNet2DConditionModel", "SD3Transformer2DModel"):
        from ..models.conditioning import TextConditioner

        # c.resolution is the latent side; SDXL's time_ids take the image size in pixels
        pixels = c.resolution * vae_scale_factor(vae) if c.resolution else None
        conditioner = TextConditioner.from_pretrained(path, resolution=pixels)
    elif name == "UNet2DModel":
        conditioner = ClassConditioner.for_unet2d(net) if getattr(net.config, "num_class_embeds", None) else None
    elif name in ("DiTTransformer2DModel", "Transformer2DModel"):
        conditioner = ClassConditioner.for_dit(net)
    else:
        conditioner = None
    return conditioner, vae


def vae_scale_factor(vae) -> int:
    """Pixels per latent side: 2 ** (number of VAE blocks - 1) (8 for SD / SDXL / SD3), 1 without a VAE."""
    if vae is None:
        return 1
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _sample_shape(net, resolution: int):
    cfg = _unwrap(net).config
    if type(_unwrap(net)).__name__ == "ToyMLP":
        return (cfg.dim,)
    side = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return (cfg.in_channels, resolution or side, resolution or side)


def _decode(vae, latents):
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode(latents / scale + shift).sample.clamp(-1, 1)


class DistillDataset(torch.utils.data.Dataset):
    """Conditioning (labels or captions) and, when available, real images / latents for the GAN."""

    def __init__(self, labels=None, captions=None, images=None):
        self.labels, self.captions, self.images = labels, captions, images
        self.n = len(labels if labels is not None else captions if captions is not None else images)
        self.has_images = images is not None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = {"_n": i}
        if self.labels is not None:
            item["label"] = self.labels[i]
        if self.captions is not None:
            item["caption"] = self.captions[i]
        if self.images is not None:
            item["image"] = self.images[i]
        return item

    def collate(self, items):
        out = {"_n": [it["_n"] for it in items]}
        if self.labels is not None:
            out["label"] = torch.stack([it["label"] for it in items])
        if self.captions is not None:
            out["caption"] = [it["caption"] for it in items]
        if self.images is not None:
            out["image"] = torch.stack([it["image"] for it in items])
        return out

    def example(self, n: int, generator=None):
        idx = (
            torch.randint(self.n, (n,), generator=generator)
            if n > self.n
            else torch.randperm(self.n, generator=generator)[:n]
        )
        return self.collate([self[int(i)] for i in idx])


def _dataset_for(c, sample_shape, vae) -> DistillDataset:
    from ..data import DigitsDataset, ImageFolderDataset, load_prompts, sample_toy2d

    ds = c.dataset
    if ds == "digits":
        d = DigitsDataset("train", sample_shape[-1])
        imgs = torch.stack([d[i]["image"] for i in range(len(d))])
        labels = torch.stack([d[i]["label"] for i in range(len(d))])
        return DistillDataset(labels=labels, images=imgs)
    if ds.startswith("toy2d:"):
        x, _ = sample_toy2d(ds[6:], 20000, torch.Generator().manual_seed(c.seed))
        return DistillDataset(images=x)
    if ds.endswith((".txt", ".jsonl")):
        return DistillDataset(captions=load_prompts(ds))
    if os.path.isdir(ds):
        # images at the pixel size whose latents (or pixels) have the generator's sample shape
        size = sample_shape[-1] * vae_scale_factor(vae)
        classes = _class_folders(ds)
        if classes:  # ImageNet layout: one sub-folder per class, label k = the k-th folder name in sorted order
            parts = [ImageFolderDataset(os.path.join(ds, d), size, caption_source="none") for d in classes]
            images = torch.stack([p[i]["image"] for p in parts for i in range(len(p))])
            labels = torch.cat([torch.full((len(p),), k, dtype=torch.long) for k, p in enumerate(parts)])
            return DistillDataset(labels=labels, images=_encode_images(vae, images))
        folder = ImageFolderDataset(ds, size)
        images = torch.stack([folder[i]["image"] for i in range(len(folder))])
        captions = [folder[i]["caption"] for i in range(len(folder))]
        return DistillDataset(captions=captions, images=_encode_images(vae, images))
    raise ConfigError(f"dataset: {ds!r} is not 'digits', 'toy2d:<name>', a prompt file or an image folder")


def _class_folders(root) -> list[str]:
    """The class sub-folders of an image folder without images at its top level (sorted names), else []."""
    from ..data.folders import IMAGE_EXTENSIONS

    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    if any(os.path.splitext(e)[1].lower() in IMAGE_EXTENSIONS for e in entries):
        return []
    return [e for e in entries if os.path.isdir(os.path.join(root, e))]


def _encode_images(vae, images):
    """Pixels in [-1, 1] -> scaled latents (the VAE's posterior mean), or the pixels for pixel-space models."""
    if vae is not None:
        with torch.no_grad():
            lat = vae.encode(images.to(vae.device)).latent_dist.mean
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            images = ((lat - shift) * vae.config.scaling_factor).cpu()
    return images
