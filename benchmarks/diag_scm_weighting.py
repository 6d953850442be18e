"""Where sCD's update goes, by noise level: the exact-score ring, the benchmark's smooth-time teacher copy, the toy
recipe with the learned adaptive weighting and the prior weight on or off (README "sCM", "The weighting, traced").

Every ``--every`` iterations it prints the 1-step sliced-W2 ratio of ``bench_exact.py`` and, over the last 100
iterations and per bin of noise level sigma_d tan(that), the raw tangent's RMS (before normalisation), the effective
weight w / e^u of the loss (w = 1 / (sigma_d tan that), 1 with the prior off; u = 0 without the head) and the
update size: that weight times the normalised tangent's RMS (the generator's gradient is w / e^u (-2 g / D) dF).

    python benchmarks/diag_scm_weighting.py --adaptive on           # the paper's weighting: prior x adaptive
    python benchmarks/diag_scm_weighting.py --adaptive off          # prior only
    python benchmarks/diag_scm_weighting.py --adaptive off --prior off   # unweighted (the toy recipe)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_exact as B  # noqa: E402

from stepdistill.trainers import scm as S  # noqa: E402

BINS = (0.0, 0.5, 2.0, 10.0, float("inf"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adaptive", choices=("on", "off"), default="on", help="the learned log-variance u")
    p.add_argument("--prior", choices=("on", "off"), default="on", help="the prior weight 1 / (sigma_d tan that)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    mixture = B.problem("ring")
    ev = B.Evaluator(mixture, 2000)
    init = B.fit_teacher_copy(mixture, steps=3000, time_scale=B.SMOOTH_TIME_SCALE)
    settings = B.recipe_settings("scm")
    settings.update(adaptive_weighting=args.adaptive == "on", prior_weighting=args.prior == "on", max_steps=args.steps)
    records, current = [], {}

    # record the pieces of each iteration's loss where the trainer computes them (read-only wrappers)
    normalize, loss, sample_t = S.normalize_tangent, S.scm_loss, S.sample_t_hat

    def normalize_rec(g, c=0.1):
        current["raw"] = g.flatten(1).square().mean(1).sqrt()
        return normalize(g, c)

    def loss_rec(F, g, logvar=None, weight=None):
        eff = torch.ones(F.shape[0], dtype=torch.float64) if weight is None else weight.detach()
        if logvar is not None:
            eff = eff * torch.exp(-logvar.detach())
        current["eff"], current["g"] = eff, g.flatten(1).square().mean(1).sqrt()
        records.append(dict(current))
        return loss(F, g, logvar, weight)

    def sample_rec(*a, **k):
        current["t"] = sample_t(*a, **k)
        return current["t"]

    S.normalize_tangent, S.scm_loss, S.sample_t_hat = normalize_rec, loss_rec, sample_rec
    with tempfile.TemporaryDirectory() as out:
        trainer = B.make_trainer("scm", settings, mixture, init, out, args.seed)
        trainer.setup()
        sigma_d = trainer.config.sigma_data
        for stop in range(args.every, args.steps + 1, args.every):
            trainer.config.max_steps = stop
            trainer.train()
            ratio = ev(B.generator_samples(trainer, ev.noise, 1))["ratio"]
            last = records[-100:]
            level = sigma_d * torch.tan(torch.cat([r["t"] for r in last]))
            raw, eff, g = (torch.cat([r[k] for r in last]) for k in ("raw", "eff", "g"))
            parts = []
            for lo, hi in zip(BINS[:-1], BINS[1:]):
                m = (level >= lo) & (level < hi)
                if m.any():
                    parts.append(f"[{lo:g}, {hi:g}) raw {raw[m].mean():.3f} weight {eff[m].mean():.3g} "
                                 f"update {(eff[m] * g[m]).mean():.3g}")
            print(f"it {stop} ratio {ratio:.2f} | " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
