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
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch

from ..config import ConfigError
from ..data.validate import check_dataset_fits_teacher, dataset_kind
from ..models import Generator, Teacher
from ..models.conditioning import ClassConditioner, Cond, TextConditioner
from ..models.denoiser import _unwrap
from ..models.loading import looks_like_hub_id, resolve_model_path
from .base import DistillTrainer, TrainConfig

TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_CACHE_WARN_BYTES = 8 * 2**30


@dataclass
class StudentConfig(TrainConfig):
    """Settings of every teacher -> student method.

    > Models
    teacher (`str`, `"digits"`): diffusers folder or hub id of the teacher; "digits" = the bundled teacher.
    allow_download (`bool | None`, `None`): may a hub-id teacher missing from the local hub cache be downloaded?
        None: yes unless HF_HUB_OFFLINE is set or the hub does not answer within 3 s; false: local cache only.
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
    > Memory (every method; `make bench` measures them: benchmarks/bench_memory.py)
    gradient_checkpointing (`bool`, `false`): diffusers' gradient checkpointing on the trainable networks (the
        generator and the fake score): their block activations are recomputed in backward instead of kept.
        LoRA adapters toggled on a shared base are recomputed in the state of the forward pass.
    teacher_dtype (`str`, `"fp32"`): "fp32", "bf16" or "fp16": the frozen teacher's weights, cast after the
        student / fake-score copies are taken (they stay fp32); it runs under autocast in that dtype and
        returns fp32. A teacher that is the base of a LoRA student or LoRA fake score is their base too: then
        only with mixed_precision equal to it (bf16), which casts the base and keeps the LoRA weights in fp32
        (as diffusers' LoRA scripts do); not with progressive LoRA rounds (they fold into the base).
    teacher_offload (`bool`, `false`): keep the teacher's weights on the CPU (pinned) and copy them to the
        accelerator for each of its forward passes only; the VAE (its latents are cached at build) goes to
        the CPU too and comes back to decode sample grids. Not with a LoRA student / fake score (they train
        on the teacher's base, which must stay on the device).
    cache_text_embeddings (`bool`, `false`): text teachers: encode every distinct prompt of the dataset once
        at build, keep the embeddings on the CPU (moved to the device per batch) and move the text encoders
        to the CPU. Without it each prompt is encoded at its first use and its embedding stays cached on the
        device next to the encoders. Host memory: prompts x sequence x width x 4 bytes (SDXL: 0.6 MB each).
    """

    teacher: str = "digits"
    allow_download: bool | None = None
    generator_mode: str = "full"
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_target_modules: list[str] = field(default_factory=list)
    dataset: str = "digits"
    skip_unreadable_images: bool = False
    resolution: int = 0
    export_dir: str = ""
    gradient_checkpointing: bool = False
    teacher_dtype: str = "fp32"
    teacher_offload: bool = False
    cache_text_embeddings: bool = False

    def check(self):
        if self.generator_mode not in ("full", "lora"):
            raise ConfigError(f"generator_mode must be 'full' or 'lora', got {self.generator_mode!r}")
        if self.teacher != "digits" and not os.path.exists(self.teacher) and not looks_like_hub_id(self.teacher):
            raise ConfigError(f"teacher: path {self.teacher!r} does not exist (and is not a hub id like 'org/name')")
        self.check_memory_options()

    def lora_sharing_keys(self) -> list[str]:
        """The keys that put a trainable LoRA on the teacher's own network (generator_mode, fake_score_mode)."""
        return [k for k in ("generator_mode", "fake_score_mode") if getattr(self, k, "full") == "lora"]

    def check_memory_options(self):
        for key in ("gradient_checkpointing", "teacher_offload", "cache_text_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(f"teacher_dtype must be one of {sorted(TEACHER_DTYPES)}, got {self.teacher_dtype!r}")
        shared = ", ".join(f"{k}=lora" for k in self.lora_sharing_keys())
        if self.teacher_offload and shared:
            raise ConfigError(
                f"teacher_offload=true with {shared}: the LoRA trains on the teacher's own base network, which "
                "must stay on the device; use full networks (generator_mode / fake_score_mode: full) or "
                "teacher_offload: false"
            )
        if self.teacher_dtype != "fp32" and shared and self.mixed_precision != self.teacher_dtype:
            raise ConfigError(
                f"teacher_dtype={self.teacher_dtype} with {shared}: the teacher is the LoRA's frozen base, so its "
                f"dtype is the trainable forward pass's too; set mixed_precision: {self.teacher_dtype} (the base is "
                "cast, the LoRA weights stay fp32) if that dtype is bf16, or teacher_dtype: fp32"
            )


class StudentTrainer(DistillTrainer):
    """Teacher, conditioning, data, generator and export; methods add losses and update rules.

    Export contract (read by :func:`stepdistill.export.export_generator`): ``export_timesteps()`` (integer
    timesteps of the trained steps), ``export_scheduler`` ("lcm": x0 then fresh noise; "ddim": trailing
    deterministic DDIM; "tcd") and ``export_guidance_scale`` (default call scale of w-conditioned students).
    """

    export_scheduler = "lcm"
    export_guidance_scale: float | None = None
    lora_folds_into_base = False  # a method whose LoRA is folded into the teacher's base (progressive rounds)

    # ---------------------------------------------------------------- setup
    def _teacher_path(self):
        if self.config.teacher == "digits":
            from ..assets import digits_teacher_path

            return digits_teacher_path()
        return resolve_model_path(self.config.teacher, allow_download=self.config.allow_download, key="teacher")

    def validate(self):
        super().validate()
        c = self.config
        # before anything loads: a bad dataset, a missing teacher folder / unreachable hub id, data that does not
        # fit the teacher
        dataset_kind(c.dataset)
        check_dataset_fits_teacher(c.dataset, self._teacher_path())
        c.check_memory_options()
        if self.lora_folds_into_base and c.generator_mode == "lora" and c.teacher_dtype != "fp32":
            raise ConfigError(
                f"teacher_dtype={c.teacher_dtype} with generator_mode=lora: {type(self).__name__} folds each "
                "round's LoRA into the teacher's base, and a reduced-precision base would round the update away; "
                "use teacher_dtype: fp32"
            )

    def build_teacher(self):
        """Load the teacher, its conditioning, VAE and the dataset (sets ``teacher``, ``schedule``,
        ``conditioner``, ``vae``, ``sample_shape``, ``dataset``). With ``teacher_offload`` the teacher's
        weights stay on the CPU from here on; ``cache_text_embeddings`` encodes the prompts here."""
        c = self.config
        device = self.accelerator.device
        path = self._teacher_path()
        self.teacher = Teacher.from_pretrained(path)
        if c.teacher_offload:
            self.teacher.offload(device)
        else:
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
        if c.teacher_offload and self.vae is not None:  # real latents are encoded: the VAE only decodes grids
            self.vae.to("cpu")
        if c.cache_text_embeddings:
            self.cache_text_embeddings()

    def cache_text_embeddings(self, chunk: int = 64) -> int:
        """Encode every distinct dataset prompt (and the null prompt) now, then move the embeddings and the
        text encoders to the CPU; returns the bytes of the cached embeddings."""
        cond = self.conditioner
        if not isinstance(cond, TextConditioner):
            warnings.warn("cache_text_embeddings=true has no effect: the teacher is not text-conditioned", stacklevel=2)
            return 0
        prompts = list(dict.fromkeys(self.dataset.captions))
        total = 0
        for i in range(0, len(prompts), chunk):
            out = cond.encode(prompts[i : i + chunk])
            total += sum(t.numel() * t.element_size() for t in _tensors(out.kwargs))
        cond.encode([""])  # the null embedding (SD / SD3) is computed once, with the encoders still on the device
        cond.offload("cpu")
        if total > TEXT_CACHE_WARN_BYTES:
            warnings.warn(
                f"cache_text_embeddings: the embeddings of {len(prompts)} prompts take {total / 2**30:.1f} GiB of "
                "host memory (per process)",
                stacklevel=2,
            )
        self.text_cache_bytes = total
        return total

    # ---------------------------------------------------------------- memory options after preparation
    def setup(self):
        super().setup()
        self.apply_memory_options()

    def apply_memory_options(self):
        """Gradient checkpointing on the trainable networks (and on the teacher: a no-op under no_grad, it cuts
        the activations of SiD / SIM's differentiated teacher pass) and the teacher's dtype: applied once every
        network is built (the full student / fake-score copies are taken from the fp32 teacher) and prepared."""
        c = self.config
        if c.gradient_checkpointing:
            done = []
            for name in self.specs:
                inner = _unwrap(self._inner(name))
                if getattr(inner, "_supports_gradient_checkpointing", None) is None:
                    continue  # not a diffusers model (a discriminator head)
                enable_gradient_checkpointing(inner)
                done.append(name)
            if not done:
                raise ConfigError(f"gradient_checkpointing: no trainable network of {type(self).__name__} supports it")
            teacher = getattr(self, "teacher", None)
            if teacher is not None and not teacher.shares_base:  # a shared base is enabled with its LoRA network
                net = _unwrap(teacher.net)
                if getattr(net, "_supports_gradient_checkpointing", False):
                    enable_gradient_checkpointing(net, teacher.resident if teacher.offload_device is not None else None)
        if c.teacher_dtype != "fp32" and getattr(self, "teacher", None) is not None:
            self.teacher.cast_weights(TEACHER_DTYPES[c.teacher_dtype])

    def timesteps_to_t(self, timesteps, key: str) -> torch.Tensor:
        """Integer teacher timesteps (a config list named ``key``) -> continuous times, range-checked
        (0..T-1; a flow-matching teacher's run 0..T, T being t = 1: diffusers' FlowMatch timesteps are sigma * T)."""
        T = getattr(self.schedule, "num_train_timesteps", None)
        top = (T or 0) - (0 if self.schedule.kind == "flow" else 1)
        for ts in timesteps:
            if T is None or not 0 <= ts <= top:
                raise ConfigError(f"{key}: {ts} is outside the teacher's schedule (0..{top})")
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
        gen = Generator.from_teacher(
            self.teacher,
            c.generator_mode,
            timesteps=timesteps,
            sampler=sampler,
            lora_rank=c.lora_rank,
            lora_alpha=c.lora_alpha,
            target_modules=c.lora_target_modules or None,
            w_embedding_dim=w_embedding_dim,
        )
        if self.teacher.offload_device is not None:  # copied from the host weights of an offloaded teacher
            gen.net.to(self.teacher.offload_device)
        return gen

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
            return self.conditioner(values.to(self.accelerator.device))
        return self.conditioner(values).to(self.accelerator.device)  # cached embeddings may live on the CPU

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

    def export_target(self) -> str:
        return self.config.export_dir or os.path.join(self.config.output_dir, "pipeline")

    def export(self, path: str | None = None) -> str:
        from ..export import export_generator

        path = path or self.export_target()
        why = self.network_only_export()
        if why:
            self._export_network(path, why)
        else:
            export_generator(self, path)
        self.accelerator.wait_for_everyone()
        return path

    def network_only_export(self) -> str:
        """Why no diffusers pipeline can reproduce this student's sampler ("" when one can)."""
        if self.schedule.kind == "edm":
            return "students of EDM teachers have no diffusers pipeline yet"
        if getattr(self.generator, "input_scale", 1.0) != 1.0:
            return "a scaled first input (generator_input: scaled) is not what stock pipelines feed"
        return ""

    def _export_network(self, path: str, why: str) -> None:
        """Write the generator network (``<path>/unet``, diffusers format), the teacher's scheduler config and
        ``student.json`` (prediction type, trained sigmas and timesteps, first-input scale: x0 = generator(
        input_scale * sigma_0 * z) at the first time, re-noised to each next time), atomically."""
        import shutil

        from ..export import _generator_unet, _teacher_json

        net = _generator_unet(self)
        if not self.accelerator.is_main_process:
            return
        warnings.warn(
            f"{type(self).__name__}: exported as a network only ({path}/unet), not as a diffusers pipeline: {why}; "
            "student.json says how to sample",
            stacklevel=2,
        )
        tmp = path.rstrip("/") + ".tmp_export"
        shutil.rmtree(tmp, ignore_errors=True)
        net.save_pretrained(os.path.join(tmp, "unet"))
        os.makedirs(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(_teacher_json(self._teacher_path(), "scheduler_config.json", "scheduler"), f, indent=2)
        info = {
            "prediction_type": self.generator.prediction_type,
            "sigmas": [float(v) for v in self.schedule.sigma(self.generator.timesteps)],
            "input_scale": float(getattr(self.generator, "input_scale", 1.0)),
            "timesteps": self.export_timesteps(),
            "sampler": self.generator.sampler,
        }
        with open(os.path.join(tmp, "student.json"), "w") as f:
            json.dump(info, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def _adapter_params(wrapper):
    from ..models.adapters import lora_parameters

    return lora_parameters(_unwrap(wrapper.net), wrapper.adapter_name)


def _tensors(d):
    for v in d.values():
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, dict):
            yield from _tensors(v)


# gradient checkpointing ---------------------------------------------------------------------------------


def enable_gradient_checkpointing(net: torch.nn.Module, recompute_context=None) -> None:
    """diffusers' gradient checkpointing on ``net`` with :func:`checkpoint_with_adapter_state`;
    ``recompute_context(block)`` (e.g. an offloaded teacher's ``resident``) wraps each recompute."""
    if not getattr(net, "_supports_gradient_checkpointing", False) or not hasattr(net, "enable_gradient_checkpointing"):
        raise ConfigError(
            f"gradient_checkpointing: {type(net).__name__} does not support it (diffusers models only); set "
            "gradient_checkpointing: false"
        )
    if recompute_context is None:
        net.enable_gradient_checkpointing(checkpoint_with_adapter_state)
    else:
        net.enable_gradient_checkpointing(partial(checkpoint_with_adapter_state, recompute_context=recompute_context))


def _adapter_state(owner, layers):
    return [(m, m.disable_adapters, list(m.active_adapters)) for m in layers], [
        (p, p.requires_grad) for p in owner.parameters()
    ]


def _set_adapter_state(state):
    layers, flags = state
    for m, disabled, active in layers:
        m.set_adapter(active)
        m.enable_adapters(not disabled)
    for p, flag in flags:  # peft's toggles flip requires_grad: put back the flags of the forward pass
        p.requires_grad_(flag)


@contextmanager
def _recompute_state(owner, layers, state, recompute_context):
    with recompute_context(owner) if recompute_context is not None else nullcontext():
        if not layers:
            yield
            return
        now = _adapter_state(owner, layers)
        _set_adapter_state(state)
        try:
            yield
        finally:
            _set_adapter_state(now)


def checkpoint_with_adapter_state(module, *args, recompute_context=None):
    """torch's non-reentrant checkpoint of one block, as diffusers calls it (``func(block, *args)``), that
    recomputes the block in backward with the LoRA state of its forward pass: which adapter was active,
    whether adapters were off, which weights required grad. Without this, a block that ran with the
    generator's adapter (or with adapters off, as the teacher) would be recomputed with whatever adapter is
    active at backward time: silently wrong gradients when several adapters share one base.
    ``recompute_context(block)`` wraps the recompute (an offloaded teacher stages the block's weights)."""
    from ..models.adapters import tuner_layers

    owner = getattr(module, "__self__", module)
    layers = tuner_layers(owner) if isinstance(owner, torch.nn.Module) else []
    if not layers and recompute_context is None:
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    state = _adapter_state(owner, layers) if layers else None
    return torch.utils.checkpoint.checkpoint(
        module,
        *args,
        use_reentrant=False,
        context_fn=lambda: (nullcontext(), _recompute_state(owner, layers, state, recompute_context)),
    )


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
    home = next(vae.parameters()).device
    if home != latents.device:  # an offloaded VAE (teacher_offload) decodes on the latents' device
        vae.to(latents.device)
    try:
        return vae.decode(latents / scale + shift).sample.clamp(-1, 1)
    finally:
        if home != latents.device:
            vae.to(home)


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
        skip = c.skip_unreadable_images
        classes = _class_folders(ds)
        if classes:  # ImageNet layout: one sub-folder per class, label k = the k-th folder name in sorted order
            parts = [
                ImageFolderDataset(os.path.join(ds, d), size, caption_source="none", skip_unreadable=skip)
                for d in classes
            ]
            _report_skipped(parts)
            images = torch.stack([p[i]["image"] for p in parts for i in range(len(p))])
            labels = torch.cat([torch.full((len(p),), k, dtype=torch.long) for k, p in enumerate(parts)])
            return DistillDataset(labels=labels, images=_encode_images(vae, images))
        folder = ImageFolderDataset(ds, size, skip_unreadable=skip)
        _report_skipped([folder])
        images = torch.stack([folder[i]["image"] for i in range(len(folder))])
        captions = [folder[i]["caption"] for i in range(len(folder))]
        return DistillDataset(captions=captions, images=_encode_images(vae, images))
    raise ConfigError(f"dataset: {ds!r} is not 'digits', 'toy2d:<name>', a prompt file or an image folder")


def _report_skipped(folders) -> None:
    skipped = [p for f in folders for p in f.skipped]
    if skipped:
        names = ", ".join(str(p) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        print(f"skipped {len(skipped)} unreadable image(s) (skip_unreadable_images: true): {names}")


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
