"""Intra-condition diversity of generated samples: many seeds, one condition (a class label or a prompt).

* :func:`mean_pairwise_distance`: the mean Euclidean distance between the features of every pair of samples
  (0 for identical samples); the diversity score of Gandikota & Bau 2025 (there with DreamSim / CLIP features,
  here with the feature net of FD-digits or Inception);
* :func:`vendi_score`: the Vendi score (Friedman & Dieng 2023), exp of the Shannon entropy of the eigenvalues
  of K / n with the cosine-similarity kernel K_ij = <f_i, f_j> / (|f_i| |f_j|): the effective number of distinct
  samples, 1 for identical samples, n for n mutually orthogonal features;
* :func:`grouped_diversity`: both per group (class / prompt) and their means over the groups.
"""

from __future__ import annotations

import math

import torch


def _features(x) -> torch.Tensor:
    f = torch.as_tensor(x).double()
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"diversity needs features of shape (N >= 2, D), got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError("features contain NaN or inf values")
    return f


def mean_pairwise_distance(features) -> float:
    """Mean of |f_i - f_j| over the n (n - 1) / 2 pairs i < j."""
    f = _features(features)
    n = f.shape[0]
    d = torch.cdist(f, f)
    return float(d.triu(diagonal=1).sum() / (n * (n - 1) / 2))


def vendi_score(features) -> float:
    """exp(-sum_i l_i log l_i), l the eigenvalues of K / n, K the cosine-similarity matrix (K_ii = 1).
    A zero feature vector (e.g. ReLU features of a blank image) has no direction: zero vectors count as one
    direction of their own (similarity 1 among themselves, 0 with the others)."""
    f = _features(features)
    zero = (f.norm(dim=1, keepdim=True) == 0).double()
    f = torch.cat([f, zero], dim=1)
    u = f / f.norm(dim=1, keepdim=True)
    lam = torch.linalg.eigvalsh(u @ u.T / f.shape[0]).clamp_min(0)
    lam = lam[lam > 1e-12]
    return float(math.exp(-(lam * lam.log()).sum()))


def grouped_diversity(features, groups) -> dict:
    """Diversity within each group (e.g. the class label of each sample): ``{"per_group": {g: {"n",
    "pairwise_distance", "vendi"}}, "mean_pairwise_distance", "mean_vendi"}``; groups of one sample are
    skipped (no pair)."""
    f = _features(features)
    groups = torch.as_tensor(groups).reshape(-1)
    if len(groups) != len(f):
        raise ValueError(f"{len(groups)} group labels for {len(f)} feature rows")
    per = {}
    for g in torch.unique(groups).tolist():
        rows = f[groups == g]
        if len(rows) >= 2:
            per[g] = {"n": len(rows), "pairwise_distance": mean_pairwise_distance(rows), "vendi": vendi_score(rows)}
    if not per:
        raise ValueError("no group has two samples: diversity needs several samples per condition")
    return {
        "per_group": per,
        "mean_pairwise_distance": sum(v["pairwise_distance"] for v in per.values()) / len(per),
        "mean_vendi": sum(v["vendi"] for v in per.values()) / len(per),
    }
