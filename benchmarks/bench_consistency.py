"""Full LCM vs LCM-LoRA on the same tiny SD-class components and batch.

For each student (full copy with a w-embedding and an EMA target network; LCM-LoRA: a LoRA on the teacher's
UNet, teacher = adapters off, target = the same LoRA network under no_grad), one process each:

* seconds per iteration (after two warm-up iterations);
* network evaluations per iteration, counted with forward hooks on the UNets: forward calls and sample rows
  (classifier-free guidance runs the teacher on a doubled batch) of the teacher, the student and the target. In
  LoRA mode the three share one module; a call is the teacher's when the adapters are off, the student's when
  autograd records it, the target's otherwise;
* memory, counted rather than sampled (on CPU the allocator's peak is not observable; RSS deltas are unreliable):
  parameter bytes of every distinct tensor held by teacher + student + target, gradient and AdamW-state bytes
  of the trainable parameters, and the bytes autograd saves for backward while the loss is built
  (``saved_tensors_hooks``); on a CUDA device the allocator's peak (``max_memory_allocated``) is reported too;
* copies of the base weights: how many distinct tensors hold the UNet's ``conv_in.weight`` across teacher,
  student and target (LoRA: 1).

Writes a markdown table to ``--out`` (default ``outputs/bench/consistency.md``) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ROWS = ("full", "lora")


def _tiny_teacher(root: str) -> str:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from diffusers import StableDiffusionPipeline
    from tiny_models import save_tiny_pipeline, tiny_sd_components

    return save_tiny_pipeline(
        tiny_sd_components(os.path.join(root, "src")), StableDiffusionPipeline, os.path.join(root, "teacher")
    )


def _image_folder(root: str, n: int = 16) -> str:
    import numpy as np
    from PIL import Image

    folder = os.path.join(root, "images")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
        with open(os.path.join(folder, f"{i}.txt"), "w") as f:
            f.write(["a cat", "a dog", "the cat", "a red dog"][i % 4])
    return folder


def child(mode: str, steps: int, batch: int, resolution: int) -> dict:
    import time

    import torch

    from stepdistill.config import build_config
    from stepdistill.models.adapters import tuner_layers
    from stepdistill.models.denoiser import _unwrap
    from stepdistill.trainers.consistency import ConsistencyConfig, ConsistencyTrainer

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_trainers import count_saved_bytes

    root = tempfile.mkdtemp(prefix="bench_consistency_")
    teacher, images = _tiny_teacher(root), _image_folder(root)
    cfg = dict(
        output_dir=os.path.join(root, "run"),
        teacher=teacher,
        dataset=images,
        resolution=resolution,
        mode="lcm",
        generator_mode=mode,
        w_embedding_dim=32 if mode == "full" else 0,
        w_min=4.0,
        w_max=16.0,
        lora_rank=8,
        lora_alpha=8.0,
        max_steps=steps,
        global_batch=batch,
        learning_rate=1e-5,
        checkpoint_every=0,
        progress=False,
    )
    trainer = ConsistencyTrainer(build_config(ConsistencyConfig, cfg))
    trainer.setup()
    cuda = torch.cuda.is_available()
    teacher_net = _unwrap(trainer.teacher.net)
    student_net = trainer._inner("generator")
    target_net = trainer.target.net if trainer.target is not None else None
    counts = {k: {"calls": 0, "rows": 0} for k in ("teacher", "student", "target")}

    def who(module):
        if mode == "lora":
            layers = tuner_layers(module)
            if layers and layers[0].disable_adapters:
                return "teacher"
            return "student" if torch.is_grad_enabled() else "target"
        return {id(teacher_net): "teacher", id(student_net): "student"}.get(id(module), "target")

    def hook(module, args, kwargs, out):
        x = args[0] if args else kwargs["sample"]
        c = counts[who(module)]
        c["calls"] += 1
        c["rows"] += x.shape[0]

    for net in {id(n): n for n in (teacher_net, student_net, target_net) if n is not None}.values():
        net.register_forward_hook(hook, with_kwargs=True)

    saved = count_saved_bytes(trainer, key=lambda group: "max")
    times = []
    orig = trainer.on_step_end

    def stamp(step):
        orig(step)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    trainer.on_step_end = stamp
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    per_iter = (times[-1] - times[1]) / (len(times) - 2)

    nets = {"teacher": teacher_net, "student": student_net, "target": target_net}
    distinct = {}
    for net in nets.values():
        if net is not None:
            for p in list(net.parameters()) + list(net.buffers()):
                distinct[p.data_ptr()] = p.numel() * p.element_size()
    copies = len(
        {
            dict(n.named_parameters())[key].data_ptr()
            for n in nets.values()
            if n is not None
            for key in [k for k in dict(n.named_parameters()) if k.endswith("conv_in.weight")][:1]
        }
    )
    trainable = [p for p in trainer.params["generator"]]
    train_bytes = sum(p.numel() * p.element_size() for p in trainable)
    base_bytes = sum(p.numel() * p.element_size() for n, p in teacher_net.named_parameters() if "lora_" not in n)
    per = {k: {kk: v / steps for kk, v in c.items()} for k, c in counts.items()}
    return {
        "seconds_per_iteration": per_iter,
        "evaluations": per,
        "batch": batch,
        "param_mb": sum(distinct.values()) / 2**20,
        "base_mb": base_bytes / 2**20,
        "base_copies": copies,
        "trainable_params": sum(p.numel() for p in trainable),
        "grad_adam_mb": 3 * train_bytes / 2**20,
        "activations_mb": saved.get("max", 0) / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench/consistency.md")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=16, help="latent side of the tiny SD UNet")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.resolution)))
        return
    results = {}
    for mode in ROWS:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--resolution",
            str(args.resolution),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(mode, results[mode], flush=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    b = args.batch
    lines = [
        f"# LCM: full student vs LCM-LoRA, tiny SD-class components, batch {b}, {args.resolution}x{args.resolution} "
        f"latents, {device}",
        "",
        "Evaluations per iteration are counted with forward hooks: calls (rows / batch). Memory is counted: parameter "
        "bytes of every distinct tensor held by teacher + student + target, gradients + AdamW state of the trainable "
        "parameters, and the activations autograd saves for backward; "
        + ("CUDA peak allocated memory is measured." if torch.cuda.is_available() else "no allocator peak on CPU."),
        "",
        "| student | s / iteration | teacher evals | student evals | target evals | copies of the base weights "
        "| parameters held MB | trainable params | grads + Adam MB | model state MB | saved activations MB "
        "| total counted MB " + ("| CUDA peak MB |" if torch.cuda.is_available() else "|"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if torch.cuda.is_available() else ""),
    ]
    names = {"full": "full (w-embedding, EMA target)", "lora": "LCM-LoRA (rank 8)"}
    for mode, r in results.items():
        ev = r["evaluations"]

        def cell(k, ev=ev):
            return f"{ev[k]['calls']:.0f} ({ev[k]['rows'] / b:.0f}x batch)"

        state = r["param_mb"] + r["grad_adam_mb"]
        total = state + r["activations_mb"]
        row = (
            f"| {names[mode]} | {r['seconds_per_iteration']:.3f} | {cell('teacher')} | {cell('student')} | "
            f"{cell('target')} | {r['base_copies']} | {r['param_mb']:.2f} | {r['trainable_params'] / 1e3:.1f} k | "
            f"{r['grad_adam_mb']:.2f} | {state:.2f} | {r['activations_mb']:.2f} | {total:.2f} |"
        )
        if torch.cuda.is_available():
            row += f" {r['cuda_peak_mb']:.1f} |"
        lines.append(row)
    base = results["full"]["base_mb"]
    lines += [
        "",
        f"The base UNet is {base:.2f} MB: the full student holds it {results['full']['base_copies']} times (teacher, "
        f"student, EMA target), LCM-LoRA {results['lora']['base_copies']} time (the teacher is the same network "
        "with the adapter off, the target the same LoRA network under no_grad). Model state = weights held + "
        "gradients + AdamW moments: (3 + 3) x P_base for the full student, P_base + 4 x P_LoRA for LCM-LoRA; it is "
        "what LoRA saves at scale. The tiny UNet is so small that a LoRA is almost as large as the base and the "
        "activations dominate; LoRA layers add activations and time (extra matmuls) rather than remove them.",
    ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
