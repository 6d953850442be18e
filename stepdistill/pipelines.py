"""diffusers pipelines for distilled generators: a plain call samples with the trained timesteps.

Pixel-space class-conditional UNets (StepDistillClassPipeline), SD / SDXL UNets (StepDistillSD[XL]Pipeline), DiT
(StepDistillDiTPipeline, a DiTPipeline) and SD3 transformers (StepDistillSD3Pipeline, a StableDiffusion3Pipeline).
diffusers' stock pipelines default to 28-50 steps with CFG, which is wrong for a one- or few-step student.
These subclasses store the trained timesteps in the pipeline config (``model_index.json``) and use them,
with guidance off, unless the caller says otherwise. ``import stepdistill`` registers them with diffusers,
so ``DiffusionPipeline.from_pretrained(folder)`` finds them. The model card of every exported folder also
gives the call that works with stock diffusers classes alone.
"""

from __future__ import annotations

import functools
import inspect

import torch
from diffusers import (
    DiffusionPipeline,
    DiTPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class StepDistillClassPipeline(DiffusionPipeline):
    """Class-conditional (or unconditional) pixel-space generator: ``pipe(class_labels=[3, 1, 4])``.

    Components: ``unet`` (UNet2DModel, or GuidedUNet2DModel for w-conditioned students) and ``scheduler``
    (LCMScheduler: x0 prediction, then fresh noise to the next trained timestep; DDIMScheduler with trailing
    spacing for deterministic students; TCDScheduler).

    ``guidance_scale`` (uncond + w (cond - uncond)): a w-conditioned unet takes it as an input (one network
    evaluation per step, default: the scale it was exported with); any other class-conditional unet runs
    classifier-free guidance with the null class (two evaluations per step) when it is not 1."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, trained_timesteps=None, default_guidance_scale=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(
            trained_timesteps=list(trained_timesteps or [scheduler.config.num_train_timesteps - 1]),
            default_guidance_scale=default_guidance_scale,
        )

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
    ):
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
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
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
        for t in self.progress_bar(self.scheduler.timesteps):
            if cfg:
                out_c, out_u = self.unet(torch.cat([x, x]), t, **kwargs).sample.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            else:
                out = self.unet(x, t, **kwargs).sample
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
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


class StepDistillDiTPipeline(DiTPipeline):
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
    ):
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
        if guidance_scale != 1.0:  # classifier-free guidance with the null class (DiT's label dropout row)
            labels = torch.cat([labels, torch.full_like(labels, n_classes)])
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = self.scheduler.scale_model_input(x, t)
            if guidance_scale != 1.0:
                x_in = torch.cat([x_in, x_in])
            time = torch.as_tensor(t, device=device).reshape(-1).expand(x_in.shape[0])
            out = self.transformer(x_in, timestep=time, class_labels=labels).sample[:, :channels]  # learned sigma
            if guidance_scale != 1.0:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
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


def set_scheduler_timesteps(scheduler, trained, num_inference_steps=None, timesteps=None, device=None):
    """The trained timesteps by default; a scheduler without custom timesteps (DDIM) gets the step count."""
    trained = list(trained)
    timesteps = list(timesteps) if timesteps is not None else None
    if timesteps is None and num_inference_steps in (None, len(trained)):
        timesteps = trained
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


class StepDistillSDPipeline(_TrainedStepsMixin, StableDiffusionPipeline):
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

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **self._defaults(kwargs))


class StepDistillSDXLPipeline(_TrainedStepsMixin, StableDiffusionXLPipeline):
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

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **self._defaults(kwargs))


class StepDistillSD3Pipeline(StableDiffusion3Pipeline):
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

    def __call__(self, *args, **kwargs):
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
