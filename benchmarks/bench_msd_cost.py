"""MSD's cost on the digits teacher, no training needed (the cost does not depend on the weights).

Parameters per student, sampling CPU time per image (one ``pipe(class_labels=...)`` call on 1000 labels, 0-9 in
turn; process CPU time at 1 thread, the least of 3 calls: less sensitive to a loaded machine than wall time), for
one teacher-size student, K = 2 / 5 routed teacher-size students, K = 2 routed half-width students and one
half-width student alone; and the fake score's training memory (float32 weights, gradients and AdamW's two
moments), shared vs one per student.

    python benchmarks/bench_msd_cost.py [--out outputs/bench/msd_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from diffusers import DDPMScheduler, UNet2DModel

from stepdistill.assets import digits_teacher_path
from stepdistill.models.routed import RoutedUNet2DModel
from stepdistill.pipelines import StepDistillClassPipeline
from stepdistill.trainers.msd import balanced_partition, routing_table

HALF_WIDTH = [16, 32, 32]  # the teacher's [32, 64, 64] halved: about a quarter of the parameters


def _params(net) -> int:
    return sum(p.numel() for p in net.parameters())


def _cpu_ms_per_image(pipe, n: int = 1000, repeats: int = 3) -> float:
    labels = [i % 10 for i in range(n)]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        with torch.no_grad():
            pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt")
        best = min(best, time.process_time() - t0)
    return best * 1000 / n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="outputs/bench/msd_cost.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    teacher = UNet2DModel.from_pretrained(digits_teacher_path(), subfolder="unet").eval()
    config = {k: v for k, v in dict(teacher.config).items() if not k.startswith("_")}
    small = UNet2DModel.from_config({**config, "block_out_channels": HALF_WIDTH}).eval()
    scheduler = DDPMScheduler.from_pretrained(digits_teacher_path(), subfolder="scheduler")

    def routed(nets):
        return RoutedUNet2DModel.from_students(nets, routing_table(balanced_partition(10, len(nets)), 10)).eval()

    models = {
        "one teacher-size student": teacher,
        "K = 2 routed, teacher-size": routed([teacher] * 2),
        "K = 5 routed, teacher-size": routed([teacher] * 5),
        f"K = 2 routed, widths {HALF_WIDTH}": routed([small] * 2),
        f"one student of widths {HALF_WIDTH} alone": small,
    }
    rows = []
    for name, net in models.items():
        pipe = StepDistillClassPipeline(unet=net, scheduler=scheduler, trained_timesteps=[999])
        pipe.set_progress_bar_config(disable=True)
        per = [_params(s) for s in net.nets] if hasattr(net, "nets") else [_params(net)]
        rows.append({"model": name, "params_per_student": per[0], "params_total": sum(per)})
        rows[-1]["cpu_ms_per_image"] = round(_cpu_ms_per_image(pipe), 2)
        print(rows[-1], flush=True)
    fake_mib = 4 * 4 * _params(teacher) / 2**20  # weights + gradients + 2 AdamW moments, float32
    memory = {f"K = {k}": {"shared": round(fake_mib, 1), "per_student": round(k * fake_mib, 1)} for k in (2, 5)}
    print("fake score training memory, MiB:", memory)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"sampling": rows, "fake_score_mib": memory}, f, indent=2)


if __name__ == "__main__":
    main()
