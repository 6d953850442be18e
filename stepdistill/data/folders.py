"""Images-with-captions folders and prompt files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SOURCES = ("auto", "txt", "metadata", "none")
PROMPT_KEYS = ("prompt", "text", "caption")


def _read_jsonl(path: Path):
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


class ImageFolderDataset(Dataset):
    """The images directly under ``root`` (sorted by name), as ``{"image": (3, R, R), "caption": str}``.

    Images are converted to RGB and scaled to [-1, 1]. With ``center_crop`` the shortest side is resized
    to ``resolution`` (PIL bicubic) and the centre square is cropped; otherwise the image is resized to
    ``resolution`` x ``resolution`` directly (aspect ratio not kept).

    Captions (``caption_source``): "metadata" reads ``root/metadata.jsonl`` (lines
    ``{"file_name": ..., "text": ...}``), "txt" reads a sibling ``<stem>.txt``, "auto" uses the metadata
    entry when there is one and the ``.txt`` file otherwise, "none" gives no captions. A missing caption
    is "".

    An image file that cannot be decoded (truncated, corrupt) is a ``DataError`` naming it when it is read; with
    ``skip_unreadable`` every file is decoded once here and the unreadable ones are left out (``self.skipped``
    lists them).
    """

    def __init__(
        self,
        root,
        resolution: int,
        center_crop: bool = True,
        caption_source: str = "auto",
        skip_unreadable: bool = False,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if caption_source not in CAPTION_SOURCES:
            raise ValueError(f"unknown caption_source {caption_source!r}; expected one of {CAPTION_SOURCES}")
        self.resolution, self.center_crop = resolution, center_crop
        self.files = sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.root}")
        self.skipped: list[Path] = []
        if skip_unreadable:
            readable = []
            for path in self.files:
                try:
                    self._load(path)
                    readable.append(path)
                except DataError:
                    self.skipped.append(path)
            if not readable:
                raise DataError(f"no readable image in {self.root} ({len(self.skipped)} unreadable)")
            self.files = readable
        metadata = {}
        if caption_source in ("auto", "metadata") and (self.root / "metadata.jsonl").is_file():
            for lineno, obj in _read_jsonl(self.root / "metadata.jsonl"):
                if not isinstance(obj, dict) or "file_name" not in obj:
                    raise DataError(f"{self.root / 'metadata.jsonl'}:{lineno}: expected an object with 'file_name'")
                metadata[Path(str(obj["file_name"])).as_posix()] = str(obj.get("text", ""))
        self.captions = []
        for path in self.files:
            caption = metadata.get(path.name)
            txt = path.with_suffix(".txt")
            if caption is None and caption_source in ("auto", "txt") and txt.is_file():
                caption = txt.read_text(encoding="utf-8").strip()
            self.captions.append(caption or "")

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> torch.Tensor:
        try:
            return decode_image(path, self.resolution, self.center_crop)
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated files
            raise DataError(
                f"cannot read image {path} ({e}); fix or remove it, or skip unreadable images "
                "(skip_unreadable_images: true)"
            ) from e

    def __getitem__(self, i: int) -> dict:
        return {"image": self._load(self.files[i]), "caption": self.captions[i]}


def decode_image(source, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """An image (a path, encoded bytes or a PIL image) as an RGB (3, R, R) tensor in [-1, 1]: with ``center_crop``
    the shortest side is resized to ``resolution`` (PIL bicubic) and the centre square cropped, otherwise the image
    is resized to R x R. PIL's errors (OSError, ValueError, SyntaxError) propagate."""
    r = resolution
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    if isinstance(source, Image.Image):
        img = source.convert("RGB")
    else:
        with Image.open(source) as img:
            img = img.convert("RGB")
    if center_crop:
        scale = r / min(img.size)
        w, h = max(r, round(img.width * scale)), max(r, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - r) // 2, (h - r) // 2
        img = img.crop((left, top, left + r, top + r))
    else:
        img = img.resize((r, r), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def load_prompts(path) -> list[str]:
    """Read prompts from a ``.txt`` file (one per non-blank line, stripped) or a ``.jsonl`` file (one
    object per line with a "prompt", "text" or "caption" key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".jsonl":
        prompts = []
        for lineno, obj in _read_jsonl(path):
            key = next((k for k in PROMPT_KEYS if isinstance(obj, dict) and k in obj), None)
            if key is None:
                raise DataError(f"{path}:{lineno}: expected an object with one of the keys {PROMPT_KEYS}")
            prompts.append(str(obj[key]).strip())
    else:
        raise DataError(f"unsupported prompt file type {path.suffix!r} for {path}; expected .txt or .jsonl")
    if not prompts:
        raise DataError(f"empty prompt file (no non-blank line): {path}")
    return prompts
