"""Small shared helpers (image grids, atomic writes)."""

from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, C, H, W) -> uint8 with rounding (EDM convention: (x + 1) * 127.5 + 0.5, clamped)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1):
    """(N, C, H, W) in [-1, 1] -> PIL image grid."""
    from PIL import Image

    x = to_uint8(images).cpu()
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(round(n**0.5)))
    ncol = (n + nrow - 1) // nrow
    grid = torch.zeros(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if c == 1 else arr)


def save_image_grid(images: torch.Tensor, path: str, nrow: int | None = None, scale: int = 1) -> str:
    img = image_grid(images, nrow)
    if scale > 1:
        from PIL import Image

        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    from .io import atomic_write

    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def write_json(obj, path: str) -> None:
    from . import io

    io.write_json(path, obj)
