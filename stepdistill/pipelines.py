"""diffusers pipelines for distilled generators: a plain call samples with the trained timesteps.

diffusers' stock pipelines default to 50 steps and CFG 7.5, which is wrong for a one- or few-step student.
These subclasses store the trained timesteps in the pipeline config (``model_index.json``) and use them,
with guidance off, unless the caller says otherwise. ``import stepdistill`` registers them with diffusers,
so ``DiffusionPipeline.from_pretrained(folder)`` finds them. The model card of every exported folder also
gives the call that works with stock diffusers classes alone.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class StepDistillClassPipeline(DiffusionPipeline):
    """Class-conditional (or unconditional) pixel-space generator: ``pipe(class_labels=[3, 1, 4])``.

    Components: ``unet`` (UNet2DModel) and ``scheduler`` (LCMScheduler: x0 prediction, then fresh noise
    to the next trained timestep)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, trained_timesteps=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(trained_timesteps=list(trained_timesteps or [scheduler.config.num_train_timesteps - 1]))

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        num_images: int | None = None,
        generator=None,
        num_inference_steps: int | None = None,
        timesteps=None,
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
        timesteps = list(timesteps or self.config.trained_timesteps)
        if num_inference_steps is not None and num_inference_steps != len(timesteps):
            timesteps = None
        self.scheduler.set_timesteps(
            num_inference_steps=None if timesteps else num_inference_steps, timesteps=timesteps, device=self.device
        )
        size = self.unet.config.sample_size
        shape = (num_images, self.unet.config.in_channels, size, size)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        kwargs = {"class_labels": labels.to(self.device)} if labels is not None else {}
        for t in self.progress_bar(self.scheduler.timesteps):
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


class _TrainedStepsMixin:
    """Defaults for text-to-image students: trained timesteps, guidance off."""

    def _defaults(self, kwargs):
        trained = list(self.config.trained_timesteps)
        if kwargs.get("timesteps") is None and kwargs.get("num_inference_steps") in (None, len(trained)):
            kwargs["timesteps"] = trained
            kwargs["num_inference_steps"] = len(trained)
        kwargs.setdefault("guidance_scale", 0.0)
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
        self.register_to_config(trained_timesteps=list(trained_timesteps or [999]))

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
        self.register_to_config(trained_timesteps=list(trained_timesteps or [999]))

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **self._defaults(kwargs))


PIPELINES = (StepDistillClassPipeline, StepDistillSDPipeline, StepDistillSDXLPipeline)


def register_with_diffusers() -> None:
    """Make ``DiffusionPipeline.from_pretrained`` resolve our pipeline classes by name."""
    import diffusers

    for cls in PIPELINES:
        if getattr(diffusers, cls.__name__, None) is not cls:
            setattr(diffusers, cls.__name__, cls)
