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
    ("progressive_guided", "full", "-"),
    ("progressive_guided", "lora", "-"),
    ("sdxl_twin", "lcm_lora", "-"),
    ("sdxl_twin", "dmd2", "full"),
    ("sdxl_twin", "dmd2_shared", "full"),
]

# the evaluations each algorithm needs per iteration (B = batch): what the trainer's counts are compared with
_DMD_FAMILY = "generator 1 x B; teacher 1 x B; fake 1 x B (no grad, the DM / VSD score) + 1 x B (DSM)"
_SIM = "generator 1 x B; teacher 1 x B (input grad); fake 1 x B (input grad, the SiD score) + 1 x B (DSM)"
MINIMUM = {
    ("dmd2", "full", "full"): _DMD_FAMILY,
    ("dmd2", "lora", "lora"): _DMD_FAMILY,
    ("sim", "full", "full"): _SIM,
    ("sim", "lora", "lora"): _SIM,
    ("vsd", "full", "lora"): _DMD_FAMILY,
    ("progressive", "full", "-"): "round teacher 2 x B (two DDIM steps); generator 1 x B",
    ("progressive", "lora", "-"): "round teacher 2 x B (two DDIM steps); generator 1 x B",
    ("progressive_guided", "full", "-"): "stage one: teacher 1 x 2B (CFG); generator 1 x B (w as an input)",
    ("progressive_guided", "lora", "-"): "stage one: teacher 1 x 2B (CFG); generator 1 x B (w as an input)",
    ("sdxl_twin", "lcm_lora", "-"): "generator 1 x B; teacher 1 x 2B (CFG); target (the LoRA net, no grad) 1 x B",
    ("sdxl_twin", "dmd2", "full"): "generator 1 x B + k x B no grad (backward simulation, k uniform in 0..3: "
    "1.5 on average); teacher 1 x 2B (CFG 8); fake 1 x B (DM, no grad) + 1 x B (DSM) + 2 to the GAN layer "
    "(generator's GAN loss 1 x B, discriminator real + fake batched 1 x 2B)",
    ("sdxl_twin", "dmd2_shared", "full"): "as dmd2, but the DM loss and the generator's GAN loss share one fake "
    "forward (with input grad, share_fake_forward: true): fake 1 x B (DM + GAN) + 1 x B (DSM) + 1 to the GAN layer "
    "(discriminator real + fake batched 1 x 2B)",
}


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


NETWORK_NAMES = ("teacher", "round_teacher", "generator", "fake", "target")


def count_evaluations(trainer) -> dict:
    """Count the network evaluations of ``trainer``: every ``Denoiser._forward`` (each call of a teacher, generator,
    fake score or target network, classifier-free guidance's doubled batch being one call) and every truncated
    feature forward (``FakeScore.bottleneck``, the GAN head's input), per network and per kind. Returns a dict
    ``label -> [calls, rows]`` filled as the trainer runs (reset it between iterations); a trainable network
    called under no_grad (a generator's backward simulation, LCM-LoRA's target) is labelled ``... (no grad)``."""
    import torch

    from stepdistill.models import fake_score as fake_module
    from stepdistill.models.denoiser import Denoiser

    names = {id(getattr(trainer, n)): n for n in NETWORK_NAMES if getattr(trainer, n, None) is not None}
    counts: dict = {}

    def label(obj, suffix=""):
        name = names.get(id(obj), type(obj).__name__) + suffix
        if name not in ("teacher", "round_teacher") and not torch.is_grad_enabled():
            name += " (no grad)"
        return name

    def wrap(owner, attr, suffix):
        fn = getattr(owner, attr)

        def counted(self, x_t, *args, **kwargs):
            entry = counts.setdefault(label(self, suffix), [0, 0])
            entry[0] += 1
            entry[1] += x_t.shape[0]
            return fn(self, x_t, *args, **kwargs)

        setattr(owner, attr, counted)

    wrap(Denoiser, "_forward", "")
    if hasattr(fake_module.FakeScore, "bottleneck"):
        wrap(fake_module.FakeScore, "bottleneck", " to the GAN layer")
    return counts


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


def _make(method, gen, fake, steps, batch, fixtures):
    from stepdistill.train import make_trainer

    here = os.path.dirname(os.path.abspath(__file__))
    if method == "sdxl_twin":  # the tiny SDXL twin configurations of bench_speed.py (gen = its config name)
        sys.path.insert(0, here)
        from bench_speed import CONFIGS, overrides

        recipe = os.path.join(here, "..", "recipes", CONFIGS[gen][0])
        return make_trainer(recipe, overrides(gen, *fixtures, steps, batch, "outputs/bench/tmp"))
    recipe = os.path.join(here, "..", "recipes", method, "digits.yaml")
    if method == "progressive":  # one round of `steps` updates (64 -> 32 steps), no per-round export
        per_method = ["start_steps=64", "final_steps=32", f"steps_per_round={steps}", "save_rounds=false"]
    elif method == "progressive_guided":  # `steps` stage-one updates, then one update of a 64 -> 32 round
        recipe = os.path.join(here, "..", "recipes", "progressive", "digits_guided.yaml")
        per_method = ["start_steps=64", "final_steps=32", f"guided_steps={steps}", "steps_per_round=1",
                      "save_rounds=false"]  # fmt: skip
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
    return make_trainer(recipe, overrides)


def child(method: str, gen: str, fake: str, steps: int, batch: int, fixtures=None) -> dict:
    import resource
    import statistics
    import time

    import torch

    torch.set_num_threads(1)
    trainer = _make(method, gen, fake, steps, batch, fixtures)
    trainer.setup()
    cuda = torch.cuda.is_available()
    times, cpu, snapshots = [], [], []
    orig = trainer.on_step_end
    counts = count_evaluations(trainer)

    def stamp(step):
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        cpu.append(time.process_time())
        snapshots.append({k: list(v) for k, v in counts.items()})
        orig(step)

    trainer.on_step_end = stamp
    saved = count_saved_bytes(trainer)  # the generator step's activation memory
    trainer.train()
    if method == "progressive_guided":  # stage one's iterations only (the last one is the round's)
        times, cpu, snapshots = times[:-1], cpu[:-1], snapshots[:-1]
    per_iter = (times[-1] - times[1]) / (len(times) - 2)  # skip the first (warm-up) iterations
    n = len(cpu) - 2
    evals = {
        k: [(v[0] - snapshots[1].get(k, [0, 0])[0]) / n, (v[1] - snapshots[1].get(k, [0, 0])[1]) / n]
        for k, v in snapshots[-1].items()
    }
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    n_params = sum(p.numel() for n in trainer.params.values() for p in n)
    return {
        "seconds_per_iteration": per_iter,
        "cpu_seconds_per_iteration": statistics.median(b - a for a, b in zip(cpu[1:], cpu[2:])),
        "evaluations": {k: v for k, v in evals.items() if v[0] > 0},
        "peak_mb": peak,
        "trainable_params": n_params,
        "generator_saved_mb": saved.get("generator", 0) / 2**20,
        "model_state_mb": model_state_bytes(trainer) / 2**20,
    }


def _evals(e: dict) -> str:
    return ", ".join(f"{k} {c:g} x {r / c:g}" for k, (c, r) in sorted(e.items()) if c)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="outputs/bench/trainers.md")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--twin-batch", type=int, default=4, help="batch of the tiny SDXL twin rows")
    p.add_argument("--rows", default="", help="comma-separated method:generator:fake subset (default: all)")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fixtures", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.batch, args.fixtures)))
        return
    rows = [r for r in ROWS if not args.rows or ":".join(r) in args.rows.split(",")]
    fixtures = []
    if any(m == "sdxl_twin" for m, _, _ in rows):
        import tempfile

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_speed import _fixtures

        fixtures = ["--fixtures", *_fixtures(tempfile.mkdtemp(prefix="bench_trainers_"))]
    results = []
    for method, gen, fake in rows:
        batch = args.twin_batch if method == "sdxl_twin" else args.batch
        cmd = [sys.executable, __file__, "--child", method, gen, fake, "--steps", str(args.steps)]
        cmd += ["--batch", str(batch), *(fixtures if method == "sdxl_twin" else [])]
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")  # this checkout's stepdistill
        path = os.pathsep.join(p for p in (os.path.abspath(root), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results.append(((method, gen, fake), json.loads(out.stdout.strip().splitlines()[-1])))
        print(method, gen, fake, results[-1][1], flush=True)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    lines = [
        f"# Trainers: digits teacher batch {args.batch}, tiny SDXL twin batch {args.twin_batch}, {device}, 1 thread",
        "",
        "DMD2 / SIM / VSD iteration = one generator update + one fake-score update; progressive iteration = two "
        "teacher DDIM steps + one student update; LCM-LoRA iteration = one student update. Evaluations: forward "
        "calls per iteration x rows per call, per network (CFG's doubled batch is one call; 'to the GAN layer': "
        "the fake score run only as far as the GAN head reads). CPU s: median process CPU time per iteration. "
        "Peak MB: " + ("CUDA peak allocated" if torch.cuda.is_available() else "peak RSS of the process"),
        "",
        "| method | generator | fake score | evaluations / iteration (calls x rows) | algorithm's minimum "
        "| CPU s / iteration | wall s / iteration | trainable params | generator-step activations MB "
        "| model state MB | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (m, g, f), r in results:
        lines.append(
            f"| {m} | {g} | {f} | {_evals(r['evaluations'])} | {MINIMUM[(m, g, f)]} "
            f"| {r['cpu_seconds_per_iteration']:.3f} | {r['seconds_per_iteration']:.3f} "
            f"| {r['trainable_params'] / 1e6:.2f} M | {r['generator_saved_mb']:.0f} | {r['model_state_mb']:.1f} "
            f"| {r['peak_mb']:.0f} |"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
