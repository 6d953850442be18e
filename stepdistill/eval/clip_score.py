"""CLIP score through open_clip, with weights from a local checkpoint file.

Conventions (several are in use, so both common ones are reported, labelled):

* ``clip_cosine``: the plain mean cosine similarity between image and caption embeddings (DMD2's COCO
  evaluator reports this one: no x100, no clamp, no logit scale);
* ``clip_score_100``: ``max(100 * mean cosine, 0)``, the convention of torchmetrics' ``CLIPScore`` (x100, the
  mean clamped at 0). jmhessel's CLIPScore (2.5 * max(cos, 0)) is a third scale, not reported.

Images: (N, C, H, W) floats in [-1, 1] or uint8 in [0, 255] (or PIL images). Floats are quantised with
rounding (``stepdistill.utils.to_uint8``), each image is turned into a PIL RGB image and passed through
open_clip's own inference transform for the model (``create_model_and_transforms``'s ``preprocess_val``:
resize of the shortest side with bicubic interpolation, centre crop, ToTensor, normalisation with the
model's mean/std), so images are seen exactly as open_clip's documented PIL path would see them.

Text: open_clip's tokenizer for the model (``open_clip.get_tokenizer``; for the OpenAI-style configs the
``SimpleTokenizer`` with its BPE vocabulary bundled in the package, truncating to the context length).
An optional ``text_prefix`` is prepended to every caption (DMD2 uses "A photo depicts "; default none).

Weights: ``pretrained`` is a local checkpoint file (e.g. ``open_clip_pytorch_model.bin`` or
``open_clip_model.safetensors`` of the hub repository of the model), or, with ``allow_download=True``
(``--allow-download``), an open_clip pretrained tag for the model (open_clip then loads it from its cache or
downloads it). No weights (None) is refused: open_clip would build a model with random weights, whose score
means nothing. A path that does not exist is a FileNotFoundError naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..utils import to_uint8


def _to_pil_list(images) -> list:
    from PIL import Image

    if isinstance(images, (list, tuple)) and all(isinstance(im, Image.Image) for im in images):
        return [im.convert("RGB") for im in images]
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] not in (1, 3):
        got = getattr(images, "shape", type(images))
        raise ValueError(f"expected images (N, 1 or 3, H, W) or PIL images, got {got}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise ValueError(f"expected uint8 images or floats in [-1, 1], got dtype {images.dtype}")
        images = to_uint8(images)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB") for a in arr]


def check_clip_weights(model_name: str, pretrained, allow_download: bool = False) -> str:
    """The checked ``pretrained`` value (a local file's expanded path, or an allowed tag); a ConfigError or a
    FileNotFoundError naming the value otherwise. Imports open_clip; loads no model."""
    import open_clip

    from ..config import ConfigError

    if model_name not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
    if pretrained is None:
        raise ConfigError(
            f"CLIP model {model_name!r} without pretrained weights (--clip-pretrained / clip_pretrained): open_clip "
            "would score with random weights; pass a local open_clip checkpoint file"
        )
    pretrained = str(pretrained)
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser())
    if pretrained in tags:
        if not allow_download:
            raise ConfigError(
                f"--clip-pretrained {pretrained!r} is an open_clip pretrained tag of {model_name}, which open_clip "
                "downloads: pass --allow-download (allow_download=True) to allow it, or a local checkpoint file"
            )
        return pretrained
    raise FileNotFoundError(
        f"CLIP checkpoint not found: {pretrained} (expected a local open_clip checkpoint file for "
        f"{model_name}, e.g. open_clip_pytorch_model.bin or open_clip_model.safetensors from its hub "
        f"repository, or, with --allow-download, one of the pretrained tags {tags})"
    )


class CLIPScorer:
    """CLIP score of (image, caption) pairs with an open_clip model.

    Args:
        model_name: an open_clip architecture name (``open_clip.list_models()``), e.g. "ViT-g-14".
        pretrained: local checkpoint file, or (with ``allow_download``) an open_clip pretrained tag.
        device: where the model runs.
        batch_size: pairs per forward pass.
        text_prefix: prepended to every caption.
        allow_download: let a pretrained tag download its weights.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        text_prefix: str = "",
        allow_download: bool = False,
    ):
        import open_clip

        pretrained = check_clip_weights(model_name, pretrained, allow_download)
        self.model_name, self.pretrained = model_name, pretrained
        self.device = torch.device(device)
        self.batch_size, self.text_prefix = int(batch_size), text_prefix
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=self.device
        )
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """L2-normalised image embeddings (N, E), float32 on the CPU."""
        pils = _to_pil_list(images)
        out = []
        for s in range(0, len(pils), self.batch_size):
            x = torch.stack([self.preprocess(im) for im in pils[s : s + self.batch_size]]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    @torch.no_grad()
    def text_embeddings(self, texts) -> torch.Tensor:
        """L2-normalised caption embeddings (N, E), float32 on the CPU."""
        texts = [self.text_prefix + str(t) for t in texts]
        out = []
        for s in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[s : s + self.batch_size]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def cosines(self, images, texts) -> torch.Tensor:
        """Per-pair cosine similarity (N,) float64 of images[i] and texts[i]."""
        texts = list(texts)
        n_images = len(images)
        if n_images != len(texts):
            raise ValueError(f"got {n_images} images but {len(texts)} captions")
        if n_images == 0:
            raise ValueError("no images to score")
        return (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1).double()

    def score(self, images, texts) -> dict:
        """``{"clip_cosine": mean cosine, "clip_score_100": max(100 * mean cosine, 0), "per_sample": [...],
        "num_samples": N}``."""
        return summarize_cosines(self.cosines(images, texts))


def summarize_cosines(cosines) -> dict:
    """The labelled CLIP score conventions of per-sample cosines."""
    c = np.asarray(torch.as_tensor(cosines, dtype=torch.float64).cpu(), dtype=np.float64).reshape(-1)
    mean = float(c.mean())
    return {
        "clip_cosine": mean,
        "clip_score_100": max(100.0 * mean, 0.0),
        "per_sample": c.tolist(),
        "num_samples": int(c.size),
    }
