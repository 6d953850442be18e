"""The analytic Gaussian-mixture teacher (stepdistill.models.analytic): its denoiser against Tweedie's formula on
the mixture's log-density (autograd, an independent route), class-conditional restriction, every schedule kind and
prediction type, and use as a callable Teacher by a trainer on labelled toy data."""

import math

import pytest
import torch

from stepdistill.models.analytic import (
    GaussianMixture,
    MixtureDataset,
    MixtureDenoiser,
    ddpm_schedule,
    mixture_teacher,
    toy_mixture,
)
from stepdistill.schedules import EDMSchedule, FlowSchedule


def log_density(mix: GaussianMixture, x_t, a, s, labels=None):
    """log p(x_t) of the noised mixture, written directly (not through posterior_mean)."""
    var = a * a * mix.std**2 + s * s
    d = mix.dim
    out = []
    for i in range(len(x_t)):
        terms = []
        for k in range(len(mix.means)):
            if labels is not None and int(mix.classes[k]) != int(labels[i]):
                continue
            diff = x_t[i] - a[i] * mix.means[k]
            terms.append(math.log(mix.weights[k]) - 0.5 * diff.square().sum() / var[i] - 0.5 * d * torch.log(
                2 * math.pi * var[i]))
        out.append(torch.logsumexp(torch.stack(terms), 0))
    return torch.stack(out)


@pytest.mark.parametrize("conditional", [False, True])
def test_posterior_mean_is_tweedie(conditional):
    mix = GaussianMixture(torch.tensor([[2.0, 0.0], [-1.0, 1.0], [0.0, -2.0]]), 0.3, weights=[0.5, 0.3, 0.2],
                          classes=[0, 1, 0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64).requires_grad_()
    a = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1, 0.95], dtype=torch.float64)
    s = (1 - a * a).sqrt()
    labels = torch.tensor([0, 1, 0, 1, 0, 0]) if conditional else None
    (score,) = torch.autograd.grad(log_density(mix, x, a, s, labels).sum(), x)
    tweedie = (x + (s * s)[:, None] * score) / a[:, None]  # E[x0 | x_t] = (x_t + sigma^2 grad log p) / alpha
    torch.testing.assert_close(mix.posterior_mean(x.detach(), a, s, labels), tweedie.detach())


def test_class_conditional_sampling_and_single_component_class():
    mix = toy_mixture("gmm8")
    x, y = mix.sample(400, torch.Generator().manual_seed(0), labels=torch.full((400,), 3))
    assert (y == 3).all() and (mix.assign(x) == 3).all()
    # a class with one component: the posterior is that Gaussian's, whatever x_t is
    x_t = torch.randn(5, 2, dtype=torch.float64)
    a, s = torch.full((5,), 0.6, dtype=torch.float64), torch.full((5,), 0.8, dtype=torch.float64)
    mu, v = mix.means[3], mix.std**2
    want = mu + 0.6 * v / (0.36 * v + 0.64) * (x_t - 0.6 * mu)
    torch.testing.assert_close(mix.posterior_mean(x_t, a, s, torch.full((5,), 3)), want)
    with pytest.raises(ValueError, match="class labels"):
        mix.posterior_mean(x_t, a, s, torch.full((5,), 8))


@pytest.mark.parametrize(
    "schedule,pred",
    [(ddpm_schedule(), "v"), (ddpm_schedule(), "eps"), (ddpm_schedule(), "x0"), (EDMSchedule(), "edm"),
     (EDMSchedule(), "x0"), (FlowSchedule(), "flow")],
)
def test_teacher_returns_the_posterior_mean_under_every_schedule(schedule, pred):
    mix = toy_mixture("ring")
    teacher = mixture_teacher(mix, schedule, pred)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    x_t = schedule.add_noise(torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), t).float()
    got = teacher.predict(x_t, t, None, target="x0")
    want = mix.posterior_mean(x_t, schedule.alpha(t), schedule.sigma(t))
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-4)


def test_mixture_dataset_and_denoiser_checks():
    mix = toy_mixture("mix64")
    assert mix.dim == 64 and mix.num_classes == 10
    d = MixtureDataset(mix, 16)
    assert d[0]["image"].shape == (64,) and d[0]["label"].dtype == torch.long
    with pytest.raises(ValueError, match="prediction"):
        MixtureDenoiser(mix, FlowSchedule(), "edm")
    with pytest.raises(ValueError, match="unknown mixture"):
        toy_mixture("ring9")


def test_conditional_trainer_passes_labels_to_the_analytic_teacher(tmp_path):
    from stepdistill.models.toy import ToyMLP
    from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer

    mix = toy_mixture("gmm8")
    teacher = mixture_teacher(mix)
    seen = []
    teacher.net.register_forward_hook(lambda m, args, out: seen.append(args[2]))
    cfg = DMD2Config(output_dir=str(tmp_path), max_steps=2, global_batch=8, checkpoint_every=0, progress=False)
    gen, fake = ToyMLP(dim=2, hidden=16, layers=2), ToyMLP(dim=2, hidden=16, layers=2)
    DMD2Trainer(cfg, teacher=teacher, generator=gen, fake_score=fake, dataset=MixtureDataset(mix, 64)).train()
    assert seen and all(c is not None and c.dtype == torch.long and int(c.max()) < 8 for c in seen)
