"""Datasets: bundled digits, toy 2-D distributions, image folders and prompt files."""

from .digits import DEFAULT_RESOLUTION, NUM_CLASSES, DigitsDataset, load_digits_tensors
from .folders import ImageFolderDataset, load_prompts
from .toy2d import (
    TOY2D_NAMES,
    Toy2DDataset,
    gmm_centers,
    mode_coverage,
    sample_toy2d,
    sliced_wasserstein,
)

__all__ = [
    "DEFAULT_RESOLUTION",
    "NUM_CLASSES",
    "TOY2D_NAMES",
    "DigitsDataset",
    "ImageFolderDataset",
    "Toy2DDataset",
    "gmm_centers",
    "load_digits_tensors",
    "load_prompts",
    "mode_coverage",
    "sample_toy2d",
    "sliced_wasserstein",
]
