"""Diversity distillation on digits: teacher vs a distilled student vs hybrid sampling (teacher's first k steps).

    python benchmarks/bench_diversity.py --student <exported digits pipeline> [--k 1 2] [--per-class 50]

Rows: the teacher at its full DDIM grid and at the student's step count, the student alone, and hybrid k = 1, 2
(stepdistill.hybrid: the teacher for the first k steps, on the student's trained timesteps, then the student).
Columns: per-class diversity (mean pairwise distance of the FD-digits classifier's features among the samples of
one class, averaged over the ten classes; Vendi score likewise), precision / recall in those features against the
held-out digits, FD-digits, network evaluations and seconds per image (this machine, wall clock). Also the x0
structure cosine of the DT-visualisation (cos(x0 after the first step, final sample)) and trace grids.
Writes ``<out>/diversity.json`` and ``<out>/trace_*.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _features(images):
    from stepdistill.eval.fd_digits import load_classifier

    net = load_classifier()
    with torch.no_grad():
        return torch.cat([net.features(x) for x in images.split(500)])


def score(images, labels, pr_k: int = 3) -> dict:
    from stepdistill.data.digits import load_digits_tensors
    from stepdistill.eval.diversity import grouped_diversity
    from stepdistill.eval.fd_digits import FDDigits
    from stepdistill.eval.precision_recall import precision_recall

    feats = _features(images)
    real = _features(load_digits_tensors("test", int(images.shape[-1]))[0])
    div = grouped_diversity(feats, labels)
    pr = precision_recall(real, feats, k=pr_k)
    per_class = {int(g): round(v["pairwise_distance"], 4) for g, v in div["per_group"].items()}
    return {
        "diversity": round(div["mean_pairwise_distance"], 4),
        "vendi": round(div["mean_vendi"], 3),
        "precision": round(pr["precision"], 3),
        "recall": round(pr["recall"], 3),
        "fd_digits": round(FDDigits(resolution=int(images.shape[-1])).score(images), 3),
        "per_class_diversity": per_class,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="exported multi-step digits pipeline (e.g. DMD2 4-step)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--per-class", type=int, default=50, help="seeds per class")
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--teacher-guidance-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench_diversity")
    args = p.parse_args(argv)

    from diffusers import DiffusionPipeline

    import stepdistill  # noqa: F401  (registers the pipeline classes)
    from stepdistill.assets import digits_teacher_path
    from stepdistill.hybrid import save_trace_grid, structure_cosine
    from stepdistill.models import Teacher
    from stepdistill.models.conditioning import ClassConditioner
    from stepdistill.sampling import sample

    os.makedirs(args.out, exist_ok=True)
    teacher = Teacher.from_pretrained(digits_teacher_path())
    pipe = DiffusionPipeline.from_pretrained(args.student)
    pipe.set_progress_bar_config(disable=True)
    n_student = len(pipe.config.trained_timesteps)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    shape = (len(labels), 1, 16, 16)
    w = args.teacher_guidance_scale
    evals_per_teacher_step = 1 if w == 1.0 else 2
    rows = {}

    def teacher_row(steps):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
        cond = ClassConditioner.for_unet2d(teacher.net)(labels)
        trace = []
        t0 = time.perf_counter()
        x = sample(
            lambda x, t: teacher.raw(x, t, cond, w),
            teacher.schedule,
            noise,
            steps,
            pred_type=teacher.prediction_type,
            trace=trace,
        )
        return x, trace, time.perf_counter() - t0, steps * evals_per_teacher_step

    def student_row(k):
        trace = []
        kw = {"teacher": teacher, "teacher_steps": k, "teacher_guidance_scale": w} if k else {}
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        x = pipe(class_labels=labels, generator=g, output_type="pt", trace=trace, **kw).images * 2 - 1
        return x, trace, time.perf_counter() - t0, k * evals_per_teacher_step + (n_student - k)

    runs = {f"teacher@{args.teacher_steps}": lambda: teacher_row(args.teacher_steps)}
    runs[f"teacher@{n_student}"] = lambda: teacher_row(n_student)
    runs[f"student@{n_student}"] = lambda: student_row(0)
    for k in args.k:
        runs[f"hybrid k={k}"] = lambda k=k: student_row(k)
    for name, run in runs.items():
        x, trace, seconds, evals = run()
        row = score(x.clamp(-1, 1), labels)
        row.update(
            evals=evals,
            seconds_per_image=round(seconds / len(labels), 5),
            structure_cosine=round(structure_cosine(trace), 3),
        )
        rows[name] = row
        pick = torch.arange(10) * args.per_class  # one sample per class
        cols = trace if len(trace) <= 10 else [trace[i] for i in torch.linspace(0, len(trace) - 1, 10).round().long()]
        slug = name.replace("@", "").replace(" ", "").replace("=", "")
        save_trace_grid([c[pick] for c in cols], os.path.join(args.out, f"trace_{slug}.png"), max_samples=10)
        print(name, json.dumps({k: v for k, v in row.items() if k != "per_class_diversity"}), flush=True)
    result = {"student": args.student, "per_class": args.per_class, "seed": args.seed, "teacher_w": w, "rows": rows}
    from stepdistill.utils import write_json

    write_json(result, os.path.join(args.out, "diversity.json"))
    print(f"wrote {args.out}/diversity.json")


if __name__ == "__main__":
    main()
