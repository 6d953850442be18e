"""FD-digits of an exported MeanFlow digits student at several step counts (bench_quality's protocol: 1000 samples,
labels 0-9 in turn, seed 0, against the held-out digits). The exported pipeline samples one step; a MeanFlow student
takes any step count (z_r = z_t - (t - r) u), so its network is loaded into a MeanFlowGenerator here.

    python benchmarks/eval_meanflow.py --pipeline outputs/meanflow_digits/pipeline --steps 1,2
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from stepdistill.assets import digits_teacher_path
from stepdistill.eval import FDDigits
from stepdistill.models import Teacher
from stepdistill.models.conditioning import ClassConditioner
from stepdistill.models.guided_unet import GuidedUNet2DModel
from stepdistill.models.meanflow import MeanFlowGenerator
from stepdistill.schedules import normalize_prediction_type


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pipeline", required=True)
    p.add_argument("--steps", default="1,2")
    p.add_argument("--num-samples", type=int, default=1000)
    args = p.parse_args(argv)
    teacher = Teacher.from_pretrained(digits_teacher_path())
    net = GuidedUNet2DModel.from_pretrained(os.path.join(args.pipeline, "unet")).eval()
    with open(os.path.join(args.pipeline, "scheduler", "scheduler_config.json")) as f:
        pred = normalize_prediction_type(json.load(f)["prediction_type"])
    with open(os.path.join(args.pipeline, "model_index.json")) as f:
        w = json.load(f)["_stepdistill"]["default_guidance_scale"]  # 1 + tau_max * r_embedding_scale / 1000
    tau_max = MeanFlowGenerator(net, teacher.schedule, pred).tau_max
    gen = MeanFlowGenerator(net, teacher.schedule, pred, r_embedding_scale=(w - 1.0) * 1000.0 / tau_max)
    cond_of = ClassConditioner.for_unet2d(net)
    fd = FDDigits()
    n = args.num_samples
    for steps in (int(s) for s in args.steps.split(",")):
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(n) % 10
        noise = torch.randn(n, net.config.in_channels, net.config.sample_size, net.config.sample_size, generator=g)
        x = torch.cat(
            [gen.sample(noise[s : s + 250], cond_of(labels[s : s + 250]), num_steps=steps) for s in range(0, n, 250)]
        )
        print(json.dumps({"pipeline": args.pipeline, "steps": steps, "fd_digits": round(fd.score(x), 3)}), flush=True)


if __name__ == "__main__":
    main()
