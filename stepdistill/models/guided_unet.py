"""``GuidedUNet2DModel``: diffusers' UNet2DModel with a guidance-scale input (w-conditioning).

UNet2DConditionModel takes the guidance embedding natively (``time_cond_proj_dim`` / ``timestep_cond``);
UNet2DModel (pixel-space class-conditional teachers such as the bundled digits model) does not. This
subclass adds the same mechanism: ``timestep_cond`` (the sinusoidal embedding of w, see
:func:`stepdistill.guidance.guidance_scale_embedding`) is projected by a bias-free linear layer onto the
sinusoidal time features before the time MLP, as ``TimestepEmbedding(cond_proj_dim=...)`` does. The
projection starts at zero, so a student made from a teacher's weights starts as that teacher exactly.
Without ``timestep_cond`` the projection is skipped: the network is its base UNet2DModel (how a frozen teacher
that shares these weights with a guided LoRA student runs).
"""

from __future__ import annotations

import inspect

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding

# An exported pipeline names this component ["stepdistill.models.guided_unet", "GuidedUNet2DModel"]; diffusers
# picks the load method of a component from another library by finding the diffusers base classes in that
# library's module, hence ModelMixin is part of this module's namespace.
__all__ = ["GuidedUNet2DModel", "ModelMixin"]


class GuidedUNet2DModel(UNet2DModel):
    """UNet2DModel + ``timestep_cond`` (B, time_cond_proj_dim): a w-conditioned student (guided distillation,
    LCM). Build it from a teacher with :meth:`from_unet`; it saves and loads like any diffusers model."""

    def _init(self, time_cond_proj_dim: int = 256, **kwargs):
        super().__init__(**kwargs)
        old = self.time_embedding
        self.time_embedding = TimestepEmbedding(
            old.linear_1.in_features, old.linear_2.out_features, cond_proj_dim=time_cond_proj_dim
        )
        torch.nn.init.zeros_(self.time_embedding.cond_proj.weight)

    # diffusers reads a model's config keys from its __init__ signature: UNet2DModel's keys + ours
    _init.__signature__ = inspect.Signature(
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("time_cond_proj_dim", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=256),
        ]
        + [p for n, p in inspect.signature(UNet2DModel.__init__).parameters.items() if n != "self"]
    )
    __init__ = register_to_config(_init)
    del _init

    @classmethod
    def from_unet(cls, unet: UNet2DModel, time_cond_proj_dim: int = 256) -> GuidedUNet2DModel:
        """A w-conditioned copy of ``unet`` (same weights; the new projection is zero)."""
        cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        model = cls(time_cond_proj_dim=time_cond_proj_dim, **cfg)
        missing, unexpected = model.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
            raise RuntimeError(f"weights do not transfer: missing {missing}, unexpected {unexpected}")
        model.to(unet.device)
        return model if model.dtype == unet.dtype else model.to(unet.dtype)

    def forward(self, sample, timestep, class_labels=None, timestep_cond=None, return_dict: bool = True):
        if timestep_cond is None:  # no guidance input: the base UNet2DModel (a teacher sharing these weights)
            return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)
        cond = timestep_cond.to(device=sample.device, dtype=self.dtype)
        if cond.shape != (sample.shape[0], self.config.time_cond_proj_dim):
            raise ValueError(
                f"timestep_cond has shape {tuple(cond.shape)}, expected ({sample.shape[0]}, "
                f"{self.config.time_cond_proj_dim})"
            )

        def add_condition(module, args, kwargs):
            return args, {**kwargs, "condition": cond}

        handle = self.time_embedding.register_forward_pre_hook(add_condition, with_kwargs=True)
        try:
            return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)
        finally:
            handle.remove()
