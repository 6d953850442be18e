"""Seconds per iteration and memory of each trainer (full vs LoRA) on the same model and batch.

"model state MB" counts every weight the trainer holds (teachers, students, fake scores, round teachers; a
LoRA shares its base with the teacher, so shared storage is counted once) plus gradients and optimiser state
of the trainable parameters: the memory that full vs LoRA training changes, independent of the allocator.

"generator-step activations" counts the bytes autograd saves for backward while the generator loss is built
(device-independent: SIM differentiates through the teacher and the fake score, DMD2 and VSD do not).
Each configuration runs in its own process (the bundled digits teacher, batch 64, one generator update per
step so that every iteration has both groups), so peak memory is the process's own: CUDA peak allocated
memory on a GPU, peak resident set size (RSS) on CPU (it includes the Python / torch runtime, identical
for every row; compare the rows, not the absolute numbers). Ratios are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

ROWS = [
    ("dmd2", "full", "full"),
    ("dmd2", "lora", "lora"),
    ("sim", "full", "full"),
    ("sim", "lora", "lora"),
    ("vsd", "full", "lora"),
    ("progressive", "full", "-"),
    ("progressive", "lora", "-"),
]


def count_saved_bytes(trainer, key=lambda group: "generator" if "generator" in group else None) -> dict:
    """Wrap ``trainer.compute_loss`` so that the bytes autograd saves for backward while a group's loss is built
    are recorded: returns a dict ``key(group) -> max bytes`` filled as the trainer runs (groups whose key is None
    are not counted). Device- and allocator-independent activation memory."""
    import torch

    saved: dict = {}
    compute = trainer.compute_loss

    def counted(batch, group):
        name = key(group)
        if name is None:
            return compute(batch, group)
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = compute(batch, group)
        saved[name] = max(saved.get(name, 0), sum(seen.values()))
        return out

    trainer.compute_loss = counted
    return saved


def model_state_bytes(trainer) -> int:
    """Unique weight storage of every network the trainer holds + grads and AdamW state of trainable params."""
    import torch

    nets = []
    for name in ("teacher", "round_teacher", "generator", "fake", "head", "target"):
        obj = getattr(trainer, name, None)
        net = getattr(obj, "net", obj)
        if isinstance(net, torch.nn.Module):
            nets.append(net)
    seen = {}
    for net in nets:
        for t in list(net.parameters()) + list(net.buffers()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    total = sum(seen.values())
    for name, params in trainer.params.items():
        total += sum(p.numel() * p.element_size() for p in params)  # gradients
        for state in trainer.opts[name].optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.ndim > 0)
    return total


def child(method: str, gen: str, fake: str, steps: int, batch: int) -> dict:
    import resource
    import time

    import torch

    from stepdistill.train import make_trainer

    recipe = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", method, "digits.yaml")
    if method == "progressive":  # one round of `steps` updates (64 -> 32 steps), no per-round export
        per_method = ["start_steps=64", "final_steps=32", f"steps_per_round={steps}", "save_rounds=false"]
    else:
        per_method = [f"fake_score_mode={fake}", f"max_steps={steps}", "dfake_gen_update_ratio=1"]
    overrides = [
        f"generator_mode={gen}",
        *per_method,
        f"global_batch={batch}",
        "checkpoint_every=0",
        "sample_every=0",
        "progress=false",
        "output_dir=outputs/bench/tmp",
        "lora_rank=16",
    ]
    trainer = make_trainer(recipe, overrides)
    trainer.setup()
    cuda = torch.cuda.is_available()
    times = []
    orig = trainer.on_step_end

    def stamp(step):
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        orig(step)

    trainer.on_step_end = stamp
    saved = count_saved_bytes(trainer)  # the generator step's activation memory
    trainer.train()
    per_iter = (times[-1] - times[1]) / (len(times) - 2)  # skip the first (warm-up) iterations
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    n_params = sum(p.numel() for n in trainer.params.values() for p in n)
    return {
        "seconds_per_iteration": per_iter,
        "peak_mb": peak,
        "trainable_params": n_params,
        "generator_saved_mb": saved.get("generator", 0) / 2**20,
        "model_state_mb": model_state_bytes(trainer) / 2**20,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="outputs/bench/trainers.md")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.batch)))
        return
    results = []
    for method, gen, fake in ROWS:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                method,
                gen,
                fake,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(((method, gen, fake), json.loads(out.stdout.strip().splitlines()[-1])))
        print(method, gen, fake, results[-1][1], flush=True)
    base = dict(results)[("dmd2", "full", "full")]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    lines = [
        f"# Trainers: digits teacher, batch {args.batch}, {device}",
        "",
        "DMD2 / SIM / VSD iteration = one generator update + one fake-score update; progressive iteration = two "
        "teacher DDIM steps + one student update. Peak MB: "
        + ("CUDA peak allocated" if torch.cuda.is_available() else "peak RSS of the process (runtime included)"),
        "",
        "| method | generator | fake score | trainable params | s / iteration | vs DMD2 full "
        "| generator-step activations MB | vs DMD2 full | model state MB | LoRA / full | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    full_state = {m: r["model_state_mb"] for (m, g, f), r in results if g == "full"}
    for (m, g, f), r in results:
        lines.append(
            f"| {m} | {g} | {f} | {r['trainable_params'] / 1e6:.2f} M | {r['seconds_per_iteration']:.3f} | "
            f"{r['seconds_per_iteration'] / base['seconds_per_iteration']:.2f}x | {r['generator_saved_mb']:.0f} | "
            f"{r['generator_saved_mb'] / base['generator_saved_mb']:.2f}x | {r['model_state_mb']:.1f} | "
            f"{r['model_state_mb'] / full_state[m]:.2f}x | {r['peak_mb']:.0f} |"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
