"""Method comparison on digits: FD-digits vs network evaluations per sample.

The teacher with DDIM at 1 / 2 / 4 / 8 / 25 / 50 steps, and each distillation trainer's one-step student
trained by its digits recipe (500 iterations of batch 64; BOOT's recipe: its own budget). Writes a markdown
table and a PNG plot. Every FD-digits figure uses 1000 samples, labels 0-9 in turn, seed 0, against the
held-out digits. Trainers that have not landed yet are simply absent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch

from stepdistill.assets import digits_teacher_path
from stepdistill.eval import FDDigits
from stepdistill.eval.teacher_report import sample_digits
from stepdistill.models import Teacher
from stepdistill.train import make_trainer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MSD_PRETRAIN = ["student_pretrain_steps=300", "student_pretrain_lr=0.001", "regression_pairs=512"]
STUDENTS = [
    ("DMD2", "recipes/dmd2/digits.yaml"),
    ("SIM", "recipes/sim/digits.yaml"),
    ("VSD", "recipes/vsd/digits.yaml"),
    ("BOOT", "recipes/boot/digits.yaml"),
    ("MSD", "recipes/msd/digits.yaml"),  # K = 2 routed students, same budget
    ("MeanFlow", "recipes/meanflow/digits.yaml"),  # its own budget (120 it); also sampled in 2 steps
    ("sCM", "recipes/scm/digits.yaml"),  # sCD, 2 steps (its own budget: 200 it of batch 32); also 1 step
    ("MSD K=5", "recipes/msd/digits.yaml", ["num_students=5"]),  # optional third item: recipe overrides
    ("MSD K=2 half-width", "recipes/msd/digits.yaml", ["student_block_out_channels=[16, 32, 32]", *MSD_PRETRAIN]),
    ("MSD K=2 per-student fake", "recipes/msd/digits.yaml", ["fake_score_per_student=true"]),
    ("f-distill (JS)", "recipes/fdistill/digits.yaml"),
    ("f-distill (forward KL)", "recipes/fdistill/digits_kl.yaml"),
    ("LADD", "recipes/ladd/digits.yaml"),
    ("DisBack (DMD2 base)", "recipes/disback/digits.yaml"),  # + 100 degradation it in front (no gen. updates)
]
MORE_STEPS = {"MeanFlow": (2,), "sCM": (1,)}  # students whose sampler takes any step count: extra rows at these counts


@torch.no_grad()
def student_samples(trainer, n=1000, seed=0, steps=None):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    noise = torch.randn(n, *trainer.sample_shape, generator=g)
    kw = {} if steps is None else {"num_steps": steps}
    out = [
        trainer.generator.sample(noise[s : s + 250], trainer.conditioner(labels[s : s + 250]), **kw)
        for s in range(0, n, 250)
    ]
    return torch.cat(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="outputs/bench/quality")
    p.add_argument("--max-steps", type=int, default=None, help="override every recipe's max_steps (quick runs)")
    p.add_argument("--num-samples", type=int, default=1000)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    fd = FDDigits()
    rows = []
    teacher = Teacher.from_pretrained(digits_teacher_path())
    for steps in (1, 2, 4, 8, 25, 50):
        t0 = time.perf_counter()
        x = sample_digits(teacher, args.num_samples, steps, seed=0)
        rows.append(
            {
                "model": "teacher (DDIM)",
                "nfe": steps,
                "fd_digits": fd.score(x),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(rows[-1], flush=True)
    for name, recipe, *extra in STUDENTS:
        overrides = [
            f"output_dir={os.path.join(args.out, re.sub(r'[^a-z0-9]+', '_', name.lower()))}",
            "checkpoint_every=0",
            "sample_every=0",
            "progress=false",
            *(extra[0] if extra else []),
        ]
        if args.max_steps:
            overrides.append(f"max_steps={args.max_steps}")
        trainer = make_trainer(os.path.join(ROOT, recipe), overrides)
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        t0 = time.process_time()
        x = student_samples(trainer, args.num_samples)
        sample_ms = (time.process_time() - t0) * 1000 / args.num_samples  # CPU time: less load-dependent
        rows.append(
            {
                "model": f"{name} student",
                "nfe": len(trainer.generator.timesteps),
                "fd_digits": fd.score(x),
                "sample_cpu_ms_per_image": round(sample_ms, 2),
                "generator_params": sum(p.numel() for p in trainer.generator.net.parameters()),
                "recipe": recipe,
                "train_iterations": trainer.global_step,
                "train_seconds": round(train_s, 1),
            }
        )
        print(rows[-1], flush=True)
        for steps in MORE_STEPS.get(name, ()):
            score = fd.score(student_samples(trainer, args.num_samples, steps=steps))
            row = {k: v for k, v in rows[-1].items() if k != "sample_cpu_ms_per_image"}  # timed at 1 step only
            rows.append({**row, "model": f"{name} student ({steps} steps)", "nfe": steps, "fd_digits": score})
            print(rows[-1], flush=True)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(rows, f, indent=2)
    t50 = next(r["fd_digits"] for r in rows if r["model"].startswith("teacher") and r["nfe"] == 50)
    lines = [
        "| model | network evaluations | FD-digits | vs teacher@50 | training | sampling CPU ms/image | parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        train = f"{r['train_iterations']} it, {r['train_seconds']:.0f} s" if "train_seconds" in r else ""
        cost = f"{r.get('sample_cpu_ms_per_image', '')} | {r['generator_params']}" if "generator_params" in r else " | "
        lines.append(
            f"| {r['model']} | {r['nfe']} | {r['fd_digits']:.2f} | {r['fd_digits'] / t50:.2f}x | {train} | {cost} |"
        )
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    teach = [r for r in rows if r["model"].startswith("teacher")]
    ax.plot([r["nfe"] for r in teach], [r["fd_digits"] for r in teach], "o-", color="gray", label="teacher (DDIM)")
    for r in rows:
        if not r["model"].startswith("teacher"):
            ax.plot(r["nfe"], r["fd_digits"], "*", markersize=12, label=r["model"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("FD-digits (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "quality.png"))
    print(f"wrote {os.path.join(args.out, 'quality.md')} and quality.png")


if __name__ == "__main__":
    main()
