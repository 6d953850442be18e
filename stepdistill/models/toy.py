"""A small MLP denoiser for 2-D toy distributions (tests and the toy recipes). It is a diffusers
``ModelMixin``, so it saves and loads like any diffusers network, and it is called as a plain
``model(x_t, timestep, cond)`` callable (cond: optional class labels)."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ToyMLP(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        dim: int = 2,
        hidden: int = 128,
        layers: int = 3,
        time_dim: int = 32,
        num_class_embeds: int | None = None,
        time_scale: float = 1000.0,
        time_cond_proj_dim: int | None = None,
    ):
        super().__init__()
        self.time_proj = nn.Linear(time_dim, hidden)
        # a second time / guidance input (``timestep_cond``), projected onto the time features, zero-initialised
        self.cond_proj = nn.Linear(time_cond_proj_dim, time_dim, bias=False) if time_cond_proj_dim else None
        if self.cond_proj is not None:
            nn.init.zeros_(self.cond_proj.weight)
        self.class_embed = nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(layers))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def _time_embedding(self, timestep: torch.Tensor) -> torch.Tensor:
        half = self.config.time_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timestep.device) / half)
        args = (timestep.float().reshape(-1, 1) / self.config.time_scale * 1000.0) * freqs
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    def forward(self, x: torch.Tensor, timestep, cond=None, timestep_cond=None) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=x.device).expand(x.shape[0])
        temb = self._time_embedding(timestep)
        if self.cond_proj is not None:
            if timestep_cond is None:
                raise ValueError(f"this ToyMLP needs timestep_cond (B, {self.config.time_cond_proj_dim})")
            temb = temb + self.cond_proj(timestep_cond.to(temb.dtype))
        h = self.inp(x) + self.time_proj(temb)
        if self.class_embed is not None and cond is not None:
            h = h + self.class_embed(cond)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
