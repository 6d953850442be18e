"""Control transfer on digits (Gandikota & Bau 2025, section 5.3): a "bold" LoRA trained on the teacher, applied
unchanged to a distilled student.

1. Bold digits: the digits train split dilated (3 x 3 max-pool on [-1, 1] images, ink = +1).
2. A rank-``--rank`` LoRA on the bundled digits teacher, trained by denoising score matching on the bold digits
   (the teacher's own v-prediction loss, class labels with 10 % null-label dropout as the teacher was trained).
3. ``stepdistill.hybrid.transfer_lora`` puts that adapter on the student (a DMD2 export) without retraining.
4. Samples of teacher / student, each with and without the LoRA, from the same noise: mean ink ((x + 1) / 2
   averaged over pixels), ink area (fraction of pixels above 0), FD-digits against the bold test digits and
   against the plain test digits.

    python benchmarks/bench_lora_transfer.py --student outputs/dmd2_digits_4step/pipeline --out /tmp/bold
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F


def bold(images: torch.Tensor) -> torch.Tensor:
    """Thicker strokes: a 3 x 3 dilation of the ink (the digits' ink is +1, the background -1)."""
    return F.max_pool2d(images, 3, stride=1, padding=1)


def ink(images: torch.Tensor) -> dict:
    x = images.clamp(-1, 1)
    return {"mean_ink": float(((x + 1) / 2).mean()), "ink_area": float((x > 0).float().mean())}


def train_bold_lora(net, schedule, pred, steps: int, batch: int, lr: float, rank: int, seed: int, log=print):
    from stepdistill.data import load_digits_tensors
    from stepdistill.models.adapters import add_lora, lora_parameters
    from stepdistill.models.conditioning import ClassConditioner
    from stepdistill.models.denoiser import Denoiser

    images, labels = load_digits_tensors("train", net.config.sample_size)
    images = bold(images)
    net.requires_grad_(False)
    add_lora(net, rank=rank, adapter_name="bold")
    params = lora_parameters(net, "bold")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model = Denoiser(net, schedule, pred)
    conditioner = ClassConditioner.for_unet2d(net)
    g = torch.Generator().manual_seed(seed)
    net.train()
    start = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        cond = conditioner(labels[idx]).drop(0.1, generator=g)
        t = torch.rand(batch, generator=g, dtype=torch.float64)
        noise = torch.randn(images[idx].shape, generator=g)
        loss = model.dsm_loss(images[idx], cond, t=t, noise=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"lora step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    net.eval()
    return net


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True, help="an exported digits student (StepDistillClassPipeline folder)")
    p.add_argument("--out", default="/tmp/bench_lora_transfer")
    p.add_argument("--steps", type=int, default=300, help="LoRA training iterations")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--teacher-steps", type=int, default=25, help="the teacher's DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from diffusers import DiffusionPipeline

    import stepdistill  # noqa: F401  (registers the pipeline classes)
    from stepdistill.assets import digits_teacher_path
    from stepdistill.data import load_digits_tensors
    from stepdistill.eval.fd_digits import FDDigits
    from stepdistill.hybrid import transfer_lora
    from stepdistill.models.adapters import adapters_disabled
    from stepdistill.models.conditioning import ClassConditioner
    from stepdistill.models.denoiser import Denoiser
    from stepdistill.models.loading import load_network
    from stepdistill.sampling import sample
    from stepdistill.utils import save_image_grid

    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "log.txt")

    def log(msg):
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    net, schedule, pred = load_network(digits_teacher_path())
    train_bold_lora(net, schedule, pred, args.steps, args.batch, args.lr, args.rank, args.seed, log)
    teacher = Denoiser(net, schedule, pred)  # the adapter on: the bold teacher; off (adapters_disabled): the base
    pipe = DiffusionPipeline.from_pretrained(args.student)
    pipe.set_progress_bar_config(disable=True)

    n = args.num_samples
    labels = torch.arange(n) % 10
    size = net.config.sample_size
    noise = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(args.seed))
    cond = ClassConditioner.for_unet2d(net)(labels)

    def teacher_samples(adapter_on: bool):
        def fn(x, t):
            return teacher.raw(x, t, cond, 1.0)

        with torch.no_grad():
            if adapter_on:
                return sample(fn, schedule, noise, args.teacher_steps, pred_type=pred)
            with adapters_disabled(net):
                return sample(fn, schedule, noise, args.teacher_steps, pred_type=pred)

    def student_samples():
        g = torch.Generator().manual_seed(args.seed)
        return pipe(class_labels=labels, generator=g, output_type="pt").images * 2 - 1

    rows = {}
    rows["teacher"] = teacher_samples(False)
    rows["teacher + bold LoRA"] = teacher_samples(True)
    rows["student"] = student_samples()
    transfer_lora(pipe.unet, net, "bold")  # the teacher's adapter on the student, unchanged
    rows["student + bold LoRA (transferred)"] = student_samples()

    test = load_digits_tensors("test", size)[0]
    fd_plain, fd_bold = FDDigits(reference=test), FDDigits(reference=bold(test))
    report = {"args": vars(args), "reference": {"test": ink(test), "bold test": ink(bold(test))}, "rows": {}}
    for name, x in rows.items():
        report["rows"][name] = {**ink(x), "fd_vs_bold_test": fd_bold.score(x), "fd_vs_test": fd_plain.score(x)}
        log(f"{name}: {json.dumps(report['rows'][name])}")
    log(f"reference: {json.dumps(report['reference'])}")
    grid = torch.cat([x[:20] for x in rows.values()])
    save_image_grid(grid, os.path.join(args.out, "bold_transfer.png"), nrow=20, scale=4)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}/report.json and bold_transfer.png")


if __name__ == "__main__":
    main()
