"""Improved precision and recall (Kynkaanniemi et al., 2019) in a given feature space, in pure torch.

Each set's support is estimated as the union of balls around its samples, the radius of a sample's ball
being the distance to its k-th nearest neighbour within the same set (the sample itself excluded; k = 3
by default, as in the paper and torch-fidelity's ``prc_neighborhood``).

* precision = fraction of generated samples inside the reference support (are the samples realistic?);
* recall    = fraction of reference samples inside the generated support (is the variety covered?).

A point on a ball's boundary counts as inside. Distances are Euclidean, computed with ``torch.cdist`` in
row chunks so that memory stays at ``chunk_size x N`` distances. The paper uses VGG16 fc2 features;
``stepdistill eval`` uses the same Inception pool3 features as FID/KID, so compare values only between
runs that use the same feature space.
"""

from __future__ import annotations

import torch


def _as_features(x, what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"{what} features must have shape (N, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} features contain NaN or inf values")
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def knn_radii(features, k: int = 3, chunk_size: int = 1024) -> torch.Tensor:
    """Distance (N,) from each sample to its k-th nearest other sample of the same set."""
    f = _as_features(features, "")
    n = f.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if n < k + 1:
        raise ValueError(f"k-NN radii with k={k} need at least {k + 1} samples, got {n}")
    radii = []
    for start in range(0, n, chunk_size):
        d = torch.cdist(f[start : start + chunk_size], f)
        # the k+1 smallest distances include the sample itself (distance 0, or the smallest for duplicates)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Boolean (M,): query m lies within radii[i] of some support point i."""
    inside = []
    for start in range(0, queries.shape[0], chunk_size):
        d = torch.cdist(queries[start : start + chunk_size], support)
        inside.append((d <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside)


def precision_recall(real_features, fake_features, k: int = 3, chunk_size: int = 1024) -> dict:
    """Improved precision and recall of generated features (M, D) against reference features (N, D).

    Returns ``{"precision": float, "recall": float, "k": k}``."""
    real = _as_features(real_features, "reference")
    fake = _as_features(fake_features, "generated")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: reference {real.shape[1]}, generated {fake.shape[1]}")
    dtype = torch.promote_types(real.dtype, fake.dtype)
    real, fake = real.to(dtype), fake.to(real.device, dtype)
    real_radii = knn_radii(real, k, chunk_size)
    fake_radii = knn_radii(fake, k, chunk_size)
    precision = _coverage(fake, real, real_radii, chunk_size).double().mean().item()
    recall = _coverage(real, fake, fake_radii, chunk_size).double().mean().item()
    return {"precision": precision, "recall": recall, "k": k}
