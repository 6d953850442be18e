"""Classifier-free guidance with one named convention, and the guidance-scale embedding.

stepdistill's convention (Ho & Salimans 2022, as diffusers pipelines use it):

    out = out_uncond + w * (out_cond - out_uncond)          (``CFG_UNCOND``; w = 1 is plain conditional)

LCM's training scripts and the Imagen paper use ``out_cond + w * (out_cond - out_uncond)``, which is the same
thing at w + 1; :func:`to_convention` converts a scale between the two so that recipes can quote papers.
Guidance is linear and its weights sum to one, so it can be applied to any prediction type (eps, x0, v,
flow) at a fixed (x_t, t) with the same result after conversion.
"""

from __future__ import annotations

import math

import torch

CFG_UNCOND = "uncond+w"  # out_u + w (out_c - out_u)   (diffusers, DMD2, SwiftBrush)
CFG_COND = "cond+w"  # out_c + w (out_c - out_u)       (LCM scripts, Imagen "w")
CONVENTIONS = (CFG_UNCOND, CFG_COND)


def check_guidance_scale(w) -> None:
    wt = torch.as_tensor(w, dtype=torch.float64)
    if not torch.isfinite(wt).all():
        raise ValueError(f"guidance scale must be finite, got {w}")


def to_convention(w: float, src: str, dst: str) -> float:
    """Express guidance scale ``w`` given in convention ``src`` in convention ``dst``."""
    for c in (src, dst):
        if c not in CONVENTIONS:
            raise ValueError(f"unknown CFG convention {c!r}; expected one of {CONVENTIONS}")
    if src == dst:
        return w
    return w + 1 if src == CFG_COND else w - 1


def cfg_combine(out_cond: torch.Tensor, out_uncond: torch.Tensor, w, convention: str = CFG_UNCOND):
    """Combine conditional and unconditional outputs; ``w`` is a float or a per-sample tensor (B,)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown CFG convention {convention!r}; expected one of {CONVENTIONS}")
    check_guidance_scale(w)
    w = torch.as_tensor(w, device=out_cond.device, dtype=out_cond.dtype)
    if w.ndim == 1:
        w = w.reshape(-1, *([1] * (out_cond.ndim - 1)))
    if convention == CFG_UNCOND:
        return out_uncond + w * (out_cond - out_uncond)
    return out_cond + w * (out_cond - out_uncond)


def guidance_scale_embedding(w: torch.Tensor, dim: int = 256, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale (VDM / LCM w-conditioning), fed as ``timestep_cond``.

    Frequencies exp(-ln(10000) k / (dim/2 - 1)), k = 0..dim/2-1, applied to ``scale * w``; output
    [sin | cos] of shape (B, dim) (zero-padded when dim is odd). Meng et al. 2023 / Luo et al. 2023 (LCM)."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1) * scale
    half = dim // 2
    if half < 2:
        raise ValueError(f"guidance embedding dim must be >= 4, got {dim}")
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = w[:, None] * freqs[None, :].to(w.device)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
