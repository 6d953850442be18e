"""FD-digits of a class-conditional digits model at several DDIM step counts (the teacher's figures)."""

from __future__ import annotations

import time

import torch

from ..models.conditioning import ClassConditioner
from ..sampling import sample
from .fd_digits import FDDigits


@torch.no_grad()
def sample_digits(
    model, num_samples: int, steps: int, *, guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 250
) -> torch.Tensor:
    """``num_samples`` digits, labels 0..9 in turn, from ``model`` (a Teacher) with DDIM (trailing)."""
    net = model.net
    cond_of = ClassConditioner.for_unet2d(net)
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        labels = torch.arange(start, start + n) % 10
        noise = torch.randn((n, *shape), generator=g)
        cond = cond_of(labels)
        out.append(
            sample(
                lambda x, t, cond=cond: model.raw(x, t, cond, guidance_scale),
                model.schedule,
                noise,
                steps,
                pred_type=model.prediction_type,
            )
        )
    return torch.cat(out)


def teacher_fd_report(
    model, steps=(1, 4, 10, 25, 50), num_samples: int = 1000, guidance_scale: float = 1.0, seed: int = 0
) -> dict:
    metric = FDDigits()
    rows = []
    for n in steps:
        t0 = time.perf_counter()
        x = sample_digits(model, num_samples, n, guidance_scale=guidance_scale, seed=seed)
        seconds = time.perf_counter() - t0
        rows.append({"steps": n, "fd_digits": metric.score(x), "sample_seconds": round(seconds, 3)})
    return {
        "metric": "FD-digits vs held-out test digits",
        "num_samples": num_samples,
        "guidance_scale": guidance_scale,
        "sampler": "DDIM, trailing spacing, eta=0",
        "seed": seed,
        "rows": rows,
    }
