"""DisBack's claim, measured: backtracking speeds up the early training of the base method (DMD2) at equal generator
updates.

Problem: the analytic 8-mode ring (stepdistill.models.analytic, the exact teacher; no teacher error). Both runs
start from the same "teacher copy" (a ToyMLP regressed onto the exact teacher, benchmarks/bench_exact.py) as
generator and fake score, and use recipes/disback/toy2d.yaml's settings (DMD2's toy settings):

* **DMD2**: the base method alone, ``max_steps - degradation_steps`` iterations;
* **DisBack**: ``degradation_steps`` fake-score-only iterations (recording ``degradation_nodes`` nodes), then the
  same number of DMD2 iterations as the baseline with the real score walking back along the nodes.

Both make the same generator updates; DisBack spends ``degradation_steps`` extra fake-score iterations (stated in
the table). The metric is the SW ratio of bench_exact (sliced Wasserstein-2 of 4000 one-step samples to fresh
mixture samples, over the exact teacher's 100-step DDIM floor) after 25%, 50% and 100% of the generator updates,
the mean over ``--seeds`` seeds (± half the range), with the minimum mode share of the worst seed at 100%.
Variants (``--variants``): "recipe" (input timestep 399 and DMD v1's regression term, as the toy recipes) and
"t999" (input timestep 999, no regression: a one-step generator that starts collapsed at the data mean, far from
the teacher: where a path between the two should matter most); "recipe_every5" / "t999_every5": the same with
``backtrack_every: 5`` (the whole path in 9 generator updates instead of 36; DMD2 does not read the key).

    python benchmarks/bench_disback.py --out outputs/bench/disback.md
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time

import torch
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

from bench_exact import Evaluator, exact_teacher, fit_teacher_copy, generator_samples  # noqa: E402

from stepdistill.config import build_config  # noqa: E402
from stepdistill.models.analytic import toy_mixture  # noqa: E402
from stepdistill.trainers.disback import DisBackConfig, DisBackTrainer  # noqa: E402
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer  # noqa: E402

_NOT_SETTINGS = ("method", "teacher", "output_dir", "dataset", "checkpoint_every", "seed", "fake_score_mode")
DISBACK_KEYS = ("base_method", "degradation_steps", "degradation_nodes", "backtrack_every", "degradation_dir",
                "node_dtype")
VARIANTS = {
    "recipe": {},
    "t999": {"denoising_timesteps": [999], "regression_weight": 0.0},
    # the whole path in 45 iterations (9 generator updates) instead of 180: a faster walk back
    "recipe_every5": {"backtrack_every": 5},
    "t999_every5": {"denoising_timesteps": [999], "regression_weight": 0.0, "backtrack_every": 5},
}
FRACTIONS = (0.25, 0.5, 1.0)


def settings(variant: str) -> dict:
    with open(os.path.join(ROOT, "recipes", "disback", "toy2d.yaml")) as f:
        cfg = yaml.safe_load(f)
    out = {k: v for k, v in cfg.items() if k not in _NOT_SETTINGS}
    out.update(VARIANTS[variant])
    return out


def run(method: str, variant: str, mixture, init_net, ev, seed: int, scale: float = 1.0) -> dict:
    """SW ratios after each fraction of the generator updates (same updates for both methods)."""
    s = settings(variant)
    stage1 = max(int(s["degradation_steps"] * scale), s["degradation_nodes"])
    stage2 = int((s["max_steps"] - s["degradation_steps"]) * scale)
    s["backtrack_every"] = max(1, int(s["backtrack_every"] * scale))
    if method == "dmd2":
        for key in DISBACK_KEYS:
            s.pop(key, None)
        s["max_steps"], start, cls, cfg_cls = stage2, 0, DMD2Trainer, DMD2Config
    else:
        s["degradation_steps"], s["max_steps"] = stage1, stage1 + stage2
        start, cls, cfg_cls = stage1, DisBackTrainer, DisBackConfig
    with tempfile.TemporaryDirectory() as out:
        s.update(output_dir=out, checkpoint_every=0, progress=False, seed=seed)
        trainer = cls(
            build_config(cfg_cls, s),
            teacher=exact_teacher(mixture),
            generator=copy.deepcopy(init_net).train(),
            fake_score=copy.deepcopy(init_net).train(),
            dataset=mixture.sample(20000, torch.Generator().manual_seed(seed))[0],
            sample_shape=(mixture.dim,),
        )
        trainer.setup()
        t0 = time.time()
        res = {}
        for frac in FRACTIONS:
            trainer.config.max_steps = start + int(round(frac * stage2))
            trainer.train()
            res[frac] = ev(generator_samples(trainer, ev.noise, 1))
        updates = int(trainer.opts["generator"].state_dict()["state"][0]["step"])
        return {"res": res, "seconds": time.time() - t0, "updates": updates, "iterations": trainer.global_step}


def run_digits(method: str, seed: int, num_samples: int, out: str) -> dict:
    """FD-digits of the one-step student after each fraction of the generator updates: recipes/dmd2/digits.yaml
    against recipes/disback/digits.yaml (the same DMD2 keys, plus degradation_steps in front)."""
    from bench_quality import student_samples

    from stepdistill.eval.fd_digits import FDDigits
    from stepdistill.train import make_trainer

    recipe = os.path.join(ROOT, "recipes", method, "digits.yaml")
    over = [f"output_dir={out}", "checkpoint_every=0", "sample_every=0", "progress=false", f"seed={seed}",
            "overwrite=true"]
    trainer = make_trainer(recipe, over)
    trainer.setup()
    start = getattr(trainer.config, "degradation_steps", 0)
    stage2 = trainer.config.max_steps - start
    fd = FDDigits()
    t0, res = time.time(), {}
    for frac in FRACTIONS:
        trainer.config.max_steps = start + int(round(frac * stage2))
        trainer.train()
        res[frac] = fd.score(student_samples(trainer, num_samples))
        print(f"  digits {method} seed {seed} at {frac:.0%}: FD-digits {res[frac]:.3f}", flush=True)
    updates = int(trainer.opts["generator"].state_dict()["state"][0]["step"])
    return {"fd": res, "seconds": time.time() - t0, "updates": updates, "iterations": trainer.global_step}


def main_digits(args):
    head = "| problem | method | generator updates (iterations) | " + " | ".join(
        f"FD-digits at {int(100 * f)}%" for f in FRACTIONS) + " | seconds |"
    lines = [head, "|" + "---|" * (4 + len(FRACTIONS))]
    for method in args.methods.split(","):
        r = run_digits(method, 0, args.num_samples, os.path.join(os.path.dirname(args.out) or ".", f"digits_{method}"))
        label = "DMD2" if method == "dmd2" else "DisBack (DMD2 base)"
        lines.append(f"| digits | {label} | {r['updates']} ({r['iterations']}) | "
                     + " | ".join(f"{r['fd'][f]:.3f}" for f in FRACTIONS) + f" | {r['seconds']:.0f} |")
        print(lines[-1], flush=True)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench/disback.md")
    p.add_argument("--variants", default="recipe,t999")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--eval", type=int, default=4000)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the iterations (0.25: a smoke run)")
    p.add_argument("--quick", action="store_true", help="one seed, a quarter of the iterations (not the table)")
    p.add_argument("--problem", default="ring", choices=["ring", "digits"],
                   help="digits: recipes/dmd2/digits.yaml vs recipes/disback/digits.yaml, one seed (30-45 min each)")
    p.add_argument("--methods", default="dmd2,disback",
                   help="which runs, one after the other in this process (digits: one --methods per process, each "
                   "with its own --out, lets the runs be queued separately)")
    p.add_argument("--num-samples", type=int, default=1000, help="digits: samples per FD-digits")
    args = p.parse_args(argv)
    if args.problem == "digits":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
        t0 = time.time()
        lines = main_digits(args)
        _write(args.out, [f"DisBack vs DMD2 on digits ({platform.processor() or platform.machine()}, torch "
                          f"{torch.__version__}, seed 0, {args.num_samples} samples, {time.time() - t0:.0f} s)", "",
                          *lines])
        return
    if args.quick:
        args.seeds, args.scale, args.eval = 1, args.scale * 0.25, min(args.eval, 2000)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    mixture = toy_mixture("ring")
    init_net = fit_teacher_copy(mixture, steps=750 if args.quick else 3000)
    ev = Evaluator(mixture, args.eval)
    head = "| variant | method | generator updates (iterations) | " + " | ".join(
        f"SW ratio at {int(100 * f)}%" for f in FRACTIONS) + " | min mode share at 100% (worst seed) |"
    lines = [head, "|" + "---|" * (4 + len(FRACTIONS))]
    t_all = time.time()
    for variant in args.variants.split(","):
        for method in args.methods.split(","):
            runs = [run(method, variant, mixture, init_net, ev, seed, args.scale) for seed in range(args.seeds)]
            cells = []
            for f in FRACTIONS:
                r = [x["res"][f]["ratio"] for x in runs]
                cells.append(f"{sum(r) / len(r):.2f} (±{(max(r) - min(r)) / 2:.2f})")
            share = min(x["res"][1.0]["min_share"] for x in runs)
            label = "DMD2" if method == "dmd2" else "DisBack (DMD2 base)"
            lines.append(f"| {variant} | {label} | {runs[0]['updates']} ({runs[0]['iterations']}) | "
                         + " | ".join(cells) + f" | {share:.2f} |")
            print(lines[-1], f"  ({sum(x['seconds'] for x in runs):.0f} s)", flush=True)
    _write(args.out, [
        f"DisBack vs DMD2 on the exact ring ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.seeds} seed(s), {args.eval} samples, scale {args.scale}, {time.time() - t_all:.0f} s)",
        "", *lines,
    ])


def _write(out: str, lines: list[str]) -> None:
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    print(text)


if __name__ == "__main__":
    main()
