"""CPU time per training iteration of this checkout against another git ref, measured side by side.

``python benchmarks/bench_speed.py --against <git ref>`` checks the ref out into a temporary git worktree and
times both versions alternately (A = the ref, B = this checkout: A B A B ..., ``--pairs`` pairs, at least 3) on
the same tiny SDXL twin (tests/tiny_models.py, latent side 8) and the same overrides:

* ``lcm_lora``: recipes/consistency/lcm_lora_sdxl.yaml (LCM-LoRA, the LoRA is the student, teacher = adapters
  off, target = the LoRA network under no_grad);
* ``dmd2``: recipes/dmd2/sdxl_4step.yaml (4 steps, backward simulation, GAN on) with
  ``dfake_gen_update_ratio=1`` so that every iteration is one generator update + one fake-score update;
* ``dmd2_shared`` (not run unless asked: ``--configs dmd2_shared``): ``dmd2`` with ``share_fake_forward=true``
  (only against a ref that has the key).

Each run is its own process with one thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), fp32, batch
``--batch``; the figure of a run is the median over its iterations (the first two are warm-up and dropped) of
the PROCESS CPU time per iteration (``time.process_time``), which other processes on a loaded machine do not
inflate the way they inflate wall time. Each version reads its own copy of the recipe. Prints every run, the
per-pair ratio B / A and the median ratio per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
CONFIGS = {
    "lcm_lora": ("consistency/lcm_lora_sdxl.yaml", []),
    "dmd2": ("dmd2/sdxl_4step.yaml", ["dfake_gen_update_ratio=1"]),
    # opt-in: DM loss and GAN generator term on one fake forward (a ref before share_fake_forward refuses the key)
    "dmd2_shared": ("dmd2/sdxl_4step.yaml", ["dfake_gen_update_ratio=1", "share_fake_forward=true"]),
}
DEFAULT_CONFIGS = ("lcm_lora", "dmd2")
WARMUP = 2


def _fixtures(root: str) -> tuple[str, str]:
    """A tiny SDXL pipeline folder and a captioned image folder under ``root``."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from diffusers import StableDiffusionXLPipeline
    from tiny_models import save_tiny_pipeline, tiny_sdxl_components

    teacher = save_tiny_pipeline(
        tiny_sdxl_components(os.path.join(root, "src")), StableDiffusionXLPipeline, os.path.join(root, "sdxl")
    )
    folder = os.path.join(root, "images")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
        with open(os.path.join(folder, f"{i}.txt"), "w") as f:
            f.write(["a cat", "a dog", "the cat", "a red dog"][i % 4])
    return teacher, folder


def overrides(config: str, teacher: str, data: str, steps: int, batch: int, out_dir: str) -> list[str]:
    """The overrides of a ``config`` run (both versions get the same)."""
    return [
        f"teacher={teacher}",
        f"dataset={data}",
        "resolution=8",
        f"global_batch={batch}",
        "grad_accum=1",
        f"max_steps={steps}",
        "mixed_precision=no",
        "checkpoint_every=0",
        "sample_every=0",
        "progress=false",
        f"output_dir={out_dir}",
        *CONFIGS[config][1],
    ]


def child(code: str, config: str, teacher: str, data: str, steps: int, batch: int, out_dir: str) -> dict:
    """One timed run of ``config`` with the stepdistill package found under ``code``."""
    sys.path.insert(0, code)
    import time

    import torch

    torch.set_num_threads(1)
    from stepdistill.train import make_trainer

    recipe = os.path.join(code, "recipes", CONFIGS[config][0])
    trainer = make_trainer(recipe, overrides(config, teacher, data, steps, batch, out_dir))
    trainer.setup()
    stamps = []
    orig = trainer.on_step_end

    def stamp(step):
        stamps.append(time.process_time())
        orig(step)

    trainer.on_step_end = stamp
    trainer.train()
    deltas = [b - a for a, b in zip(stamps[WARMUP - 1 :], stamps[WARMUP:])]
    return {"cpu_s_per_iteration": statistics.median(deltas), "iterations": len(deltas)}


def _run(code: str, config: str, args, fixtures, scratch: str) -> float:
    env = dict(os.environ, PYTHONPATH=code, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", code, config, *fixtures, scratch]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch)]
    out = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: the {config} run of {code} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["cpu_s_per_iteration"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", help="git ref of the 'before' version (A)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="iterations per run (the first two are dropped)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated, among " + ", ".join(CONFIGS))
    p.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        code, config, teacher, data, scratch = args.child
        print(json.dumps(child(code, config, teacher, data, args.steps, args.batch, scratch)))
        return
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if not args.against or args.pairs < 3 or args.steps <= WARMUP or unknown:
        p.error(f"need --against REF, --pairs >= 3, --steps > {WARMUP}, configs among {', '.join(CONFIGS)}")
    tmp = tempfile.mkdtemp(prefix="bench_speed_")
    before = os.path.join(tmp, "before")
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--verify", args.against + "^{commit}"], cwd=ROOT, capture_output=True, text=True
        )
        if sha.returncode != 0:
            sys.exit(f"error: --against: {args.against!r} is not a commit of this repository")
        subprocess.run(
            ["git", "worktree", "add", "--detach", before, sha.stdout.strip()],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        print(
            f"A = {args.against} ({sha.stdout.strip()[:10]}), B = this checkout ({here.stdout.strip()}"
            f"{' + uncommitted changes' if dirty else ''}); batch {args.batch}, {args.steps} iterations per run, "
            f"1 thread, process CPU s per iteration (median)",
            flush=True,
        )
        fixtures = _fixtures(os.path.join(tmp, "fixtures"))
        summary = {}
        for config in configs:
            ratios = []
            for i in range(args.pairs):
                a = _run(before, config, args, fixtures, os.path.join(tmp, "run"))
                b = _run(ROOT, config, args, fixtures, os.path.join(tmp, "run"))
                ratios.append(b / a)
                print(f"{config} pair {i + 1}: A {a:.4f} s  B {b:.4f} s  B/A {b / a:.3f}", flush=True)
            summary[config] = statistics.median(ratios)
            print(f"{config}: median B/A {summary[config]:.3f} over {args.pairs} pairs", flush=True)
        print("summary: " + ", ".join(f"{k} {v:.3f}x" for k, v in summary.items()))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", before], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
