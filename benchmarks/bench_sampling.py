"""Sampling benchmark of the bundled digits teacher: seconds per batch vs DDIM steps, and the cost of CFG as
one batched forward vs two forwards. Writes a markdown table. Ratios are measured side by side in one run;
absolute seconds depend on the machine (report them only from a named device)."""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from stepdistill.assets import digits_teacher_path
from stepdistill.models import Teacher
from stepdistill.models.conditioning import ClassConditioner
from stepdistill.sampling import sample


def timed(fn, repeats=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--out", default="outputs/bench/sampling.md")
    args = p.parse_args(argv)
    teacher = Teacher.from_pretrained(digits_teacher_path())
    cond = ClassConditioner.for_unet2d(teacher.net)(torch.arange(args.batch) % 10)
    noise = torch.randn(args.batch, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    rows = []
    base = None
    for steps in (1, 4, 10, 25, 50):
        s = timed(
            lambda steps=steps: sample(
                lambda x, t: teacher.raw(x, t, cond), teacher.schedule, noise, steps, pred_type=teacher.prediction_type
            ),
            repeats=2 if steps > 10 else 3,
        )
        base = base or s
        rows.append(f"| DDIM {steps} steps | {s:.3f} | {s / base:.1f}x |")
    x = noise
    t = torch.full((args.batch,), 0.5, dtype=torch.float64)
    one = timed(lambda: teacher.raw(x, t, cond, guidance_scale=2.0))
    two = timed(lambda: (teacher.raw(x, t, cond), teacher.raw(x, t, cond.uncond())))
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        f"# Sampling benchmark: bundled digits teacher, batch {args.batch}, {device}",
        "",
        "| what | seconds per batch | vs 1 step |",
        "|---|---|---|",
        *rows,
        "",
        "| CFG at one noise level | seconds | ratio |",
        "|---|---|---|",
        f"| one batched forward of [cond; uncond] | {one:.4f} | 1.00 |",
        f"| two separate forwards | {two:.4f} | {two / one:.2f} |",
        "",
    ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
