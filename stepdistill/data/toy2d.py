"""Toy 2-D distributions (Gaussian mixtures, checkerboard, two moons) and metrics for them.

Used by the unit tests and the toy recipes: distillation on these sets trains in seconds on a CPU, and
mode dropping (a classic failure of few-step generators) is directly measurable with ``mode_coverage``.
All sets live roughly in [-2, 2]^2.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

TOY2D_NAMES = ("gmm8", "gmm25", "checkerboard", "two_moons")
GMM_STD = {"gmm8": 0.1, "gmm25": 0.05}
GMM_RADIUS = {"gmm8": 0.5, "gmm25": 0.25}  # default hit radius of mode_coverage (5 std)


def _check_name(name: str, valid=TOY2D_NAMES) -> None:
    if name not in valid:
        raise ValueError(f"unknown toy 2-D distribution {name!r}; valid names: {', '.join(valid)}")


def gmm_centers(name: str = "gmm8") -> torch.Tensor:
    """Mode centres ``(K, 2)``: "gmm8" = 8 points on a circle of radius 2, "gmm25" = 5x5 grid on {-2..2}."""
    _check_name(name, tuple(GMM_STD))
    if name == "gmm8":
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        return (2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)).float()
    grid = torch.arange(-2.0, 3.0)
    return torch.cartesian_prod(grid, grid)


def sample_toy2d(name: str, n: int, generator: torch.Generator | None = None):
    """Draw ``n`` samples of a toy distribution.

    Returns:
        x: float32 ``(n, 2)``; labels: int64 ``(n,)`` (mixture component, occupied checkerboard cell
        0..7, or moon 0/1).
    """
    _check_name(name)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of samples must be a positive int, got {n!r}")
    if name in GMM_STD:
        centers = gmm_centers(name)
        labels = torch.randint(len(centers), (n,), generator=generator)
        return centers[labels] + GMM_STD[name] * torch.randn(n, 2, generator=generator), labels
    if name == "checkerboard":
        # 4x4 board of unit cells on [-2, 2]^2; the 8 cells with even (row + col) are occupied.
        cells = torch.tensor([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], dtype=torch.float32)
        labels = torch.randint(len(cells), (n,), generator=generator)
        return cells[labels] - 2.0 + torch.rand(n, 2, generator=generator), labels
    from sklearn.datasets import make_moons

    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    x, labels = make_moons(n_samples=n, noise=0.05, random_state=seed)
    # make_moons spans about [-1, 2] x [-0.5, 1]; centre it and scale to about [-2, 2] x [-1, 1].
    x = (torch.from_numpy(x).float() - torch.tensor([0.5, 0.25])) * (4.0 / 3.0)
    return x, torch.from_numpy(labels).long()


class Toy2DDataset(Dataset):
    """``n`` precomputed samples of a toy distribution as ``{"x": (2,) float32, "label": int64 scalar}``."""

    def __init__(self, name: str, n: int, seed: int = 0):
        self.name = name
        self.x, self.labels = sample_toy2d(name, n, torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "label": self.labels[i]}


def mode_coverage(samples: torch.Tensor, name: str, radius: float | None = None):
    """Fraction of mixture modes hit by ``samples`` (N, 2), and the number of samples near each mode.

    A mode is hit when at least one sample lies within ``radius`` of its centre (default 0.5 for
    "gmm8", 0.25 for "gmm25": 5 std, and less than half the distance between neighbouring modes).

    Returns:
        ``(fraction, counts)`` with ``counts`` int64 ``(K,)``.
    """
    _check_name(name, tuple(GMM_STD))
    if samples.dim() != 2 or samples.shape[1] != 2:
        raise ValueError(f"samples must have shape (N, 2), got {tuple(samples.shape)}")
    radius = GMM_RADIUS[name] if radius is None else radius
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius!r}")
    dist = torch.cdist(gmm_centers(name).double(), samples.detach().double().cpu())
    counts = (dist <= radius).sum(dim=1)
    return (counts > 0).float().mean().item(), counts


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced Wasserstein-2 distance between point clouds ``a`` (N, D) and ``b`` (M, D).

    Both clouds are projected on ``n_proj`` random unit directions; in each direction the 1-D W2 is the
    L2 distance between sorted projections (N == M) or between quantiles at the common levels
    ``(i + 0.5) / max(N, M)`` (N != M). Returns ``sqrt(mean over directions of W2^2)``. 1-D inputs
    ``(N,)`` are treated as ``(N, 1)``. Reuse a seeded ``generator`` to compare runs on equal directions.
    """
    a, b = (t.detach().reshape(-1, 1) if t.dim() == 1 else t.detach() for t in (a, b))
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or len(a) == 0 or len(b) == 0:
        raise ValueError(f"expected non-empty point clouds (N, D) and (M, D), got {tuple(a.shape)}, {tuple(b.shape)}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    dirs = torch.randn(n_proj, a.shape[1], generator=generator, dtype=torch.float64).to(a.device, dtype)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa, pb = a.to(dtype) @ dirs.T, b.to(a.device, dtype) @ dirs.T  # (N, P), (M, P)
    if len(pa) == len(pb):
        qa, qb = pa.sort(dim=0).values, pb.sort(dim=0).values
    else:
        k = max(len(pa), len(pb))
        levels = (torch.arange(k, dtype=dtype, device=a.device) + 0.5) / k
        qa, qb = torch.quantile(pa, levels, dim=0), torch.quantile(pb, levels, dim=0)
    return (qa - qb).square().mean().sqrt().item()
