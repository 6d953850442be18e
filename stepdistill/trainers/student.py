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

from ..config import ConfigError, ObjectError
from ..data.validate import check_dataset_fits_teacher, dataset_kind
from ..models import Generator, Teacher
from ..models.conditioning import ClassConditioner, Cond, TextConditioner
from ..models.denoiser import Denoiser, _unwrap
from ..models.generator import guidance_projection_params
from ..models.loading import looks_like_hub_id, resolve_model_path
from .base import DistillTrainer, TrainConfig

# student_prediction values -> prediction types (our names and diffusers')
_STUDENT_TYPES = {
    "eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "x0": "x0", "sample": "x0",
    "flow": "flow", "flow_prediction": "flow",
}  # fmt: skip
AUTO_AMPLIFICATION_LIMIT = 20.0  # student_prediction auto: the largest x0 amplification an output may have
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_CACHE_WARN_BYTES = 8 * 2**30
STREAM_PROMPT_CACHE = 256  # prompt embeddings a text conditioner keeps when the dataset is streamed
OBJECT_LABEL = "<object: {}>"  # the config value recording an object argument (run.json, resume comparison)
MAX_ITERABLE_ITEMS = 2**20  # an iterable dataset without len() is read into memory up to this many items


def object_label(obj) -> str:
    """``"<object: Name>"``: how the config (and so run.json and the resume check) records an object argument;
    Name is a function's name or the object's class name."""
    import inspect

    name = obj.__name__ if inspect.isfunction(obj) or inspect.ismethod(obj) else type(obj).__name__
    return OBJECT_LABEL.format(name)


def is_object_label(value) -> bool:
    return isinstance(value, str) and value.startswith(OBJECT_LABEL[:9]) and value.endswith(">")


@dataclass
class StudentConfig(TrainConfig):
    """Settings of every teacher -> student method.

    > Models
    teacher (`str`, `"digits"`): diffusers folder or hub id of the teacher; "digits" = the bundled teacher.
        A trainer given ``teacher=Teacher(...)`` records "<object: Name>" here (see :class:`StudentTrainer`).
    allow_download (`bool | None`, `None`): may a hub-id teacher missing from the local hub cache be downloaded?
        None: yes unless HF_HUB_OFFLINE is set or the hub does not answer within 3 s; false: local cache only.
    generator_mode (`str`, `"full"`): "full" copy of the teacher or "lora" adapter on it.
    lora_rank (`int`, `64`), lora_alpha (`float`, `64.0`), lora_target_modules (`list[str]`, `[]`: peft's
        attention / conv defaults of :func:`stepdistill.models.adapters.add_lora`).
    student_prediction (`str`, `"auto"`): what the student's network outputs: auto, eps, v, x0 or flow.
        "auto" keeps the teacher's type unless an error of that output is amplified more than 20x in x0 at
        the generator's first (noisiest) timestep (eps: sigma / alpha there; DDPM's linear schedule: 157x at
        999, SD1.5 / SDXL: 14.6x), then v (VP teachers; EDM: its preconditioned output, flow: flow);
        progressive distillation switches above 2x (every eps teacher: the paper's students are x or v). The
        choice is printed once and exported. A type other than the teacher's is exact: the student's output
        is read as that type plus the teacher's converted output minus its raw output (both networks start
        equal, so the student starts as the teacher); a fake score copied from the teacher is converted the
        same way (permanently: it costs a teacher pass per fake-score call). Networks given as objects
        (``generator=`` / ``fake_score=``) output the teacher's type and are not converted.
    student_prediction_warmup (`int`, `-1`): updates over which the generator's teacher term fades linearly
        to 0 (then the exported network alone is the student; a progressive round folds into the base, so
        it must fit the first round / guided stage). -1: max_steps // 10 (at least 1, at most that limit);
        0: no teacher term (the teacher's output is read as the new type: not the teacher at the start).
    > Data and conditioning
    dataset (`str`, `"digits"`): source of labels / prompts and of real images: "digits", "toy2d:<name>",
        an image folder with captions, an image folder with one sub-folder per class (labels: the sorted
        folder names, ImageNet's layout), or a prompt file (.txt / .jsonl; no real images). Streamed, for data
        that does not fit in memory (README "Data at scale"): "shards:/data/{00000..00099}.tar" (webdataset tar
        shards), "hf:/path" (a datasets.save_to_disk folder, or a folder datasets.load_dataset streams) or
        "latents:/dir" (a `stepdistill cache` folder).
    image_key (`str`, `""`), caption_key (`str`, `""`): streamed datasets: the tar extension / column of the
        image and of the caption (comma list: the first present; "": jpg,jpeg,png,webp / txt,json for shards,
        image,img / text,caption,prompt for hf). image_key "none": captions only, for prompt-only (data-free)
        methods (SIM, VSD, DMD2 without GAN): no image is read, decoded or encoded.
    data_workers (`int`, `2`): streamed datasets: dataloader worker processes per process.
    shuffle_window (`int`, `256`): streamed datasets: samples permuted together inside a shard (the shard
        order is permuted every epoch too).
    max_bad_samples (`int`, `100`): streamed datasets: bad samples or shards skipped (with a warning naming
        shard and key) per process before the run stops with an error.
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
    student_prediction: str = "auto"
    student_prediction_warmup: int = -1
    dataset: str = "digits"
    skip_unreadable_images: bool = False
    image_key: str = ""
    caption_key: str = ""
    data_workers: int = 2
    shuffle_window: int = 256
    max_bad_samples: int = 100
    resolution: int = 0
    export_dir: str = ""
    gradient_checkpointing: bool = False
    teacher_dtype: str = "fp32"
    teacher_offload: bool = False
    cache_text_embeddings: bool = False

    def check(self):
        if self.generator_mode not in ("full", "lora"):
            raise ConfigError(f"generator_mode must be 'full' or 'lora', got {self.generator_mode!r}")
        if (
            self.teacher != "digits"
            and not is_object_label(self.teacher)
            and not os.path.exists(self.teacher)
            and not looks_like_hub_id(self.teacher)
        ):
            raise ConfigError(f"teacher: path {self.teacher!r} does not exist (and is not a hub id like 'org/name')")
        self.check_student_prediction()
        self.check_memory_options()

    def check_student_prediction(self):
        pred = self.student_prediction
        if pred != "auto" and (not isinstance(pred, str) or _STUDENT_TYPES.get(pred) is None):
            raise ConfigError(
                f"student_prediction must be auto, eps, v, x0 or flow (or diffusers' epsilon, v_prediction, "
                f"sample, flow_prediction), got {pred!r}"
            )
        w = self.student_prediction_warmup
        if isinstance(w, bool) or not isinstance(w, int) or w < -1:
            raise ConfigError(f"student_prediction_warmup must be an integer >= 0 (or -1: derived), got {w!r}")

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

    Objects instead of folders (each optional; the config's keys stay the default)::

        DMD2Trainer(config, teacher=Teacher(net, schedule, "x0"), generator=mlp, fake_score=mlp2, dataset=points)

    * ``teacher``: a :class:`~stepdistill.models.Teacher` (its ``net`` contract is in its docstring: called as
      ``net(x_t, timestep, cond)`` with the schedule's network time, returning its ``prediction_type``). The
      config's ``teacher`` key then records ``"<object: Name>"`` (run.json; a resume must pass an object of the
      same name). Text-conditional teachers need their encoders: give them as folders. A teacher whose net is
      a plain callable (no parameters) runs in fp32 on the device of ``x_t`` (no ``teacher_dtype`` /
      ``teacher_offload``) and needs ``generator`` (and a fake score for DMD2 / SIM / VSD) as modules.
    * ``generator`` / ``fake_score``: ``nn.Module`` networks called exactly as the teacher's net is (same
      inputs) and returning the teacher's prediction type. They train in full (``generator_mode`` /
      ``fake_score_mode`` are set to "full"); a module whose parameters are all frozen (a deep copy of a
      Teacher's net) is made trainable. They must not share parameters with the teacher or each other.
      Without them, the copies are made as for a folder teacher; a LoRA mode (``generator_mode`` /
      ``fake_score_mode: lora``) then adds its adapters to the teacher object's own net.
    * ``dataset``: a tensor ``(N, *sample_shape)`` of samples, a ``torch.utils.data.Dataset`` or any finite
      iterable, read once into memory at construction. An item is a sample tensor, a ``(sample, label)``
      pair, or a dict with keys among "image" (the sample, float), "label" (int class) and "caption" (str);
      every item has the same keys. The trainer reads batches of them (``batch["image"]`` (B, *sample_shape)
      float32, ``batch["label"]`` (B,) int64, ``batch["caption"]`` a list); data-free methods (DMD2, SIM, VSD
      without GAN) read labels only. The config's ``dataset`` key records ``"<object: Name>"``.
    * ``sample_shape``: the shape of one sample, when neither the dataset nor a diffusers network tells it.

    Each object is checked here: types, then one call of each network on a batch of two at t = 0.5 (when the
    sample shape and labels are known without loading data; else at ``build()``), with a one-line
    :class:`~stepdistill.config.ObjectError` naming the argument.
    """

    export_scheduler = "lcm"
    export_guidance_scale: float | None = None
    lora_folds_into_base = False  # a method whose LoRA is folded into the teacher's base (progressive rounds)
    auto_amplification_limit = AUTO_AMPLIFICATION_LIMIT  # student_prediction auto switches above this
    has_fake_score = False  # the DMD2 family: a fake_score argument is accepted

    def __init__(
        self,
        config,
        accelerator=None,
        *,
        teacher=None,
        generator=None,
        fake_score=None,
        dataset=None,
        sample_shape=None,
    ):
        super().__init__(config, accelerator)
        if fake_score is not None and not self.has_fake_score:
            raise ObjectError(f"fake_score: {type(self).__name__} has no fake score (DMD2, SIM and VSD have one)")
        c = config
        if teacher is not None and not isinstance(teacher, Teacher):
            raise ObjectError(
                "teacher: expected stepdistill.models.Teacher(net, schedule, prediction_type), got "
                f"{type(teacher).__name__}"
            )
        self.teacher_object = teacher
        self.generator_object = _check_module("generator", generator)
        self.fake_score_object = _check_module("fake_score", fake_score)
        self.given_sample_shape = _check_shape(sample_shape)
        self.dataset_object = _object_dataset(dataset) if dataset is not None else None
        if teacher is not None:
            if not is_object_label(c.teacher) and c.teacher != type(c)().teacher:
                raise ConfigError(
                    f"teacher: the config names {c.teacher!r} and a teacher object is given; leave the key at its "
                    "default (the object is recorded as its name)"
                )
            c.teacher = object_label(teacher.net)
        if dataset is not None:
            c.dataset = object_label(dataset)
        if generator is not None:
            c.generator_mode = "full"
        if fake_score is not None:
            c.fake_score_mode = "full"
        self._calls_checked = False
        self._check_objects()

    def _check_objects(self):
        """What can be checked of the object arguments without loading anything (called by the constructor)."""
        c = self.config
        t = self.teacher_object
        nets = {"generator": self.generator_object, "fake_score": self.fake_score_object}
        if t is not None:
            plain = not isinstance(t.net, torch.nn.Module)
            for key, bad in (("teacher_dtype", c.teacher_dtype != "fp32"), ("teacher_offload", c.teacher_offload)):
                if plain and bad:
                    raise ConfigError(
                        f"{key}={getattr(c, key)}: the teacher's net {object_label(t.net)} is a plain callable, "
                        "which has no weights to cast or offload; leave it at its default"
                    )
            for name, module in nets.items():
                if module is not None and _shares_parameters(module, t.net):
                    raise ObjectError(
                        f"{name}: shares parameters with the teacher's net (training it would change the teacher); "
                        "pass a copy (copy.deepcopy)"
                    )
        if all(m is not None for m in nets.values()) and _shares_parameters(nets["generator"], nets["fake_score"]):
            raise ObjectError("fake_score: shares parameters with the generator; pass separate networks")
        shape, conditioner, labels = self._known_inputs()
        if shape is not None:
            self._check_calls(shape, lambda device: conditioner(labels).to(device) if conditioner is not None else None)

    def _known_inputs(self):
        """(sample shape, conditioner, two labels) of an object teacher when they are known before any data
        loads, else Nones."""
        t = self.teacher_object
        if t is None:
            return None, None, None
        ds = self.dataset_object
        if ds is None and not self.config.dataset.startswith("toy2d:"):
            return None, None, None  # labels (and maybe the shape) come with the dataset
        shape = self._object_sample_shape(ds)
        if shape is None:
            return None, None, None
        labels = ds.labels if ds is not None else None
        conditioner = _object_conditioner(t.net, labels)
        if conditioner is None:
            return shape, None, None
        return (
            shape,
            conditioner,
            labels[torch.arange(2) % len(labels)] if labels is not None else torch.zeros(2, dtype=torch.long),
        )

    def _object_sample_shape(self, dataset) -> tuple | None:
        """A sample's shape: ``sample_shape``, else the dataset's samples, else a diffusers network's config,
        else 2-D points for a toy2d dataset."""
        if self.given_sample_shape is not None:
            return self.given_sample_shape
        if dataset is not None and dataset.images is not None:
            return tuple(dataset.images.shape[1:])
        for net in (self.teacher_object.net, self.generator_object):
            if net is not None and getattr(_unwrap(net), "config", None) is not None:
                try:
                    return _sample_shape(net, self.config.resolution)
                except (AttributeError, TypeError, IndexError):
                    continue
        if self.config.dataset.startswith("toy2d:"):
            return (2,)
        return None

    def _check_calls(self, shape, cond_fn):
        """One call of each object network (teacher, generator, fake score) on a batch of two at t = 0.5
        (``cond_fn(device)`` gives the condition): each must return a finite float tensor of x_t's shape, else
        an ObjectError naming the argument."""
        t = self.teacher_object or self.teacher
        calls = [("teacher", t.net, t)] if self.teacher_object is not None else []
        calls += [
            (name, m, Denoiser(m, t.schedule, t.prediction_type, cfg_convention=t.cfg_convention))
            for name, m in (("generator", self.generator_object), ("fake_score", self.fake_score_object))
            if m is not None
        ]
        for name, net, wrapper in calls:
            device = _device_of(net)
            x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)
            cond = cond_fn(device)
            what = f"x_t {tuple(x.shape)}, timestep (2,), cond {'None' if cond is None else 'of 2 samples'}"
            try:
                with torch.no_grad():
                    out = wrapper.raw(x, torch.full((2,), 0.5, dtype=torch.float64), cond)
            except Exception as e:  # noqa: BLE001 - any failure of a user's callable is reported in one line
                first = (str(e).splitlines() or [""])[0]
                raise ObjectError(
                    f"{name}: calling {object_label(net)} on {what} failed ({type(e).__name__}: {first}); see the "
                    "Teacher docstring for the call contract"
                ) from e
            if not torch.is_tensor(out) or not out.is_floating_point() or out.shape != x.shape:
                got = f"shape {tuple(out.shape)} {out.dtype}" if torch.is_tensor(out) else type(out).__name__
                raise ObjectError(
                    f"{name}: {object_label(net)} returned {got} for {what}; it must return a float tensor of x_t's "
                    f"shape: the teacher's prediction ({t.prediction_type})"
                )
            if not torch.isfinite(out).all():
                raise ObjectError(f"{name}: {object_label(net)} returned non-finite values for {what} at t = 0.5")
        self._calls_checked = True

    # ---------------------------------------------------------------- setup
    def _teacher_path(self):
        if self.teacher_object is not None:
            raise ConfigError(
                f"teacher: {self.config.teacher!r} is an object, not a folder (this export or check needs a teacher "
                "folder or hub id)"
            )
        if is_object_label(self.config.teacher):
            raise ConfigError(
                f"teacher: {self.config.teacher!r} records a teacher object of an earlier run; pass "
                "teacher=Teacher(...) to the trainer, or name a folder or hub id"
            )
        if self.config.teacher == "digits":
            from ..assets import digits_teacher_path

            return digits_teacher_path()
        return resolve_model_path(self.config.teacher, allow_download=self.config.allow_download, key="teacher")

    def validate(self):
        super().validate()
        c = self.config
        # before anything loads: a bad dataset, a missing teacher folder / unreachable hub id, data that does not
        # fit the teacher
        if self.dataset_object is None:
            if is_object_label(c.dataset):
                raise ConfigError(
                    f"dataset: {c.dataset!r} records a dataset object of an earlier run; pass dataset=... to the "
                    "trainer, or name a dataset"
                )
            dataset_kind(c.dataset)
        if self.teacher_object is None:
            path = self._teacher_path()
            if self.dataset_object is None:
                check_dataset_fits_teacher(c.dataset, path)
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
        if self.teacher_object is not None:
            self.teacher = self.teacher_object
            path = None
        else:
            path = self._teacher_path()
            self.teacher = Teacher.from_pretrained(path)
        if c.teacher_offload:
            self.teacher.offload(device)
        elif isinstance(self.teacher.net, torch.nn.Module):
            self.teacher.net.to(device)
        self.schedule = self.teacher.schedule
        net = self.teacher.net
        if path is None:
            self.vae = None
            self.sample_shape = self._object_sample_shape(self.dataset_object)
            if self.sample_shape is None:
                raise ObjectError(
                    f"sample_shape: cannot tell the shape of a sample of teacher={c.teacher}; pass "
                    "sample_shape=(...) or a dataset of samples to the trainer"
                )
        else:
            self.conditioner, self.vae = _conditioning_for(path, net, c)
            self.sample_shape = _sample_shape(net, c.resolution)
        if self.vae is not None:
            self.vae.to(device)
        given = self.dataset_object
        cond = getattr(self, "conditioner", None)  # a streamed dataset bounds a text conditioner's prompt cache
        self.dataset = given if given is not None else _dataset_for(c, self.sample_shape, self.vae, cond)
        if path is None:
            self.conditioner = _object_conditioner(net, self.dataset.labels)
        if getattr(self.conditioner, "to", None) is not None and not isinstance(self.conditioner, ClassConditioner):
            self.conditioner.to(device)
        _check_dataset_fits(self.conditioner, self.dataset, c.dataset)
        images = self.dataset.images if self.dataset_object is not None else None
        if images is not None and tuple(images.shape[1:]) != tuple(self.sample_shape):
            raise ObjectError(
                f"dataset: its samples have shape {tuple(images.shape[1:])}, but the teacher's samples have shape "
                f"{tuple(self.sample_shape)}"
            )
        objects = (self.teacher_object, self.generator_object, self.fake_score_object)
        if any(o is not None for o in objects) and not self._calls_checked:
            example = self.dataset.example(2, generator=torch.Generator().manual_seed(0))
            self._check_calls(self.sample_shape, lambda device: _cond_to(self._cond_batch(example), device))
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
            slot = self.__dict__.get("_real_slot")
            if slot is not None and slot.score is not None:  # a real score swapped in before this cast
                slot.score.cast_weights(TEACHER_DTYPES[c.teacher_dtype])

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

    # ---------------------------------------------------------------- the student's parameterisation
    def student_prediction(self, timesteps) -> str:
        """The student's output type (``student_prediction``; auto: see :class:`StudentConfig`), resolved at
        the generator's first time ``timesteps[0]`` once, and printed once on the main process."""
        if getattr(self, "_student_pred", None) is not None:
            return self._student_pred
        c, sched, teacher_type = self.config, self.schedule, self.teacher.prediction_type
        t0 = float(torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)[0])
        amp = float(sched.amplification(t0, teacher_type))
        if c.student_prediction == "auto":
            pred, _ = sched.auto_prediction_type(teacher_type, t0, self.auto_amplification_limit)
            step = round(float(sched.t_to_timestep(t0)))
            why = (
                f"the teacher's {teacher_type} output amplifies errors {amp:.3g}x in x0 at the generator's first "
                f"timestep {step} (auto switches above {self.auto_amplification_limit:g}x)"
            )
        else:
            pred = _STUDENT_TYPES[c.student_prediction]
            why = "set in the config"
            if pred not in sched.supports:
                raise ConfigError(
                    f"student_prediction={c.student_prediction!r} cannot be expressed by the teacher's "
                    f"{type(sched).__name__}; it supports {', '.join(sched.supports)}"
                )
        if self.accelerator.is_main_process:
            new = f"{pred} (x0 amplification {float(sched.amplification(t0, pred)):.3g}x)"
            print(f"student_prediction: {c.student_prediction} -> {new if pred != teacher_type else pred}: {why}")
        self._student_pred = pred
        return pred

    def student_prediction_warmup(self) -> int:
        """Updates over which the generator's teacher term fades (``student_prediction_warmup``, -1 derived),
        checked against :meth:`prediction_warmup_limit`."""
        c = self.config
        limit = self.prediction_warmup_limit()
        if c.student_prediction_warmup >= 0:
            if c.student_prediction_warmup > c.max_steps:
                raise ConfigError(
                    f"student_prediction_warmup={c.student_prediction_warmup} is longer than max_steps={c.max_steps}: "
                    "the trained student would still need the teacher; use at most max_steps"
                )
            if limit is not None and c.student_prediction_warmup > limit:
                raise ConfigError(
                    f"student_prediction_warmup={c.student_prediction_warmup} is longer than {limit} updates "
                    f"({type(self).__name__} replaces the teacher's weights then); use at most {limit}"
                )
            return c.student_prediction_warmup
        n = max(c.max_steps // 10, 1)
        return min(n, limit) if limit is not None else n

    def prediction_warmup_limit(self) -> int | None:
        """The last update at which the generator may still need the original teacher (None: any)."""
        return None

    def reinterpret_fake_score(self, fake):
        """Convert a fake score copied from the teacher to the student's output type (exactly, permanently)."""
        pred = getattr(self, "_student_pred", None)
        if pred is not None and pred != self.teacher.prediction_type:
            fake.reinterpret(self.teacher, pred)
        return fake

    def make_generator(self, timesteps, *, sampler: str = "consistency", w_embedding_dim: int = 0) -> Generator:
        """The student from the teacher's weights (``generator_mode`` full or LoRA), outputting
        :meth:`student_prediction` (anchored to the teacher over ``student_prediction_warmup`` updates)."""
        c = self.config
        gen = self._generator_from_object(timesteps, sampler, w_embedding_dim)
        if gen is not None:  # the caller's network: it outputs the teacher's type (its contract), no teacher term
            return gen
        pred = self.student_prediction(timesteps)
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
        return self.apply_student_prediction(gen, pred)

    def apply_student_prediction(self, gen: Generator, pred: str) -> Generator:
        """Read ``gen``'s output as ``pred`` (:meth:`student_prediction`), anchored to the teacher over
        ``student_prediction_warmup`` updates, when it differs from the teacher's type."""
        if pred != self.teacher.prediction_type:
            warmup = self.student_prediction_warmup()
            gen.reinterpret(self.teacher, pred, _AnchorRamp(self, warmup))
            if warmup == 0:
                gen.set_anchor(None)
        return gen

    def check_copy_source(self, name: str):
        """Before network ``name`` (generator / fake_score) is made from the teacher's net: it must have what the
        copy needs, parameters for a full copy, Linear or Conv2d layers for a LoRA adapter (else a one-line error
        naming the key to change or the argument to pass)."""
        c = self.config
        net = self.teacher.net
        label = object_label(net) if self.teacher_object is not None else repr(type(_unwrap(net)).__name__)
        mode = getattr(c, f"{name}_mode")
        if mode == "lora":
            _check_lora_base(f"{name}_mode", net, c.lora_target_modules, label)
        elif not _has_parameters(net):
            raise ObjectError(
                f"{name}: the teacher's net {label} has no parameters to copy; pass {name}=<nn.Module> (called as "
                "the teacher's net, returning its prediction type)"
            )

    def _generator_from_object(self, timesteps, sampler: str, w_embedding_dim: int) -> Generator | None:
        """The ``generator`` argument as the student (None when none was given: then the teacher's net is
        checked for the copy ``Generator.from_teacher`` makes)."""
        if self.generator_object is None:
            self.check_copy_source("generator")
            return None
        if w_embedding_dim:
            raise ConfigError(
                f"w_embedding_dim={w_embedding_dim}: a guidance-scale input is added to copies of the teacher's "
                "UNet only; with a generator object set w_embedding_dim: 0 (progressive: guided: false)"
            )
        return self.wrap_object(Generator, self.generator_object, timesteps=timesteps, sampler=sampler)

    def wrap_object(self, cls, module, **kw):
        """A Generator / FakeScore around a network given as an object: the teacher's schedule, prediction type
        and CFG convention, on the trainer's device, trainable."""
        module.to(self.accelerator.device).train()
        if not any(p.requires_grad for p in module.parameters()):  # e.g. a deep copy of a Teacher's frozen net
            module.requires_grad_(True)
        t = self.teacher
        return cls(module, t.schedule, t.prediction_type, cfg_convention=t.cfg_convention, **kw)

    def generator_params(self):
        if self.config.generator_mode == "full":
            return [p for p in self.generator.net.parameters() if p.requires_grad]
        # a w-conditioned LoRA student (guided progressive) also trains the guidance projection of its base
        proj = [p for p in guidance_projection_params(self.generator.net) if p.requires_grad]
        return _adapter_params(self.generator) + proj

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

    # ---------------------------------------------------------------- the real score (stepdistill/models/frozen.py)
    @property
    def real_score(self):
        """The frozen score the score-distillation losses read as the real one: the teacher, unless
        :meth:`swap_real_score` replaced it."""
        slot = self.__dict__.get("_real_slot")
        return slot.score if slot is not None and slot.active else self.teacher

    def swap_real_score(self, source, like: str = "teacher", key: str = "real_score") -> None:
        """Replace the real score by ``source`` (a weights path or state dict, loaded strictly into a frozen copy
        of network ``like``: "teacher" or a trainer attribute such as "fake"; None: the teacher again). Recorded
        in checkpoints (:meth:`extra_state`)."""
        from ..models.frozen import RealScoreSlot

        self.__dict__.setdefault("_real_slot", RealScoreSlot()).swap(self, source, like, key)

    def extra_state(self):
        slot = self.__dict__.get("_real_slot")
        return slot.state() if slot is not None else ({}, {})

    def load_extra_state(self, tensors, meta):
        if meta.get("real_score") or "_real_slot" in self.__dict__:
            self.swap_real_score(None)  # the slot exists from here on
            self.__dict__["_real_slot"].restore(self, tensors, meta)

    # ---------------------------------------------------------------- samples and export
    def export_timesteps(self) -> list:
        """Integer timesteps of the trained times; an EDM teacher's Karras-grid positions stay exact where they
        fall between grid points (ECT's trailing times: 499.5 of 0..999), as its pipeline takes them as ramp
        positions."""
        out = []
        for v in self.schedule.t_to_timestep(self.generator.timesteps).tolist():
            off_grid = self.schedule.kind == "edm" and abs(v - round(v)) > 1e-6
            out.append(v if off_grid else int(round(v)))
        return out

    @contextmanager
    def export_weights(self):
        """Within the block the generator holds the weights that export writes: its EMA when ``ema_decay`` > 0
        (except a LoRA generator, whose export merges the live adapter); its own weights are restored after."""
        ema = self.ema_state_dict("generator") if getattr(self, "ema", None) else None
        if ema is None or getattr(self.generator, "adapter_name", None) is not None:
            yield
            return
        net = self._inner("generator")
        saved = {k: v.detach().clone() for k, v in net.state_dict().items()}
        net.load_state_dict(ema)
        try:
            yield
        finally:
            net.load_state_dict(saved)

    @torch.no_grad()
    def sample(self, noise, cond=None, steps: int | None = None, generator=None, guidance_scale=None):
        """Samples from ``noise`` ~ N(0, I) with the generator's sampler and the weights the export writes
        (:meth:`export_weights`): what the exported pipeline gives for the same noise. ``steps``: the trained count
        by default; ``guidance_scale``: the export's default call scale by default."""
        w = self.export_guidance_scale if guidance_scale is None else guidance_scale
        with self.export_weights():
            return self.generator.sample(noise, cond, num_steps=steps, generator=generator, guidance_scale=w)

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
        gen = getattr(self, "generator", None)
        if gen is not None and gen.anchor_weight_now() > 0:
            warnings.warn(
                f"export at update {self.global_step}, inside student_prediction_warmup: the trained student is "
                f"still its network plus {gen.anchor_weight_now():.2f} x a teacher term, which the exported "
                "network alone lacks",
                stacklevel=2,
            )
        why = self.network_only_export()
        if why:
            self._export_network(path, why)
        else:
            export_generator(self, path)
        self.accelerator.wait_for_everyone()
        return path

    def network_only_export(self) -> str:
        """Why no diffusers pipeline can reproduce this student's sampler ("" when one can)."""
        if self.teacher_object is not None or self.generator_object is not None:
            given = "teacher" if self.teacher_object is not None else "generator"
            return (
                f"the {given} was given as an object (a pipeline is built from a teacher folder's scheduler and "
                "components around a diffusers network)"
            )
        if self.schedule.kind == "edm":  # EDMEulerScheduler pipelines (stepdistill/export.py)
            net = type(_unwrap(self.generator.net)).__name__
            if net not in ("UNet2DModel", "ToyMLP"):
                return f"students of EDM teachers export as a diffusers pipeline for UNet2DModel and ToyMLP, not {net}"
            if self.generator.prediction_type != "edm":
                return f"an EDM pipeline reads EDM's F, not a {self.generator.prediction_type!r} output"
            if getattr(self, "export_scheduler", "lcm") not in ("lcm", "ddim"):
                return f"export scheduler {self.export_scheduler!r} has no EDM form (lcm or ddim)"
            if getattr(self, "boundary", "none") != "none":  # consistency students: f is not the EDM denoiser
                return f"the consistency boundary {self.boundary!r} is not the EDM denoiser EDMEulerScheduler reads"
        if getattr(self.generator, "input_scale", 1.0) != 1.0:
            return "a scaled first input (generator_input: scaled) is not what stock pipelines feed"
        return ""

    def student_json_extra(self) -> dict:
        """Method-specific sampling facts for ``student.json`` (a network-only export); default none."""
        return {}

    def _export_network(self, path: str, why: str) -> None:
        """Write the generator network, the scheduler config and ``student.json`` (prediction type, trained
        sigmas, alphas and timesteps, first-input scale: x0 = generator(input_scale * sigma_0 * z) at the first
        time, re-noised to each next time), staged beside ``path`` and swapped in with the export marker.

        The network: ``<path>/unet`` (diffusers format) for a diffusers network, else its state dict as
        ``<path>/generator.safetensors`` (load it into the same module class: ``student.json``'s
        ``network_class``). The scheduler config: the teacher folder's, or the schedule's own config (a teacher
        object with a schedule built by ``from_config``); none when the schedule has no config."""
        from ..export import _generator_unet, _teacher_json
        from ..io import begin_export, finish_export, save_safetensors

        net = _generator_unet(self)
        if not self.accelerator.is_main_process:
            return
        diffusers_net = hasattr(net, "save_pretrained") and hasattr(net, "config")
        where = f"{path}/unet" if diffusers_net else f"{path}/generator.safetensors"
        warnings.warn(
            f"{type(self).__name__}: exported as a network only ({where}), not as a diffusers pipeline: {why}; "
            "student.json says how to sample",
            stacklevel=2,
        )
        tmp = begin_export(path)
        if diffusers_net:
            net.save_pretrained(os.path.join(tmp, "unet"))
        else:
            save_safetensors(net.state_dict(), os.path.join(tmp, "generator.safetensors"))
        if self.teacher_object is None:
            scheduler = _teacher_json(self._teacher_path(), "scheduler_config.json", "scheduler")
        else:
            scheduler = dict(getattr(self.schedule, "config", None) or {})
        if scheduler:
            os.makedirs(os.path.join(tmp, "scheduler"))
            with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
                json.dump(scheduler, f, indent=2)
        times = self.generator.timesteps
        info = {
            "prediction_type": self.generator.prediction_type,
            "sigmas": [float(v) for v in self.schedule.sigma(times)],
            "alphas": [float(v) for v in self.schedule.alpha(times)],
            "input_scale": float(getattr(self.generator, "input_scale", 1.0)),
            "timesteps": self.export_timesteps(),
            "sampler": self.generator.sampler,
            "network": "unet" if diffusers_net else "generator.safetensors",
            "network_class": f"{type(net).__module__}.{type(net).__qualname__}",
            "why_not_a_pipeline": why,
            **self.student_json_extra(),
        }
        with open(os.path.join(tmp, "student.json"), "w") as f:
            json.dump(info, f, indent=2)
        finish_export(tmp, path, "network")  # fsync, then swap in


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


class _AnchorRamp:
    """The generator's teacher-term weight: 1 -> 0 linearly over ``steps`` updates of ``trainer``."""

    def __init__(self, trainer, steps: int):
        import weakref

        self.trainer, self.steps = weakref.ref(trainer), steps

    def __call__(self) -> float:
        trainer = self.trainer()
        step = trainer.global_step if trainer is not None else self.steps
        return max(0.0, 1.0 - step / self.steps) if self.steps > 0 else 0.0

    def __deepcopy__(self, memo):
        return self


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


# objects given to the constructor ----------------------------------------------------------------------


class PlainLabels(ClassConditioner):
    """Class labels for a callable teacher: its ``cond`` argument is the int64 labels (B,); no null branch."""

    def __init__(self, num_classes: int):
        super().__init__(
            num_classes,
            with_null=False,
            no_null_reason="a callable teacher receives the labels as cond and has no unconditional branch",
        )

    def __call__(self, labels) -> Cond:
        out = super().__call__(labels)
        return Cond(kwargs={"cond": out.kwargs["class_labels"]}, null=None, null_reason=self.no_null_reason)


def _object_conditioner(net, labels):
    """The conditioner of a teacher given as an object: a diffusers class-conditional network's own, else the
    dataset's labels as ``cond`` (None: unconditional)."""
    name = type(_unwrap(net)).__name__
    if name in ("UNet2DConditionModel", "SD3Transformer2DModel"):
        raise ObjectError(
            f"teacher: a text-conditional {name} needs its tokenizers and text encoders; give it as a folder or hub "
            "id (the config's teacher key)"
        )
    if name == "UNet2DModel":
        inner = _unwrap(net)
        return ClassConditioner.for_unet2d(inner) if getattr(inner.config, "num_class_embeds", None) else None
    if name in ("DiTTransformer2DModel", "Transformer2DModel"):
        return ClassConditioner.for_dit(_unwrap(net))
    if labels is None:
        return None
    return PlainLabels(int(labels.max()) + 1)


def _cond_to(cond, device):
    return cond.to(device) if cond is not None else None


def _check_module(name: str, module):
    if module is None:
        return None
    if not isinstance(module, torch.nn.Module):
        raise ObjectError(f"{name}: expected an nn.Module (its parameters train), got {type(module).__name__}")
    if not _has_parameters(module):
        raise ObjectError(f"{name}: {type(module).__name__} has no parameters to train")
    return module


def _check_shape(shape):
    if shape is None:
        return None
    ok = isinstance(shape, (tuple, list, torch.Size)) and len(shape) > 0
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
    if not ok:
        raise ObjectError(f"sample_shape: expected a tuple of positive ints such as (2,) or (3, 32, 32), got {shape!r}")
    return tuple(shape)


def _has_parameters(net) -> bool:
    return isinstance(net, torch.nn.Module) and any(p.numel() for p in net.parameters())


def _shares_parameters(a, b) -> bool:
    if not isinstance(a, torch.nn.Module) or not isinstance(b, torch.nn.Module):
        return False
    ids = {id(p) for p in a.parameters()}
    return any(id(p) in ids for p in b.parameters())


def _device_of(net) -> torch.device:
    if isinstance(net, torch.nn.Module):
        for t in list(net.parameters()) + list(net.buffers()):
            return t.device
    return torch.device("cpu")


def _check_lora_base(key: str, net, targets, label: str) -> None:
    """``key`` (generator_mode / fake_score_mode) = lora needs Linear or Conv2d layers in the teacher's net
    (``label``: how to name it)."""
    from ..models.adapters import default_target_modules

    arg = key[: -len("_mode")]
    inner = _unwrap(net)
    if not isinstance(inner, torch.nn.Module):
        raise ConfigError(
            f"{key}=lora: the teacher's net {label} is a plain callable, which has no layers to put a LoRA on; use "
            f"{key}: full and pass {arg}=<nn.Module>"
        )
    if targets:
        names = [n for n, _ in inner.named_modules()]
        if not any(n == t or n.endswith("." + t) for t in targets for n in names):
            raise ConfigError(
                f"{key}=lora: lora_target_modules {list(targets)} match no layer of the teacher's net {label}; name "
                f"its layers (or [] for every Linear / Conv2d), use {key}: full, or pass {arg}=<nn.Module>"
            )
        return
    try:
        default_target_modules(inner)
    except ValueError:
        raise ConfigError(
            f"{key}=lora: the teacher's net {label} has no Linear or Conv2d layer to put a LoRA on; use {key}: full, "
            f"or pass {arg}=<nn.Module>"
        ) from None


_ITEM_KEYS = ("image", "label", "caption")


def _object_dataset(obj) -> "DistillDataset":
    """A dataset argument (a sample tensor, a torch Dataset or a finite iterable of items) read into a
    DistillDataset; an ObjectError naming ``dataset`` when it does not fit the item contract."""
    import itertools

    if isinstance(obj, DistillDataset):
        return obj
    if torch.is_tensor(obj):
        if obj.ndim < 2 or not obj.is_floating_point():
            raise ObjectError(
                f"dataset: a tensor dataset holds float samples (N, *sample_shape), got {obj.dtype} of shape "
                f"{tuple(obj.shape)}"
            )
        return DistillDataset(images=obj.detach().float().cpu())
    if isinstance(obj, (str, bytes, dict)):
        raise ObjectError(
            f"dataset: expected a tensor, a torch Dataset or an iterable of items, got {type(obj).__name__} (name "
            "datasets by string in the config's dataset key)"
        )
    if hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
        items = [obj[i] for i in range(len(obj))]
    else:
        try:
            items = list(itertools.islice(iter(obj), MAX_ITERABLE_ITEMS + 1))
        except TypeError:
            raise ObjectError(
                f"dataset: {type(obj).__name__} is neither a tensor, a Dataset (len and indexing) nor an iterable"
            ) from None
        if len(items) > MAX_ITERABLE_ITEMS:
            raise ObjectError(
                f"dataset: the iterable gave more than {MAX_ITERABLE_ITEMS} items (it is read into memory); pass a "
                "map-style Dataset or fewer items"
            )
    if not items:
        raise ObjectError("dataset: it has no items")
    rows = [_dataset_item(i, it) for i, it in enumerate(items)]
    keys = set(rows[0])
    for i, row in enumerate(rows):
        if set(row) != keys:
            raise ObjectError(f"dataset: item {i} has keys {sorted(row)}, but item 0 has {sorted(keys)}")
        if "image" in keys and row["image"].shape != rows[0]["image"].shape:
            raise ObjectError(
                f"dataset: item {i}'s sample has shape {tuple(row['image'].shape)}, item 0's "
                f"{tuple(rows[0]['image'].shape)}"
            )
    return DistillDataset(
        labels=torch.stack([r["label"] for r in rows]) if "label" in keys else None,
        captions=[r["caption"] for r in rows] if "caption" in keys else None,
        images=torch.stack([r["image"] for r in rows]) if "image" in keys else None,
        n=len(rows),
    )


def _dataset_item(i: int, item) -> dict:
    if torch.is_tensor(item):
        item = {"image": item}
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        item = {"image": item[0], "label": item[1]}
    elif not isinstance(item, dict):
        raise ObjectError(
            f"dataset: item {i} is a {type(item).__name__}; an item is a sample tensor, a (sample, label) pair or "
            f"a dict with keys among {list(_ITEM_KEYS)}"
        )
    unknown = sorted(set(item) - set(_ITEM_KEYS))
    if unknown:
        raise ObjectError(f"dataset: item {i} has keys {unknown}; the trainer reads {list(_ITEM_KEYS)}")
    out = {}
    if "image" in item:
        x = item["image"]
        if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 1:
            raise ObjectError(f"dataset: item {i}'s sample must be a float tensor of the sample shape, got {x!r:.60}")
        out["image"] = x.detach().float().cpu()
    if "label" in item:
        y = torch.as_tensor(item["label"])
        if y.ndim != 0 or y.is_floating_point() or y.dtype == torch.bool or y.is_complex() or int(y) < 0:
            raise ObjectError(f"dataset: item {i}'s label must be a non-negative int, got {item['label']!r}")
        out["label"] = y.long()
    if "caption" in item:
        if not isinstance(item["caption"], str):
            raise ObjectError(f"dataset: item {i}'s caption must be a str, got {type(item['caption']).__name__}")
        out["caption"] = item["caption"]
    return out


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
    elif name == "ToyMLP" and getattr(net.config, "num_class_embeds", None):  # labels as cond (toy_classes)
        conditioner = PlainLabels(int(net.config.num_class_embeds))
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

    def __init__(self, labels=None, captions=None, images=None, n: int | None = None):
        self.labels, self.captions, self.images = labels, captions, images
        given = labels if labels is not None else captions if captions is not None else images
        self.n = len(given) if given is not None else int(n)
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


def _stream_for(c, sample_shape, vae, conditioner):
    """A streamed dataset (``shards:`` / ``hf:`` / ``latents:``): images are decoded in the loader workers and
    VAE-encoded per batch on the main process; a latent cache gives latents and text embeddings directly."""
    from ..data.shards import ImageDecoder, ShardStream, open_stream

    if c.cache_text_embeddings:
        fix = (
            "the cache already holds the embeddings: set cache_text_embeddings: false"
            if c.dataset.startswith("latents:")
            else "encode them once with `stepdistill cache` and train on dataset: latents:<dir>"
        )
        raise ConfigError(
            f"cache_text_embeddings: true with the streamed dataset {c.dataset!r}: its prompts are not listed up "
            f"front; {fix}"
        )
    options = dict(spec=c.dataset, workers=c.data_workers, shuffle_window=c.shuffle_window, max_bad=c.max_bad_samples)
    text = isinstance(conditioner, TextConditioner)
    if text and (conditioner.cache_size is None or conditioner.cache_size > STREAM_PROMPT_CACHE):
        conditioner.cache_size = STREAM_PROMPT_CACHE  # embeddings of recent prompts only: memory stays bounded
    size = sample_shape[-1] * vae_scale_factor(vae)
    if c.dataset.startswith("latents:"):
        from ..data.cache import LatentDecoder, LatentShards, check_cache, fingerprint

        source = LatentShards(c.dataset[len("latents:") :])
        check_cache(source.index, fingerprint(vae, conditioner if text else None, size), source.root)
        if list(source.index["latent_shape"]) != list(sample_shape):
            raise ConfigError(
                f"dataset: the latents in {c.dataset!r} are {source.index['latent_shape']}, the generator samples "
                f"{list(sample_shape)}; set resolution: {source.index['latent_shape'][-1]} or make the cache anew"
            )
        return ShardStream(source, LatentDecoder(), on_batch=partial(_cached_embeddings, conditioner), **options)
    source = open_stream(c.dataset, image_key=c.image_key, caption_key=c.caption_key)
    if c.image_key == "none":  # captions only: nothing to decode or encode
        if not text:
            raise ConfigError(f"image_key: none leaves {c.dataset!r} without images, and the teacher takes no text")
        if not getattr(c, "backward_simulation", True) and len(getattr(c, "denoising_timesteps", ())) > 1:
            raise ConfigError(
                "backward_simulation=false trains later steps on noised real images; image_key: none reads none"
            )
        return ShardStream(source, ImageDecoder(size, images=False), **options)
    home = None if vae is None else next(vae.parameters()).device  # the accelerator, before any teacher_offload
    encode = partial(_encode_batch, vae, home)
    return ShardStream(source, ImageDecoder(size, need_caption=text), on_batch=encode, **options)


def _encode_batch(vae, device, batch):
    """VAE-encode a streamed batch on ``device``; a VAE that teacher_offload moved to the CPU comes over for it."""
    moved = vae is not None and next(vae.parameters()).device != device
    if moved:
        vae.to(device)
    try:
        batch["image"] = _encode_images(vae, batch["image"])
    finally:
        if moved:
            vae.to("cpu")
    return batch


def _cached_embeddings(conditioner, batch):
    """Put a latent cache's text embeddings of the batch's captions into the conditioner's prompt cache, so that
    the trainer's ``conditioner(captions)`` runs no text encoder."""
    emb = batch.pop("emb", None)
    if emb is not None and isinstance(conditioner, TextConditioner):
        device = next(e for e in conditioner.text_encoders if e is not None).device
        for j, caption in enumerate(batch["caption"]):
            conditioner._cache[caption] = {k: v[j : j + 1].to(device) for k, v in emb.items()}
            conditioner._cache.move_to_end(caption)
        keep = max(conditioner.cache_size or 0, 2 * len(batch["caption"]))
        while len(conditioner._cache) > keep:  # least recently used first, as the conditioner's own cache does
            conditioner._cache.popitem(last=False)
    return batch


def _dataset_for(c, sample_shape, vae, conditioner=None):
    from ..data import DigitsDataset, ImageFolderDataset, load_prompts, sample_toy2d
    from ..data.shards import is_stream_spec

    ds = c.dataset
    if is_stream_spec(ds):
        return _stream_for(c, sample_shape, vae, conditioner)
    if ds == "digits":
        d = DigitsDataset("train", sample_shape[-1])
        imgs = torch.stack([d[i]["image"] for i in range(len(d))])
        labels = torch.stack([d[i]["label"] for i in range(len(d))])
        return DistillDataset(labels=labels, images=imgs)
    if ds.startswith("toy2d:"):
        x, labels = sample_toy2d(ds[6:], 20000, torch.Generator().manual_seed(c.seed))
        return DistillDataset(labels=labels, images=x)  # labels: the mixture component (class-conditional toys)
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
