"""Digits figures for progressive and guided distillation (the README table).

1. FD-digits (vs the held-out test digits) of each round's student at its step count, beside the teacher's
   DDIM at the same count, and the ratio to the teacher at 50 steps.
2. Guided: at w = 2 and 4, FD-digits between the w-conditioned student's samples and the CFG teacher's samples
   (50 DDIM steps, same w, same labels) against the same figure for the unguided student; and the network
   evaluations per sample per step of each (counted with a forward hook).

    python benchmarks/bench_progressive.py --run outputs/progressive_digits \
        --guided-run outputs/progressive_digits_guided --out outputs/bench/progressive.md

3. With ``--guided-lora-run``: the guided full and guided LoRA students (LoRA-enhanced guided distillation) side by
   side, each against the CFG teacher at w = 2 and 4 and against the test digits (``--steps`` with no value skips
   part 1).
"""

from __future__ import annotations

import argparse
import os
import re

import torch

from stepdistill.assets import digits_teacher_path
from stepdistill.eval.fd_digits import FDDigits
from stepdistill.eval.teacher_report import sample_digits
from stepdistill.models import Teacher


def _rounds(run: str) -> dict[int, str]:
    root = os.path.join(run, "rounds")
    out = {}
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = re.fullmatch(r"(\d+)_steps", name)
        if m:
            out[int(m.group(1))] = os.path.join(root, name)
    return dict(sorted(out.items(), reverse=True))


class EvalCounter:
    """Counts samples pushed through a network per call (a CFG call pushes the batch twice)."""

    def __init__(self, net):
        self.samples = 0
        net.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.samples += args[0].shape[0]


def evals_per_sample_step(model: Teacher, steps: int, w: float, n: int = 10) -> float:
    counter = EvalCounter(model.net)
    sample_digits(model, n, steps, guidance_scale=w, seed=0, batch_size=n)
    return counter.samples / (n * steps)


def full_vs_lora(teacher, metric, runs: dict, k: int, n: int) -> list[str]:
    """FD-digits of each guided run's k-step student vs the CFG teacher (50 steps, same w and labels) and vs the
    test digits, at w = 2 and 4."""
    students = {}
    for label, run in runs.items():
        found = _rounds(run)
        if k not in found:
            return ["", f"(no {k}-step round export in {run})"]
        students[label] = Teacher.from_pretrained(found[k])
    head = " | ".join(f"guided {lb} vs CFG teacher | guided {lb} vs test digits" for lb in students)
    lines = ["", f"Guided distillation, full vs LoRA, {k}-step students (FD-digits, lower is better):", "",
             f"| w | {head} |", "|---" * (1 + 2 * len(students)) + "|"]  # fmt: skip
    for w in (2.0, 4.0):
        ref = FDDigits(reference=sample_digits(teacher, n, 50, guidance_scale=w, seed=1))
        cells = []
        for student in students.values():
            x = sample_digits(student, n, k, guidance_scale=w)
            cells += [f"{ref.score(x):.2f}", f"{metric.score(x):.2f}"]
        lines.append(f"| {w:g} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="outputs/progressive_digits")
    p.add_argument("--guided-run", default="outputs/progressive_digits_guided")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="*", default=[8, 4, 2, 1])
    p.add_argument("--guided-steps", type=int, default=4, help="step count of the guided student compared")
    p.add_argument("--guided-lora-run", default="", help="a guided LoRA run compared with --guided-run")
    p.add_argument("--out", default="outputs/bench/progressive.md")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    teacher = Teacher.from_pretrained(digits_teacher_path())
    metric = FDDigits()
    n = a.num_samples
    lines = [f"FD-digits vs held-out test digits, {n} samples (labels 0-9 in turn, seed 0), lower is better.", ""]
    t50 = metric.score(sample_digits(teacher, n, 50))
    lines += [
        f"Teacher DDIM at 50 steps: {t50:.2f}",
        "",
        "| steps | progressive student | teacher DDIM | student / teacher@50 |",
        "|---|---|---|---|",
    ]
    rounds = _rounds(a.run)
    for steps in a.steps:
        if steps not in rounds:
            lines.append(f"| {steps} | (no round export in {a.run}) | | |")
            continue
        student = Teacher.from_pretrained(rounds[steps])
        fd_s = metric.score(sample_digits(student, n, steps))
        fd_t = metric.score(sample_digits(teacher, n, steps))
        lines.append(f"| {steps} | {fd_s:.2f} | {fd_t:.2f} | {fd_s / t50:.2f}x |")
        print(lines[-1], flush=True)
    guided = _rounds(a.guided_run)
    k = a.guided_steps
    if k in guided and k in rounds:
        g_student = Teacher.from_pretrained(guided[k])
        plain = Teacher.from_pretrained(rounds[k])
        lines += [
            "",
            f"Guided distillation, {k}-step students. FD-digits between each student's samples and the CFG "
            "teacher's (50 DDIM steps, same w and labels): lower = closer to the guided teacher. "
            "Evaluations = network evaluations per sample per step.",
            "",
            "| w | guided student vs CFG teacher | unguided student vs CFG teacher | guided evals/step | "
            "CFG teacher evals/step | guided student vs test digits |",
            "|---|---|---|---|---|---|",
        ]
        for w in (2.0, 4.0):
            ref = FDDigits(reference=sample_digits(teacher, n, 50, guidance_scale=w, seed=1))
            xg = sample_digits(g_student, n, k, guidance_scale=w)
            xp = sample_digits(plain, n, k)
            e_g = evals_per_sample_step(g_student, k, w)
            e_t = evals_per_sample_step(teacher, k, w)
            lines.append(
                f"| {w:g} | {ref.score(xg):.2f} | {ref.score(xp):.2f} | {e_g:g} | {e_t:g} | {metric.score(xg):.2f} |"
            )
            print(lines[-1], flush=True)
    if a.guided_lora_run:
        lines += full_vs_lora(teacher, metric, {"full": a.guided_run, "LoRA": a.guided_lora_run}, k, n)
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
