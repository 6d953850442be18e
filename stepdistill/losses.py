"""Shared pure loss functions. Each takes tensors and returns a tensor; method files compose them."""

from __future__ import annotations

import torch


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising score matching loss (Ho et al. 2020, eq. 14; Vincent 2011): mean over all elements of
    w * (pred - target)^2, with an optional per-sample weight w of shape (B,)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    err = (pred.float() - target.float()) ** 2
    if weight is None:
        return err.mean()
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    return (weight.to(per_sample) * per_sample).mean()
