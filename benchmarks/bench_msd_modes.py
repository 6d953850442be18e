"""MSD vs one DMD2 student on the exact class-conditional mixture: per-class mode coverage.

Problem: the 8-mode ring of toy2d:gmm8 (radius 2, std 0.1) with 4 classes of 2 opposite modes each (class c =
modes c and c + 4), so every class is bimodal and a one-step student can lose a mode of a class. Teacher: the exact
class-conditional denoiser (stepdistill.models.analytic, DDPM linear VP, v). The students and the fake score start
as a class-conditional ToyMLP regressed onto the exact v (the "teacher copy", as in benchmarks/bench_exact.py).
Rows: one DMD2 student (recipes/dmd2/toy2d.yaml) and MSD with K = 2 and K = 4 routed students
(recipes/msd/toy2d.yaml, the same settings and generator updates; K = 4: one student per class).

Per class, on ``--eval`` samples of that class from fixed noise: each of its modes' share (nearest mean) over its
true share, the least of the two (1: balanced, 0: a mode lost); the share of samples nearest a mode of another
class; the off-mode share (farther than the 99.9% quantile from every mean). One seed (``--seed``).

    python benchmarks/bench_msd_modes.py --out outputs/bench/msd_modes.md
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch
import yaml

from stepdistill.config import build_config
from stepdistill.data.toy2d import GMM_STD, gmm_centers
from stepdistill.io import write_text
from stepdistill.models import Teacher
from stepdistill.models.analytic import GaussianMixture, MixtureDataset, mixture_teacher
from stepdistill.models.toy import ToyMLP
from stepdistill.sampling import sample
from stepdistill.train import trainer_classes
from stepdistill.trainers.student import PlainLabels

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CLASSES = [0, 1, 2, 3, 0, 1, 2, 3]  # class c: the modes at angles c * 45 and c * 45 + 180 degrees
ROWS = [("DMD2, one student", "dmd2", 1), ("MSD, K = 2 routed students", "msd", 2),
        ("MSD, K = 4 routed students (one per class)", "msd", 4)]  # fmt: skip
_PATHS = ("method", "teacher", "output_dir", "dataset", "checkpoint_every", "seed")


def mixture() -> GaussianMixture:
    return GaussianMixture(gmm_centers("gmm8").double(), GMM_STD["gmm8"], classes=CLASSES)


def fit_class_copy(mix, teacher, steps: int, batch: int = 512, seed: int = 0) -> ToyMLP:
    """A class-conditional ToyMLP (v) regressed onto the exact teacher's v at x_t of the forward process."""
    torch.manual_seed(seed)
    net = ToyMLP(dim=2, hidden=128, layers=3, num_class_embeds=mix.num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed + 1)
    sched = teacher.schedule
    for _ in range(steps):
        x0, y = mix.sample(batch, g)
        idx = torch.randint(0, 1000, (batch,), generator=g).double()
        t = sched.timestep_to_t(idx)
        noise = torch.randn(batch, 2, generator=g, dtype=torch.float64)
        x_t = (sched.alpha(t)[:, None] * x0.double() + sched.sigma(t)[:, None] * noise).float()
        with torch.no_grad():
            v = teacher.net(x_t, idx.float(), y)
        loss = (net(x_t, idx.float(), y) - v).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
    return net.eval()


def class_stats(mix, x: torch.Tensor, c: int) -> dict:
    """Coverage of class ``c``'s modes by its samples ``x``."""
    x = x.detach().float().cpu()
    modes = [j for j, k in enumerate(CLASSES) if k == c]
    assign = mix.assign(x)
    true = mix.weights[modes] / mix.weights[modes].sum()
    shares = [float((assign == j).double().mean() / true[i]) for i, j in enumerate(modes)]
    other = float((~torch.isin(assign, torch.tensor(modes))).double().mean())
    return {"min_share": min(shares), "other": other, "off": float(mix.off_mode(x).double().mean())}


@torch.no_grad()
def evaluate(mix, sampler, n: int) -> list[dict]:
    """Per class: ``sampler(noise, cond)`` on ``n`` fixed noises with that label."""
    out = []
    for c in range(mix.num_classes):
        noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1234 + c))
        out.append(class_stats(mix, sampler(noise, PlainLabels(mix.num_classes)(torch.full((n,), c))), c))
    return out


def train(method: str, k: int, mix, teacher, init_net, seed: int, scale: float):
    cls = trainer_classes()[method]
    with open(os.path.join(ROOT, "recipes", method, "toy2d.yaml")) as f:
        cfg = {key: v for key, v in yaml.safe_load(f).items() if key not in _PATHS}
    cfg["max_steps"] = max(5, int(cfg["max_steps"] * scale))
    if method == "msd":
        cfg["num_students"] = k
    out = tempfile.mkdtemp(prefix="bench_msd_modes_")
    cfg.update(output_dir=out, checkpoint_every=0, progress=False, seed=seed)
    trainer = cls(build_config(cls.config_class, cfg), teacher=teacher, generator=copy.deepcopy(init_net).train(),
                  fake_score=copy.deepcopy(init_net).train(), dataset=MixtureDataset(mix, 20000, seed))  # fmt: skip
    t0 = time.time()
    trainer.train()
    updates = cfg["max_steps"] // cfg["dfake_gen_update_ratio"]
    return trainer, f"{cfg['max_steps']} it ({updates} gen.), batch {cfg['global_batch']}", time.time() - t0


def fmt(label, budget, stats, seconds="-") -> str:
    per = " | ".join(f"{s['min_share']:.2f}" for s in stats)
    other = max(s["other"] for s in stats)
    off = sum(s["off"] for s in stats) / len(stats)
    return f"| {label} | {budget} | {per} | {min(s['min_share'] for s in stats):.2f} | {100 * other:.1f}% | " \
           f"{100 * off:.1f}% | {seconds} |"  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench/msd_modes.md")
    p.add_argument("--eval", type=int, default=2000, help="samples per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the recipes' iterations (smoke runs)")
    p.add_argument("--fit-steps", type=int, default=3000, help="regression steps of the teacher copy")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    mix = mixture()
    teacher = mixture_teacher(mix)
    init_net = fit_class_copy(mix, teacher, args.fit_steps, seed=args.seed)
    classes = " | ".join(f"class {c}" for c in range(mix.num_classes))
    lines = [
        f"| model | budget | min mode share: {classes} | worst | other class (worst) | off-mode | train s |",
        "|---|---|" + "---|" * mix.num_classes + "---|---|---|---|",
    ]

    def ddim(net_call):
        return lambda noise, cond: sample(lambda x, t: net_call(x, t, cond), teacher.schedule, noise, 100,
                                          pred_type="v")  # fmt: skip

    copy_teacher = Teacher(init_net, teacher.schedule, "v")
    lines.append(fmt("exact teacher, 100 DDIM steps", "-", evaluate(mix, ddim(teacher.raw), args.eval)))
    lines.append(fmt("teacher copy (init), 100 DDIM steps", "-", evaluate(mix, ddim(copy_teacher.raw), args.eval)))
    print(*lines, sep="\n", flush=True)
    for label, method, k in ROWS:
        trainer, budget, seconds = train(method, k, mix, teacher, init_net, args.seed, args.scale)
        stats = evaluate(mix, trainer.generator.sample, args.eval)
        lines.append(fmt(label, budget, stats, f"{seconds:.0f}"))
        print(lines[-1], flush=True)
    text = "\n".join([f"MSD per-class mode coverage (seed {args.seed}, {args.eval} samples per class, scale "
                      f"{args.scale}, teacher copy fitted {args.fit_steps} steps)", "", *lines])  # fmt: skip
    write_text(args.out, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
