"""scikit-learn's bundled handwritten digits as a small diffusion dataset.

``sklearn.datasets.load_digits`` ships 1,797 grey-scale 8x8 digits (values 0..16) inside the
scikit-learn wheel, so it needs no download and makes a good default dataset for recipes and tests.

Images are mapped to [-1, 1] (``x / 16 * 2 - 1``) and bilinearly upsampled. The default resolution is
16x16: 8x8 is too coarse for a UNet with two downsamplings (its bottleneck would be 2x2), while 16x16
keeps the 4x4 bottleneck meaningful and CPU training fast.

The train/test split is fixed and stratified by class (``train_test_split`` with ``test_size=0.25``,
``random_state=0``), giving 1,347 training and 450 held-out images; "all" keeps the original order.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NUM_CLASSES = 10
DEFAULT_RESOLUTION = 16
SPLITS = ("train", "test", "all")


def _check_args(split: str, resolution: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"digits resolution must be an int >= 8, got {resolution!r}")


@lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    """Sorted sample indices of each split (the split itself is shuffled but fixed by random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=0.25, random_state=0, stratify=labels)
    return {"train": np.sort(train), "test": np.sort(test), "all": idx}


@lru_cache(maxsize=16)
def _digits_cached(split: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached (images, labels) for one split and resolution. Shared: callers must not modify them."""
    from sklearn.datasets import load_digits

    data = load_digits()
    idx = _split_indices()[split]
    images = torch.from_numpy(data.images[idx]).float().unsqueeze(1) / 16.0 * 2.0 - 1.0
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(data.target[idx]).long()
    return images.contiguous(), labels


def load_digits_tensors(split: str = "train", resolution: int = DEFAULT_RESOLUTION):
    """Return ``(images, labels)`` of a digits split.

    Args:
        split: "train", "test" or "all".
        resolution: output side length (int >= 8); 8 keeps the native images.

    Returns:
        images: float32 ``(N, 1, R, R)`` in [-1, 1]; labels: int64 ``(N,)``. Both are fresh copies.
    """
    _check_args(split, resolution)
    images, labels = _digits_cached(split, resolution)
    return images.clone(), labels.clone()


class DigitsDataset(Dataset):
    """Digits as a torch Dataset of ``{"image": (1, R, R) float32 in [-1, 1], "label": int64 scalar}``."""

    def __init__(self, split: str = "train", resolution: int = DEFAULT_RESOLUTION):
        _check_args(split, resolution)
        self.split, self.resolution = split, resolution
        self.images, self.labels = _digits_cached(split, resolution)  # shared cache: items are copies

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i].clone(), "label": self.labels[i].clone()}
