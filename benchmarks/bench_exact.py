"""Exact-score benchmark: every method distils a Gaussian-mixture teacher whose denoiser is known in closed form.

The teacher is the exact posterior mean of a Gaussian mixture under the DDPM linear VP schedule (1000 steps):
for data x0 ~ sum_k w_k N(mu_k, s^2 I) and x_t = alpha x0 + sigma eps,

    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu_k)),
    r_k ∝ w_k N(x_t; alpha mu_k, (alpha^2 s^2 + sigma^2) I),

returned as v (``exact_teacher(mixture, "x0")`` gives x0). No teacher error, so what remains is the method's
own. Two problems: ``ring``, 8 modes on a circle of radius 2 in 2-D (std 0.1, the
toy2d:gmm8 set), and ``mix64``, 10 modes in 64 dimensions (means N(0, I), std 0.2, seeded).

Each method trains through its trainer class (DMD2, SIM, VSD, consistency/LCM, progressive) on small MLP
networks (stepdistill.models.toy.ToyMLP): the generator and fake score start as copies of an MLP fitted to the
exact teacher (the "teacher copy", fitted by regression on the exact v target), as they start as copies of a
pretrained teacher in the real setting. Settings: recipes/<method>/toy2d.yaml (the benchmark measures the toy
recipes), with the per-row overrides in ``ROWS``.

Metrics, on ``--eval`` samples from fixed noise:

* ``SW ratio``: sliced Wasserstein-2 distance (256 seeded directions) of the student's samples to fresh mixture
  samples, over the same distance of the exact teacher's 100-step DDIM samples (the floor: finite-sample and
  discretisation error);
* ``min mode share``: the fewest-covered mode's share of the samples (nearest mean) over its true share (1 =
  every mode at its weight, 0 = a mode lost);
* ``off-mode``: share of samples farther from every mean than the 99.9% quantile of the mode's own spread.

Each row is trained with ``--seeds`` seeds; the table gives the mean (and the worst seed for the mode share).
Writes a markdown table to ``--out`` and prints it. ``--quick``: the 2-D problem, one seed, a quarter of the
iterations (a smoke run, not the measured table).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import sys
import tempfile
import time

import torch
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from stepdistill.config import build_config  # noqa: E402
from stepdistill.data import sliced_wasserstein  # noqa: E402
from stepdistill.models import Teacher  # noqa: E402
from stepdistill.models.analytic import GaussianMixture, ddpm_schedule, mixture_teacher, toy_mixture  # noqa: E402
from stepdistill.models.toy import ToyMLP  # noqa: E402
from stepdistill.sampling import sample  # noqa: E402


def problem(name: str) -> GaussianMixture:
    if name not in ("ring", "mix64"):
        raise ValueError(f"unknown problem {name!r}; expected ring or mix64")
    return toy_mixture(name)


def exact_teacher(mixture: GaussianMixture, prediction_type: str = "v") -> Teacher:
    return mixture_teacher(mixture, ddpm_schedule(), prediction_type)


# --------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------
def sw(a: torch.Tensor, b: torch.Tensor) -> float:
    return sliced_wasserstein(a.double(), b.double(), n_proj=256, generator=torch.Generator().manual_seed(0))


def mode_stats(mixture: GaussianMixture, x: torch.Tensor) -> dict:
    return mixture.mode_stats(x)


@torch.no_grad()
def teacher_samples(teacher: Teacher, noise: torch.Tensor, steps: int = 100) -> torch.Tensor:
    return sample(lambda x, t: teacher.raw(x, t), teacher.schedule, noise, steps, pred_type=teacher.prediction_type)


class Evaluator:
    """Fixed noise, fresh reference samples and the teacher's 100-step floor for one problem."""

    def __init__(self, mixture: GaussianMixture, n: int, teacher_prediction: str = "v"):
        self.mixture = mixture
        self.noise = torch.randn(n, mixture.dim, generator=torch.Generator().manual_seed(1234))
        self.ref = mixture.sample(n, torch.Generator().manual_seed(4321))[0]
        self.teacher = exact_teacher(mixture, teacher_prediction)
        self.teacher_x = teacher_samples(self.teacher, self.noise, 100)
        self.floor = sw(self.teacher_x, self.ref)

    def __call__(self, x: torch.Tensor) -> dict:
        x = x.detach().float().cpu()
        if not torch.isfinite(x).all():
            return {"sw": float("inf"), "ratio": float("inf"), "min_share": 0.0, "shares": [], "off_mode": 1.0}
        d = sw(x, self.ref)
        return {"sw": d, "ratio": d / self.floor, **mode_stats(self.mixture, x)}


# --------------------------------------------------------------------------------------------------------
# the teacher copy: the networks every student and fake score start from
# --------------------------------------------------------------------------------------------------------
def net_for(mixture: GaussianMixture, time_scale: float = 1000.0) -> ToyMLP:
    hidden = 128 if mixture.dim <= 2 else 256
    return ToyMLP(dim=mixture.dim, hidden=hidden, layers=3, time_scale=time_scale)


#: ToyMLP ``time_scale`` of the teacher copy of the continuous-time rows (sCD, MeanFlow): sinusoids of at most
#: 999 / SMOOTH_TIME_SCALE * 1000 = 3.3 rad over the whole timestep range, instead of 1 rad per timestep. Their
#: loss differentiates the student in time; with the default embedding that derivative is dominated by
#: timestep-scale wiggles (README "sCM", "MeanFlow").
SMOOTH_TIME_SCALE = 3e5


def fit_teacher_copy(mixture: GaussianMixture, steps: int = 3000, batch: int = 512, seed: int = 0,
                     time_scale: float = 1000.0) -> ToyMLP:
    """A ToyMLP (v-prediction) regressed onto the exact teacher's v at (x_t, t) drawn from the forward process
    (``time_scale``: the ToyMLP's time-embedding scale)."""
    torch.manual_seed(seed)
    net = net_for(mixture, time_scale)
    sched = ddpm_schedule()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x0, _ = mixture.sample(batch, g)
        idx = torch.randint(0, 1000, (batch,), generator=g).double()
        t = sched.timestep_to_t(idx)
        a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
        x_t = (a * x0.double() + s * torch.randn(batch, mixture.dim, generator=g, dtype=torch.float64)).float()
        with torch.no_grad():
            x0_hat = mixture.posterior_mean(x_t, a[:, 0], s[:, 0])
            eps_hat = (x_t.double() - a * x0_hat) / s
            v = (a * eps_hat - s * x0_hat).float()
        loss = (net(x_t, idx.float()) - v).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
    return net.eval()


# --------------------------------------------------------------------------------------------------------
# trainers on the exact teacher
# --------------------------------------------------------------------------------------------------------
def _trainer_classes(method: str):
    """The trainer class of a row's method and its config class (the registry of stepdistill.train)."""
    from stepdistill.train import trainer_classes

    if method not in RECIPE:
        raise ValueError(f"unknown method {method!r}")
    cls = trainer_classes()[RECIPE[method]]
    return cls, cls.config_class


RECIPE = {"dmd2": "dmd2", "sim": "sim", "vsd": "vsd", "lcm": "consistency", "progressive": "progressive", "scm": "scm",
          "meanflow": "meanflow", "fdistill": "fdistill"}
_NOT_SETTINGS = ("method", "teacher", "output_dir", "dataset", "checkpoint_every", "seed")


def recipe_settings(method: str) -> dict:
    """recipes/<method>/toy2d.yaml without its paths (the benchmark supplies teacher, data and output)."""
    with open(os.path.join(ROOT, "recipes", RECIPE[method], "toy2d.yaml")) as f:
        cfg = yaml.safe_load(f)
    return {k: v for k, v in cfg.items() if k not in _NOT_SETTINGS}


def make_trainer(method: str, settings: dict, mixture: GaussianMixture, init_net: ToyMLP, out: str, seed: int,
                 teacher_prediction: str = "v"):
    """The method's trainer through the object API: the exact teacher, a generator (and a fake score for DMD2 /
    SIM / VSD) copied from ``init_net``, and 20000 mixture samples (consistency and progressive noise them; the
    others only count the batch)."""
    cls, cfg_cls = _trainer_classes(method)
    base = dict(settings)
    base.update(output_dir=out, checkpoint_every=0, progress=False, seed=seed)
    for key in ("fake_score_mode", "lora_rank", "lora_target_modules"):  # the objects are trained in full
        base.pop(key, None)
    objects = dict(
        teacher=exact_teacher(mixture, teacher_prediction),
        generator=copy.deepcopy(init_net).train(),
        dataset=mixture.sample(20000, torch.Generator().manual_seed(seed))[0],
        sample_shape=(mixture.dim,),
    )
    if method in ("dmd2", "sim", "vsd", "fdistill"):
        objects["fake_score"] = copy.deepcopy(init_net).train()
    return cls(build_config(cfg_cls, base), **objects)


def empirical_posterior_mean(samples: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """E[x0 | x_t] under the empirical distribution of ``samples`` (float64): the exact denoiser of those points."""
    a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    pts = samples.double()
    d2 = torch.cdist(x_t.double() / a, pts).square()  # |x_t - a x0_i|^2 = a^2 |x_t / a - x0_i|^2
    w = torch.softmax(-0.5 * d2 * (a * a) / (s * s), dim=1)
    return w @ pts


def use_oracle_fake(trainer, n: int = 4096) -> None:
    """Diagnostic: the generator loss reads, instead of the trained fake score, the exact denoiser of ``n`` fresh
    generator samples (drawn at each call). What a perfect fake score would give, up to the finite sample."""
    fake = trainer.fake

    def predict(x_t, t, cond=None, *, target="x0", guidance_scale=None, float64=False):
        with torch.no_grad():
            z = torch.randn(n, *trainer.sample_shape, device=x_t.device)
            pts = trainer.generator(trainer.generator.initial_noise(z), None, trainer.gen_times[0].expand(n))
        t = fake._time(t, x_t)
        a, s = trainer.schedule.alpha(t), trainer.schedule.sigma(t)
        x0 = empirical_posterior_mean(pts, x_t, a, s)
        out = trainer.schedule.convert(x0, x_t.double(), t, "x0", target)
        return out if float64 else out.to(x_t.dtype)

    fake.predict = predict


def generator_samples(trainer, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The trained generator's ``steps``-step samples (its EMA weights when the run keeps an EMA: what export
    writes)."""
    with trainer.export_weights():
        return trainer.generator.sample(noise.to(trainer.accelerator.device), None, num_steps=steps,
                                        generator=torch.Generator().manual_seed(5))


# --------------------------------------------------------------------------------------------------------
# the rows
# --------------------------------------------------------------------------------------------------------
# (label, method, steps evaluated, overrides of the recipe). Budgets: the recipes' max_steps unless overridden.
# "copy_time_scale" (not a config key): the row starts from a teacher copy with that ToyMLP time_scale.
ROWS = [
    ("DMD2 (input t 999, no regression)", "dmd2", (1,), {"denoising_timesteps": [999], "regression_weight": 0.0}),
    ("DMD2", "dmd2", (1,), {}),
    ("DMD2 4-step", "dmd2", (4,), {"denoising_timesteps": [999, 749, 499, 249]}),
    ("f-distill JS", "fdistill", (1,), {}),
    ("f-distill forward KL", "fdistill", (1,), {"f_divergence": "kl"}),
    ("SIM", "sim", (1,), {}),
    ("VSD", "vsd", (1,), {}),
    ("LCM", "lcm", (1, 4), {"inference_steps": 4}),
    ("progressive", "progressive", (1,), {}),
    ("progressive 4-step", "progressive", (4,), {"final_steps": 4}),
    ("sCD", "scm", (1, 2), {"copy_time_scale": SMOOTH_TIME_SCALE}),
    ("MeanFlow distill", "meanflow", (1, 2), {"copy_time_scale": SMOOTH_TIME_SCALE}),
]

def budget(method: str, cfg) -> str:
    """Iterations and generator updates of a run (the cost the table states)."""
    if method == "progressive":
        rounds = int(round(math.log2(cfg.start_steps / cfg.final_steps)))
        return f"{rounds} x {cfg.steps_per_round} it, batch {cfg.global_batch}"
    if method in ("lcm", "scm", "meanflow"):
        return f"{cfg.max_steps} it, batch {cfg.global_batch}"
    r = cfg.dfake_gen_update_ratio
    return f"{cfg.max_steps} it ({cfg.max_steps // r} gen.), batch {cfg.global_batch}"


def run_row(label, method, steps, overrides, mixture, init_net, ev, seed, scale=1.0, trace=0, log=print,
            oracle_fake=False):
    settings = recipe_settings(method)
    settings.update(overrides)
    if scale != 1.0:
        for key in ("max_steps", "steps_per_round"):
            if key in settings:
                settings[key] = max(8, int(settings[key] * scale))
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(method, settings, mixture, init_net, out, seed)
        trainer.setup()
        if oracle_fake:
            use_oracle_fake(trainer)
        total = trainer.config.max_steps if method != "progressive" else None
        t0 = time.time()
        curve = []
        if trace and total:
            for stop in range(trace, total + 1, trace):
                trainer.config.max_steps = stop
                trainer.train()
                curve.append((stop, round(ev(generator_samples(trainer, ev.noise, steps[0]))["ratio"], 3)))
                log(f"  {label} seed {seed} it {stop}: ratio {curve[-1][1]}")
        else:
            trainer.train()
        seconds = time.time() - t0
        res = {n: ev(generator_samples(trainer, ev.noise, n)) for n in steps}
        return {"budget": budget(method, trainer.config), "seconds": seconds, "by_steps": res, "curve": curve}


def fmt_row(problem_name, label, n, results, bud):
    ratios = [r["by_steps"][n]["ratio"] for r in results]
    shares = [r["by_steps"][n]["min_share"] for r in results]
    off = [r["by_steps"][n]["off_mode"] for r in results]
    mean = sum(ratios) / len(ratios)
    spread = max(ratios) - min(ratios)
    ok = mean <= 1.5 and min(shares) >= 0.5
    return (
        f"| {problem_name} | {label} | {n} | {bud} | {mean:.2f} (±{spread / 2:.2f}) | "
        f"{min(shares):.2f} | {100 * sum(off) / len(off):.1f}% | {'yes' if ok else 'no'} |"
    )


HEADER = [
    "| problem | method | steps | budget | SW ratio (mean, ±half range) | min mode share (worst seed) | off-mode "
    "| target met |",
    "|---|---|---|---|---|---|---|---|",
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench/exact.md")
    p.add_argument("--problems", default="ring,mix64")
    p.add_argument("--methods", default="", help="comma-separated row labels (default: every row)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ...")
    p.add_argument("--eval", type=int, default=4000, help="samples per evaluation")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every row's iterations")
    p.add_argument("--trace", type=int, default=0, help="print the SW ratio every N iterations")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of every selected row (YAML value), e.g. --set generator_lr=1e-4")
    p.add_argument("--oracle-fake", action="store_true",
                   help="diagnostic: DMD2 / SIM / VSD read the exact denoiser of 4096 fresh generator samples "
                   "instead of "
                   "the trained fake score in the generator loss")
    p.add_argument("--quick", action="store_true", help="2-D problem, one seed, a quarter of the iterations")
    p.add_argument("--teacher-steps", default="", metavar="N,N,...",
                   help="also rows of the exact teacher's DDIM at these step counts (what a method that distils "
                   "an N-step sampler can reach)")
    args = p.parse_args(argv)
    if args.quick:
        args.problems, args.seeds, args.scale, args.eval = "ring", 1, args.scale * 0.25, min(args.eval, 2000)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = [r for r in ROWS if not wanted or r[0] in wanted]
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key.strip()] = yaml.safe_load(value)
    rows = [(label, method, steps, {**over, **extra}) for label, method, steps, over in rows]
    lines = list(HEADER)
    t_all = time.time()
    for name in args.problems.split(","):
        mixture = problem(name)
        ev = Evaluator(mixture, args.eval)
        ts = ev(ev.teacher_x)
        lines.append(f"| {name} | exact teacher, DDIM | 100 | - | 1.00 (SW {ev.floor:.4f}) | {ts['min_share']:.2f} | "
                     f"{100 * ts['off_mode']:.1f}% | - |")
        print(lines[-1], flush=True)
        for n in [int(v) for v in args.teacher_steps.split(",") if v.strip()]:
            r = ev(teacher_samples(ev.teacher, ev.noise, n))
            lines.append(f"| {name} | exact teacher, DDIM | {n} | - | {r['ratio']:.2f} | {r['min_share']:.2f} | "
                         f"{100 * r['off_mode']:.1f}% | - |")
            print(lines[-1], flush=True)
        copies = {}
        for label, method, steps, overrides in rows:
            overrides = dict(overrides)
            scale = float(overrides.pop("copy_time_scale", 1000.0))
            if scale not in copies:
                copies[scale] = fit_teacher_copy(mixture, steps=750 if args.quick else 3000, time_scale=scale)
                cs = ev(teacher_samples(Teacher(copies[scale], ev.teacher.schedule, "v"), ev.noise, 100))
                what = "teacher copy (init)" + ("" if scale == 1000.0 else f", time_scale {scale:g}")
                lines.append(f"| {name} | {what}, DDIM | 100 | - | {cs['ratio']:.2f} | {cs['min_share']:.2f} | "
                             f"{100 * cs['off_mode']:.1f}% | - |")
                print(lines[-1], flush=True)
            init_net = copies[scale]
            results = [
                run_row(label, method, steps, overrides, mixture, init_net, ev, seed, args.scale, args.trace,
                        oracle_fake=args.oracle_fake and method in ("dmd2", "sim", "vsd"))
                for seed in range(args.first_seed, args.first_seed + args.seeds)
            ]
            for n in steps:
                lines.append(fmt_row(name, label, n, results, results[0]["budget"]))
                seconds = sum(r["seconds"] for r in results)
                print(lines[-1], f"  ({seconds:.0f} s; per-mode shares seed {args.first_seed}: "
                      f"{results[0]['by_steps'][n]['shares']})", flush=True)
    text = "\n".join(
        [
            f"Exact-score benchmark ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{args.seeds} seed(s), {args.eval} samples, scale {args.scale}, {time.time() - t_all:.0f} s)",
            *([f"Overrides of every row: {', '.join(args.set)}"] if args.set else []),
            *(["Oracle fake score (diagnostic)"] if args.oracle_fake else []),
            "",
            *lines,
        ]
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, args.out)
    print(text)


if __name__ == "__main__":
    main()
