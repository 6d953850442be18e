"""Checks of a ``dataset`` setting that need no model: run before anything loads, so that a missing folder, an
unknown toy set, an empty prompt file or images that do not fit the teacher are one-line errors."""

from __future__ import annotations

import json
import os

from ..config import ConfigError, DataError

PROMPT_SUFFIXES = (".txt", ".jsonl")


def _has_images(folder: str) -> bool:
    from .folders import IMAGE_EXTENSIONS

    return any(
        e.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, e)) for e in os.listdir(folder)
    )


def _class_folders(root: str) -> list[str]:
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    return [e for e in entries if os.path.isdir(os.path.join(root, e))]


def dataset_kind(spec: str, key: str = "dataset") -> str:
    """ "digits", "toy2d", "prompts", "images", "stream" (tar shards, a saved datasets folder) or "latents" (a
    latent cache) for a valid ``dataset`` value; ConfigError / DataError naming the key and the value (or the
    file) otherwise."""
    if spec == "digits":
        return "digits"
    if spec.startswith("shards:"):
        from .shards import expand_shards

        expand_shards(spec[len("shards:") :], key)
        return "stream"
    if spec.startswith(("hf:", "latents:")):
        path = spec.split(":", 1)[1]
        if not os.path.isdir(path):
            raise ConfigError(f"{key}: folder {path!r} of {spec!r} does not exist")
        return "stream" if spec.startswith("hf:") else "latents"
    if spec.startswith("toy2d:"):
        from .toy2d import TOY2D_NAMES

        if spec[6:] not in TOY2D_NAMES:
            valid = ", ".join(f"toy2d:{n}" for n in TOY2D_NAMES)
            raise ConfigError(f"{key}: unknown toy 2-D distribution {spec[6:]!r}; valid: {valid}")
        return "toy2d"
    if not os.path.exists(spec):
        raise ConfigError(
            f"{key}: path {spec!r} does not exist (expected 'digits', 'toy2d:<name>', an image folder or a prompt file)"
        )
    if os.path.isfile(spec):
        if not spec.lower().endswith(PROMPT_SUFFIXES):
            raise ConfigError(f"{key}: {spec!r} is a file but not a prompt file (.txt / .jsonl) nor an image folder")
        from .folders import load_prompts

        load_prompts(spec)  # DataError for an empty or malformed file
        return "prompts"
    if _has_images(spec):
        return "images"
    classes = _class_folders(spec)
    if classes and all(_has_images(os.path.join(spec, d)) for d in classes):
        return "images"
    empty = next((d for d in classes if not _has_images(os.path.join(spec, d))), None)
    where = f"its class folder {os.path.join(spec, empty)!r} holds none" if empty else "it holds none"
    raise DataError(f"{key}: no images (.png, .jpg, .jpeg, .webp) in {spec!r}: {where}")


def _network_config(path: str) -> dict | None:
    for sub in ("unet", "transformer", ""):
        f = os.path.join(path, sub, "config.json")
        if os.path.isfile(f):
            with open(f) as fh:
                return json.load(fh)
    return None


def check_dataset_fits_teacher(spec: str, teacher_path: str, key: str = "dataset") -> None:
    """Compare a dataset with a local teacher folder's network config (read from config.json, nothing loads):
    toy 2-D points need a ToyMLP teacher, images a UNet / transformer teacher, and an RGB image folder a
    pixel-space teacher with 3 input channels (or a latent teacher with a VAE)."""
    kind = dataset_kind(spec, key)
    if not os.path.isdir(teacher_path):
        return
    cfg = _network_config(teacher_path)
    if cfg is None:
        return  # the loader reports a folder without a network config
    is_toy = cfg.get("_class_name") == "ToyMLP"
    if kind == "toy2d" and not is_toy:
        raise ConfigError(
            f"{key}: {spec!r} gives 2-D points, but the teacher {teacher_path!r} is a {cfg.get('_class_name')} on "
            "images; use a toy2d teacher (recipes/teacher/toy2d.yaml) or an image dataset"
        )
    if kind in ("digits", "images", "stream", "latents") and is_toy:
        raise ConfigError(
            f"{key}: {spec!r} gives images, but the teacher {teacher_path!r} is a ToyMLP on 2-D points; "
            "use dataset: toy2d:<name>"
        )
    has_vae = os.path.isdir(os.path.join(teacher_path, "vae"))
    channels = cfg.get("in_channels")
    if kind == "latents" and not has_vae:
        raise ConfigError(f"{key}: {spec!r} is a latent cache, but the teacher {teacher_path!r} has no VAE")
    if kind in ("images", "stream") and not has_vae and channels is not None and channels != 3:
        raise ConfigError(
            f"{key}: the images in {spec!r} are read as RGB (3 channels), but the teacher {teacher_path!r} takes "
            f"{channels}-channel images (in_channels={channels}, pixel space); use a dataset that fits it "
            "(e.g. 'digits' for the digits teacher)"
        )
    if kind == "digits" and not has_vae and channels is not None and channels != 1:
        raise ConfigError(
            f"{key}: 'digits' are 1-channel images, but the teacher {teacher_path!r} takes {channels} channels"
        )
