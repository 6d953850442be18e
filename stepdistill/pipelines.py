"""diffusers pipelines for distilled generators: a plain call samples with the trained timesteps.

Pixel-space class-conditional UNets (StepDistillClassPipeline), SD / SDXL UNets (StepDistillSD[XL]Pipeline), DiT
(StepDistillDiTPipeline, a DiTPipeline), SD3 transformers (StepDistillSD3Pipeline, a StableDiffusion3Pipeline) and
toy 2-D MLPs (StepDistillToyPipeline). diffusers' stock pipelines default to 28-50 steps with CFG, which is wrong
for a one- or few-step student. These subclasses store the trained timesteps in the pipeline config and use them,
with guidance off, unless the caller says otherwise; ``model_index.json`` keeps them under the private key
``_stepdistill``, which stock classes skip without a warning. ``import stepdistill`` registers the classes with
diffusers, so ``DiffusionPipeline.from_pretrained(folder)`` finds them. The model card of every exported folder
starts with the call that works with stock diffusers classes alone (except where none exists: w-conditioned and
toy students).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass

import torch
from diffusers import (
    DiffusionPipeline,
    DiTPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

# diffusers loads a component of another library only if its module is already imported: exported folders name
# ["stepdistill.models.guided_unet", "GuidedUNet2DModel"] (w-conditioned students) and ["stepdistill.models.toy",
# "ToyMLP"]; this module is imported when the pipeline classes are registered (stepdistill/__init__.py)
from .models import guided_unet as _guided_unet_module  # noqa: F401
from .models import routed as _routed_module  # noqa: F401  (MSD: ["stepdistill.models.routed", "RoutedUNet2DModel"])
from .models import toy as _toy_module  # noqa: F401

# model_index.json keeps stepdistill's own settings under this private key: diffusers drops keys that start with
# "_" without a word, so a stock class (StableDiffusionXLPipeline.from_pretrained(folder)) loads the folder without
# "config attributes ... are not expected" warnings, and our classes read them back (extract_init_dict below)
META_KEY = "_stepdistill"
META_FIELDS = ("trained_timesteps", "default_guidance_scale", "renoise")


class _PrivateSettings:
    """Writes ``trained_timesteps`` / ``default_guidance_scale`` / ``renoise`` under the private ``_stepdistill`` key of
    model_index.json and reads them back when loading (in memory they stay plain config keys:
    ``pipe.config.trained_timesteps``). Folders written before this hold them as plain keys, which still load."""

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        meta = config_dict.get(META_KEY) or {}
        for key in META_FIELDS:
            if key in meta and key not in kwargs:
                kwargs[key] = meta[key]
        return super().extract_init_dict(config_dict, **kwargs)

    def to_json_string(self) -> str:
        data = json.loads(super().to_json_string())
        meta = dict(data.get(META_KEY) or {})
        for key in META_FIELDS:
            if key in data:
                meta[key] = data.pop(key)
        data[META_KEY] = meta
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


class StepDistillClassPipeline(_PrivateSettings, DiffusionPipeline):
    """Class-conditional (or unconditional) pixel-space generator: ``pipe(class_labels=[3, 1, 4])``.

    Components: ``unet`` (UNet2DModel, or GuidedUNet2DModel for w-conditioned students) and ``scheduler``
    (LCMScheduler: x0 prediction, then fresh noise to the next trained timestep; DDIMScheduler with trailing
    spacing for deterministic students; TCDScheduler; EDMEulerScheduler for students of EDM teachers, see
    :func:`edm_step`).

    ``guidance_scale`` (uncond + w (cond - uncond)): a w-conditioned unet takes it as an input (one network
    evaluation per step, default: the scale it was exported with); any other class-conditional unet runs
    classifier-free guidance with the null class (two evaluations per step) when it is not 1."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, trained_timesteps=None, default_guidance_scale=None, renoise=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(
            trained_timesteps=list(trained_timesteps or [scheduler.config.num_train_timesteps - 1]),
            default_guidance_scale=default_guidance_scale,
        )
        _register_renoise(self, renoise)

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        num_images: int | None = None,
        generator=None,
        num_inference_steps: int | None = None,
        timesteps=None,
        guidance_scale: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        teacher=None,
        teacher_steps: int = 0,
        teacher_guidance_scale: float = 1.0,
        teacher_timesteps=None,
        trace: list | None = None,
    ):
        """``teacher`` / ``teacher_steps`` / ``teacher_guidance_scale`` / ``teacher_timesteps``: hybrid sampling
        (stepdistill.hybrid: the teacher's first steps, then the student's trained steps from the hand-over);
        ``trace``: a list that receives the predicted x0 of every step (teacher and student)."""
        n_classes = getattr(self.unet.config, "num_class_embeds", None)
        if class_labels is None:
            num_images = num_images or 1
            labels = None if not n_classes else torch.arange(num_images) % (n_classes - 1)
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if not n_classes:
                raise ValueError("this unconditional model takes no class_labels")
            if (labels < 0).any() or (labels >= n_classes - 1).any():
                raise ValueError(f"class_labels must be in [0, {n_classes - 2}], got {labels.tolist()}")
            num_images = len(labels)
        set_scheduler_timesteps(
            self.scheduler, self.config.trained_timesteps, num_inference_steps, timesteps, self.device
        )
        size = self.unet.config.sample_size
        shape = (num_images, self.unet.config.in_channels, size, size)
        x = initial_sample(self.scheduler, shape, generator, self.device, self.unet.dtype)
        kwargs = {"class_labels": labels.to(self.device)} if labels is not None else {}
        w_dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        if guidance_scale is None:
            guidance_scale = self.config.get("default_guidance_scale", None) if w_dim else 1.0
            guidance_scale = 1.0 if guidance_scale is None else guidance_scale
        cfg = not w_dim and guidance_scale != 1.0
        if w_dim:
            from .guidance import guidance_scale_embedding

            w = torch.full((num_images,), float(guidance_scale) - 1.0)
            kwargs["timestep_cond"] = guidance_scale_embedding(w, w_dim).to(self.device, self.unet.dtype)
        elif cfg:
            if labels is None:
                raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional model")
            null = torch.full_like(labels, n_classes - 1)
            kwargs = {"class_labels": torch.cat([labels, null]).to(self.device)}
        x, start = _hybrid_start(
            self, x, labels, teacher, teacher_steps, teacher_guidance_scale, teacher_timesteps, trace
        )
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if i < start:  # run by the teacher (hybrid sampling)
                continue
            x_in = self.scheduler.scale_model_input(x, t)  # EDM: c_in x; identity for the VP schedulers
            if cfg:
                out_c, out_u = self.unet(torch.cat([x_in, x_in]), t, **kwargs).sample.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            else:
                out = self.unet(x_in, t, **kwargs).sample
            x = student_step(self.scheduler, out, t, x, i, generator, self.config.get("renoise", None), trace)
        image = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            images = image
        else:
            images = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


class StepDistillDiTPipeline(_PrivateSettings, DiTPipeline):
    """Class-conditional latent transformer (DiT) generator: ``pipe(class_labels=[207, 360])``.

    Components as ``DiTPipeline`` (``transformer``, ``vae``, ``scheduler``, ``id2label``); the scheduler is
    the one that reproduces the trained steps (LCMScheduler / trailing DDIMScheduler / TCDScheduler). Unlike
    the stock ``DiTPipeline`` call (50 steps, CFG 4 with ImageNet's null class 1000, unseeded re-noising), a
    plain call samples at the trained timesteps without guidance, passes ``generator`` to every scheduler step,
    and takes the null class from the transformer (``num_embeds_ada_norm``) when ``guidance_scale`` != 1.
    Class labels may be ints or ImageNet names (``id2label``, as ``DiTPipeline.get_label_ids``)."""

    def __init__(self, transformer, vae, scheduler, id2label=None, trained_timesteps=None, default_guidance_scale=None):
        id2label = {str(k): v for k, v in id2label.items()} if id2label else None
        super().__init__(transformer, vae, scheduler, id2label)
        self.register_to_config(
            id2label=id2label,
            trained_timesteps=list(trained_timesteps or [scheduler.config.num_train_timesteps - 1]),
            default_guidance_scale=default_guidance_scale,
        )

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        num_images: int | None = None,
        guidance_scale: float | None = None,
        generator=None,
        num_inference_steps: int | None = None,
        timesteps=None,
        output_type: str = "pil",
        return_dict: bool = True,
        teacher=None,
        teacher_steps: int = 0,
        teacher_guidance_scale: float = 1.0,
        teacher_timesteps=None,
        trace: list | None = None,
    ):
        """``teacher`` / ``teacher_steps`` / ``teacher_guidance_scale`` / ``teacher_timesteps`` / ``trace``: as
        StepDistillClassPipeline (the teacher: a DiT :class:`stepdistill.models.Teacher`; latents traced)."""
        config = self.transformer.config
        n_classes = config.num_embeds_ada_norm
        if class_labels is None:
            labels = torch.arange(num_images or 1) % n_classes
        else:
            if isinstance(class_labels, (str, int)):
                class_labels = [class_labels]
            if all(isinstance(c, str) for c in class_labels):
                class_labels = self.get_label_ids(list(class_labels))
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if (labels < 0).any() or (labels >= n_classes).any():
                raise ValueError(f"class_labels must be in [0, {n_classes - 1}], got {labels.tolist()}")
        device = self._execution_device
        set_scheduler_timesteps(self.scheduler, self.config.trained_timesteps, num_inference_steps, timesteps, device)
        channels, size = config.in_channels, config.sample_size
        shape = (len(labels), channels, size, size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        guidance_scale = 1.0 if guidance_scale is None else float(guidance_scale)
        labels = labels.to(device)
        x, start = _hybrid_start(
            self, x, labels, teacher, teacher_steps, teacher_guidance_scale, teacher_timesteps, trace
        )
        if guidance_scale != 1.0:  # classifier-free guidance with the null class (DiT's label dropout row)
            labels = torch.cat([labels, torch.full_like(labels, n_classes)])
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if i < start:  # run by the teacher (hybrid sampling)
                continue
            x_in = self.scheduler.scale_model_input(x, t)
            if guidance_scale != 1.0:
                x_in = torch.cat([x_in, x_in])
            time = torch.as_tensor(t, device=device).reshape(-1).expand(x_in.shape[0])
            out = self.transformer(x_in, timestep=time, class_labels=labels).sample[:, :channels]  # learned sigma
            if guidance_scale != 1.0:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = student_step(self.scheduler, out, t, x, i, generator, None, trace)
        if output_type == "latent":
            self.maybe_free_model_hooks()
            return ImagePipelineOutput(images=x) if return_dict else (x,)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        image = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor + shift).sample
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            images = image
        else:
            images = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


@dataclass
class PointsPipelineOutput(BaseOutput):
    """``samples``: (N, dim) points; a torch tensor for ``output_type="pt"``, a numpy array for ``"np"``."""

    samples: object


class StepDistillToyPipeline(_PrivateSettings, DiffusionPipeline):
    """A toy (2-D) generator: ``pipe(num_samples=1000, generator=g).samples`` is an (N, dim) tensor of points.

    Components: ``unet`` (stepdistill's ToyMLP: ``unet/config.json`` + safetensors weights; loading it needs
    stepdistill, there is no stock diffusers class for it) and ``scheduler`` (as StepDistillClassPipeline: the
    one that reproduces the trained steps). ``stepdistill sample --model <folder>`` draws a scatter plot."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, trained_timesteps=None, renoise=None, default_guidance_scale=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(trained_timesteps=list(trained_timesteps or [scheduler.config.num_train_timesteps - 1]))
        _register_renoise(self, renoise)
        if default_guidance_scale is not None:  # a ToyMLP with a timestep_cond input (MeanFlow): embed(w - 1)
            self.register_to_config(default_guidance_scale=float(default_guidance_scale))

    @torch.no_grad()
    def __call__(
        self,
        num_samples: int = 1,
        generator=None,
        num_inference_steps: int | None = None,
        timesteps=None,
        output_type: str = "pt",
        return_dict: bool = True,
        teacher=None,
        teacher_steps: int = 0,
        teacher_timesteps=None,
        trace: list | None = None,
        class_labels=None,
    ):
        """``teacher`` / ``teacher_steps`` / ``teacher_timesteps`` / ``trace``: as StepDistillClassPipeline.
        ``class_labels``: one label per point for a class-conditional ToyMLP (MSD's routed one: each point's
        student); they set the number of points."""
        kwargs = {}
        if class_labels is not None:
            kwargs["cond"] = torch.as_tensor(class_labels, device=self.device).long().reshape(-1)
            num_samples = len(kwargs["cond"])
        set_scheduler_timesteps(
            self.scheduler, self.config.trained_timesteps, num_inference_steps, timesteps, self.device
        )
        shape = (int(num_samples), self.unet.config.dim)
        x = initial_sample(self.scheduler, shape, generator, self.device, self.unet.dtype)
        labels = None
        if "cond" in kwargs:  # a class-conditional toy teacher reads the same labels as ``cond``
            from .models.conditioning import Cond

            labels = Cond(kwargs={"cond": kwargs["cond"]}, null=None, null_reason="toy labels have no null class")
        x, start = _hybrid_start(self, x, labels, teacher, teacher_steps, 1.0, teacher_timesteps, trace)
        w_dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        if w_dim:
            from .guidance import guidance_scale_embedding

            w = torch.full((shape[0],), float(self.config.get("default_guidance_scale", 1.0)) - 1.0)
            kwargs["timestep_cond"] = guidance_scale_embedding(w, w_dim).to(self.device, self.unet.dtype)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if i < start:  # run by the teacher (hybrid sampling)
                continue
            x_in = self.scheduler.scale_model_input(x, t)
            out = self.unet(x_in, torch.as_tensor(t, device=self.device, dtype=torch.float32), **kwargs)
            x = student_step(self.scheduler, out, t, x, i, generator, self.config.get("renoise", None), trace)
        samples = x if output_type == "pt" else x.cpu().float().numpy()
        if not return_dict:
            return (samples,)
        return PointsPipelineOutput(samples=samples)


def toy_model_kind(path) -> str | None:
    """Returns "pipeline" for an exported toy generator (StepDistillToyPipeline folder), "network" for a folder whose
    ``unet/`` is a ToyMLP (a toy teacher from ``recipes/teacher/toy2d.yaml``), None otherwise (local folders)."""
    if path is None or not os.path.isdir(path):
        return None
    for name, kind in (("model_index.json", "pipeline"), (os.path.join("unet", "config.json"), "network")):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                cls = json.load(f).get("_class_name")
            if cls in ("StepDistillToyPipeline", "ToyMLP"):
                return kind
    return None


def sample_toy(path: str, num: int, steps: int, seed: int, out: str) -> int:
    """``stepdistill sample`` for toy folders: an exported generator samples its trained steps (``steps`` is
    ignored), a toy teacher samples ``steps`` trailing DDIM steps. Writes a scatter plot PNG to ``out`` and the
    points to ``<out without .png>.npy``."""
    import numpy as np

    generator = torch.Generator().manual_seed(seed)
    if toy_model_kind(path) == "pipeline":
        pipe = DiffusionPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        points = pipe(num_samples=num, generator=generator).samples
        how = f"{len(pipe.config.trained_timesteps)} trained step(s) at timesteps {list(pipe.config.trained_timesteps)}"
    else:
        from .models import Teacher
        from .sampling import sample

        teacher = Teacher.from_pretrained(path)
        noise = torch.randn(num, teacher.net.config.dim, generator=generator)
        points = sample(
            lambda x, t: teacher.raw(x, t), teacher.schedule, noise, steps, pred_type=teacher.prediction_type
        )
        how = f"{steps} DDIM steps"
    points = points.detach().cpu().float()
    save_points_png(points, out)
    stem = out[:-4] if out.lower().endswith(".png") else out
    tmp = stem + ".tmp.npy"
    np.save(tmp, points.numpy())
    os.replace(tmp, stem + ".npy")
    print(f"wrote {out} and {stem}.npy: {len(points)} points, {how}")
    return 0


def save_points_png(points: torch.Tensor, path: str, size: int = 400) -> str:
    """A scatter plot of 2-D points (the first two coordinates), axes through the origin, drawn with PIL."""
    from PIL import Image, ImageDraw

    pts = points[:, :2].double()
    finite = pts[torch.isfinite(pts).all(dim=1)]
    bound = float(finite.abs().quantile(0.995)) * 1.1 if len(finite) else 1.0
    bound = bound if bound > 0 else 1.0
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    mid = size // 2
    draw.line([(0, mid), (size, mid)], fill=(200, 200, 200))
    draw.line([(mid, 0), (mid, size)], fill=(200, 200, 200))
    for x, y in ((finite + bound) / (2 * bound) * (size - 1)).tolist():
        py = size - 1 - y
        draw.ellipse([x - 1, py - 1, x + 1, py + 1], fill=(30, 90, 200))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
    return path


def is_edm_scheduler(scheduler) -> bool:
    """diffusers' EDM schedulers (sigmas on a Karras grid, ``precondition_*``): EDMEulerScheduler and
    EDMDPMSolverMultistepScheduler."""
    return type(scheduler).__name__.startswith("EDM")


def _register_renoise(pipe, renoise) -> None:
    """``renoise`` is written only where it is set (EDM students), so other folders keep their settings as before."""
    if renoise is not None:
        pipe.register_to_config(renoise=bool(renoise))


def initial_sample(scheduler, shape, generator, device, dtype) -> torch.Tensor:
    """x at the first step: z ~ N(0, I), times the first sigma for an EDM scheduler (x = x0 + sigma z; diffusers'
    ``init_noise_sigma`` for EDM is sqrt(sigma_max^2 + 1), the scale of another input convention)."""
    x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if is_edm_scheduler(scheduler):
        x = x * scheduler.sigmas[0].to(device=x.device, dtype=x.dtype)
    return x


def _hybrid_start(pipe, x, labels, teacher, steps, guidance_scale, teacher_timesteps, trace):
    """(x, first student index): the teacher's first ``steps`` steps (stepdistill.hybrid), or x itself and 0."""
    if not steps:
        return x, 0
    if teacher is None:
        raise ValueError(f"teacher_steps={steps} needs a teacher (stepdistill.models.Teacher)")
    from .hybrid import teacher_prefix

    trained = pipe.config.trained_timesteps
    return teacher_prefix(teacher, x, trained, steps, labels, guidance_scale, teacher_timesteps, trace)


def student_step(scheduler, out, t, x, i: int, generator, renoise, trace=None) -> torch.Tensor:
    """One trained step: the scheduler's own step, except for ``renoise`` (EDM students trained with fresh noise
    between steps, DMD2 / consistency): x0, then x0 + sigma_{i+1} z with fresh z, as the trainers' sampler does
    (``Generator.sample``). EDMEulerScheduler's own step is the Euler (= DDIM, for EDM) step to sigma_{i+1}: the
    deterministic students' rule. An EDM scheduler's last step returns x0 itself (its Euler step into sigma = 0,
    x - (x - x0), loses digits at sigma_max = 80)."""
    step = scheduler.step(out, t, x, generator=generator)
    if trace is not None:
        from .hybrid import step_x0

        trace.append(step_x0(scheduler, step, out, t, x).detach().float().cpu())
    if not is_edm_scheduler(scheduler):
        return step.prev_sample
    if i + 1 >= len(scheduler.timesteps):
        return step.pred_original_sample.to(x.dtype)
    if not renoise:
        return step.prev_sample
    z = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x0 = step.pred_original_sample.to(x.dtype)
    return x0 + scheduler.sigmas[i + 1].to(device=x.device, dtype=x.dtype) * z


def set_scheduler_timesteps(scheduler, trained, num_inference_steps=None, timesteps=None, device=None):
    """The trained timesteps by default; a scheduler without custom timesteps (DDIM) gets the step count. An EDM
    scheduler takes the trained Karras-grid timesteps as ramp positions (``sigmas``: 1 - timestep / (T - 1))."""
    trained = list(trained)
    timesteps = list(timesteps) if timesteps is not None else None
    if timesteps is None and num_inference_steps in (None, len(trained)):
        timesteps = trained
    if is_edm_scheduler(scheduler):
        if timesteps is None:
            scheduler.set_timesteps(num_inference_steps, device=device)
            return
        if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(
                f"{type(scheduler).__name__}.set_timesteps takes no sigmas in this diffusers version; EDM students "
                "need diffusers >= 0.33 for their trained noise levels"
            )
        T = scheduler.config.num_train_timesteps
        ramp = 1 - torch.tensor([float(t) for t in timesteps], dtype=torch.float64) / (T - 1)
        scheduler.set_timesteps(len(timesteps), device=device, sigmas=ramp)
        return
    if "timesteps" in inspect.signature(scheduler.set_timesteps).parameters:
        if timesteps is not None:
            scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            scheduler.set_timesteps(num_inference_steps=num_inference_steps, device=device)
        return
    n = len(timesteps) if timesteps is not None else num_inference_steps
    scheduler.set_timesteps(n, device=device)
    got = [int(t) for t in scheduler.timesteps]
    if timesteps is not None and got != [int(t) for t in timesteps]:
        raise ValueError(f"{type(scheduler).__name__} cannot take custom timesteps {timesteps}; its grid is {got}")


class _TrainedStepsMixin:
    """Defaults for text-to-image students: trained timesteps, guidance off (w-conditioned students: the
    scale they were exported with, fed as an input, no second pass)."""

    def _defaults(self, kwargs):
        trained = list(self.config.trained_timesteps)
        custom = "timesteps" in inspect.signature(self.scheduler.set_timesteps).parameters
        if kwargs.get("timesteps") is None and kwargs.get("num_inference_steps") in (None, len(trained)):
            if custom:
                kwargs["timesteps"] = trained
            kwargs["num_inference_steps"] = len(trained)
        w = self.config.get("default_guidance_scale", None)
        kwargs.setdefault("guidance_scale", w if w is not None and self.unet.config.time_cond_proj_dim else 0.0)
        return kwargs

    def __call__(
        self, *args, teacher=None, teacher_steps=0, teacher_guidance_scale=1.0, teacher_timesteps=None, **kwargs
    ):
        """``teacher`` / ``teacher_steps`` / ``teacher_guidance_scale`` / ``teacher_timesteps``: hybrid sampling,
        as StepDistillClassPipeline (stepdistill.hybrid.text_prefix); the other arguments: the stock call's."""
        args, kwargs, cut = _hybrid_text(
            self, args, self._defaults(kwargs), teacher, teacher_steps, teacher_guidance_scale, teacher_timesteps
        )
        from .hybrid import scheduler_from_index

        with scheduler_from_index(self.scheduler, cut):
            return super().__call__(*args, **kwargs)


def _hybrid_text(pipe, args, kwargs, teacher, steps, guidance_scale, teacher_timesteps):
    """(args, kwargs, cut) of a text-to-image call: unchanged without ``steps``, else after the teacher's prefix."""
    if not steps:
        return args, kwargs, 0
    if teacher is None:
        raise ValueError(f"teacher_steps={steps} needs a teacher (stepdistill.models.Teacher)")
    from .hybrid import text_prefix

    kwargs, cut = text_prefix(pipe, args, kwargs, teacher, steps, guidance_scale, teacher_timesteps)
    return (), kwargs, cut


class StepDistillSDPipeline(_PrivateSettings, _TrainedStepsMixin, StableDiffusionPipeline):
    """StableDiffusionPipeline whose plain call samples with the trained timesteps and no CFG."""

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
        trained_timesteps=None,
        default_guidance_scale=None,
    ):
        super().__init__(
            vae,
            text_encoder,
            tokenizer,
            unet,
            scheduler,
            safety_checker,
            feature_extractor,
            image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.register_to_config(
            trained_timesteps=list(trained_timesteps or [999]), default_guidance_scale=default_guidance_scale
        )


class StepDistillSDXLPipeline(_PrivateSettings, _TrainedStepsMixin, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline whose plain call samples with the trained timesteps and no CFG."""

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker=None,
        trained_timesteps=None,
        default_guidance_scale=None,
    ):
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder,
            feature_extractor,
            force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
        self.register_to_config(
            trained_timesteps=list(trained_timesteps or [999]), default_guidance_scale=default_guidance_scale
        )


class StepDistillSD3Pipeline(_PrivateSettings, StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline whose plain call samples at the trained sigmas (trained timesteps / T) without CFG.

    The scheduler is ``FlowMatchEulerDiscreteScheduler`` with ``shift=1`` (the trained sigmas are used as they
    are) and ``stochastic_sampling=True`` for students that predict x0 and re-noise with fresh noise (DMD2,
    consistency: x0 = x - sigma v, then (1 - sigma') x0 + sigma' z), False for deterministic Euler students. The
    stock pipeline does not pass ``generator`` to the scheduler's step; this one does, so a seeded call is
    reproducible at several steps too."""

    def __init__(
        self,
        transformer,
        scheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        text_encoder_3,  # no default: diffusers treats parameters with defaults as config values, not components
        tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
        trained_timesteps=None,
        default_guidance_scale=None,
    ):
        super().__init__(
            transformer,
            scheduler,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            text_encoder_3,
            tokenizer_3,
            image_encoder,
            feature_extractor,
        )
        self.register_to_config(
            trained_timesteps=list(trained_timesteps or [scheduler.config.num_train_timesteps - 1]),
            default_guidance_scale=default_guidance_scale,
        )

    def trained_sigmas(self) -> list[float]:
        T = self.scheduler.config.num_train_timesteps
        return [t / T for t in self.config.trained_timesteps]

    def __call__(
        self, *args, teacher=None, teacher_steps=0, teacher_guidance_scale=1.0, teacher_timesteps=None, **kwargs
    ):
        """``teacher`` / ``teacher_steps`` / ``teacher_guidance_scale`` / ``teacher_timesteps``: hybrid sampling,
        as StepDistillClassPipeline (stepdistill.hybrid.text_prefix); the other arguments: the stock call's."""
        args, kwargs, _ = _hybrid_text(
            self, args, kwargs, teacher, teacher_steps, teacher_guidance_scale, teacher_timesteps
        )
        trained = list(self.config.trained_timesteps)
        if kwargs.get("sigmas") is None and kwargs.get("num_inference_steps") in (None, len(trained)):
            kwargs["sigmas"] = self.trained_sigmas()
            kwargs["num_inference_steps"] = len(trained)
        kwargs.setdefault("guidance_scale", 0.0)
        generator = kwargs.get("generator")
        if generator is None or not self.scheduler.config.get("stochastic_sampling", False):
            return super().__call__(*args, **kwargs)
        # the stock loop calls scheduler.step(noise_pred, t, latents, return_dict=False): give it the generator
        self.scheduler.step = functools.partial(type(self.scheduler).step, self.scheduler, generator=generator)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            del self.scheduler.step


PIPELINES = (
    StepDistillClassPipeline,
    StepDistillToyPipeline,
    StepDistillDiTPipeline,
    StepDistillSDPipeline,
    StepDistillSDXLPipeline,
    StepDistillSD3Pipeline,
)


def register_with_diffusers() -> None:
    """Make ``DiffusionPipeline.from_pretrained`` resolve our pipeline classes by name."""
    import diffusers

    for cls in PIPELINES:
        if getattr(diffusers, cls.__name__, None) is not cls:
            setattr(diffusers, cls.__name__, cls)
