"""``make demo``: distil the bundled digits teacher into a one-step generator with DMD2, export it as a
diffusers pipeline, reload it with ``DiffusionPipeline.from_pretrained``, and write

* ``samples.png``: teacher at 50 DDIM steps (top two rows) beside the student at 1 step (bottom two rows),
  same labels;
* ``metrics.json``: FD-digits of teacher@50, teacher@1 and student@1 (1000 samples each, labels 0-9 in
  turn, against the held-out digits), and the sampling time ratio teacher@50 / student@1.
"""

from __future__ import annotations

import os
import time

import torch

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "dmd2", "digits.yaml")


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_demo(
    out_dir: str = "outputs/demo", max_steps: int | None = None, num_samples: int = 1000, recipe: str | None = None
) -> dict:
    from diffusers import DiffusionPipeline

    import stepdistill  # noqa: F401  (registers the pipeline classes with diffusers)

    from .eval import FDDigits
    from .eval.teacher_report import sample_digits
    from .train import make_trainer
    from .utils import save_image_grid, write_json

    recipe = recipe or RECIPE
    overrides = [f"output_dir={os.path.join(out_dir, 'run')}", "checkpoint_every=0", "sample_every=0"]
    if max_steps is not None:
        overrides.append(f"max_steps={max_steps}")
    print(f"[demo] 1/4 distilling the digits teacher with DMD2 ({recipe})", flush=True)
    trainer = make_trainer(recipe, overrides)
    _, train_seconds = _timed(trainer.train)
    print("[demo] 2/4 exporting and reloading with DiffusionPipeline.from_pretrained", flush=True)
    folder = trainer.export(os.path.join(out_dir, "pipeline"))
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    teacher = trainer.teacher

    print(f"[demo] 3/4 sampling {num_samples} digits from the teacher (50 and 1 steps) and the student", flush=True)
    labels = torch.arange(num_samples) % 10

    def student_samples():
        out = []
        g = torch.Generator().manual_seed(0)
        for s in range(0, num_samples, 250):
            imgs = pipe(class_labels=labels[s : s + 250], generator=g, output_type="pt").images
            out.append(imgs * 2 - 1)
        return torch.cat(out)

    t50, teacher_seconds = _timed(lambda: sample_digits(teacher, num_samples, 50, seed=0))
    t1 = sample_digits(teacher, num_samples, 1, seed=0)
    s1, student_seconds = _timed(student_samples)

    print("[demo] 4/4 FD-digits", flush=True)
    fd = FDDigits()
    metrics = {
        "fd_digits": {"teacher@50": fd.score(t50), "teacher@1": fd.score(t1), "student@1": fd.score(s1)},
        "sampling_seconds": {"teacher@50": round(teacher_seconds, 3), "student@1": round(student_seconds, 3)},
        "speedup_teacher50_over_student1": round(teacher_seconds / student_seconds, 1),
        "network_evaluations_per_sample": {"teacher@50": 50, "student@1": 1},
        "num_samples": num_samples,
        "train_steps": trainer.global_step,
        "train_seconds": round(train_seconds, 1),
        "pipeline": folder,
        "recipe": recipe,
    }
    fd_vals = metrics["fd_digits"]
    metrics["student1_over_teacher50"] = round(fd_vals["student@1"] / fd_vals["teacher@50"], 3)
    grid = torch.cat([t50[:20], s1[:20]])  # rows: teacher 0-9, 0-9; student 0-9, 0-9
    save_image_grid(grid, os.path.join(out_dir, "samples.png"), nrow=10, scale=4)
    write_json(metrics, os.path.join(out_dir, "metrics.json"))
    print(
        f"[demo] FD-digits teacher@50 {fd_vals['teacher@50']:.2f}  teacher@1 {fd_vals['teacher@1']:.2f}  "
        f"student@1 {fd_vals['student@1']:.2f}  (x{metrics['student1_over_teacher50']} of teacher@50); "
        f"sampling {metrics['speedup_teacher50_over_student1']}x faster than teacher@50",
        flush=True,
    )
    print(f"[demo] wrote {os.path.join(out_dir, 'samples.png')} and {os.path.join(out_dir, 'metrics.json')}")
    return metrics
