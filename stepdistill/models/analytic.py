"""An analytic teacher: a Gaussian mixture whose denoiser (posterior mean of x0) is known in closed form.

For data x0 ~ sum_k w_k N(mu_k, s^2 I) and x_t = alpha x0 + sigma eps,

    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu_k)),
    r_k ∝ w_k N(x_t; alpha mu_k, (alpha^2 s^2 + sigma^2) I).

Given a class label y, the same formula over the components of class y only is the exact class-conditional
denoiser. Tests and benchmarks distil this teacher with no trained network and no teacher error:

    mix = toy_mixture("ring")                      # 8 modes on a circle of radius 2 (the toy2d:gmm8 set)
    teacher = mixture_teacher(mix)                 # Teacher(MixtureDenoiser(...), DDPM linear VP, "v")
    teacher = mixture_teacher(mix, EDMSchedule(), "edm")   # any VP / EDM / flow schedule and prediction type

With ``dataset: toy2d:gmm8`` (whose label is the mode index) the trainers pass the labels as ``cond``: the teacher
is then the class-conditional mixture (class k = mode k).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from ..schedules import NoiseSchedule, VPSchedule, normalize_prediction_type
from .teacher import Teacher

__all__ = [
    "GaussianMixture",
    "MixtureDataset",
    "MixtureDenoiser",
    "ddpm_schedule",
    "mixture_teacher",
    "toy_mixture",
]


class GaussianMixture:
    """sum_k w_k N(mu_k, std^2 I), float64. ``classes`` (K,) gives each component's class label (default: its
    index, so class k = mode k); several components may share a class."""

    def __init__(self, means, std: float, weights=None, classes=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be (K, D), got shape {tuple(self.means.shape)}")
        self.std = float(std)
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        k = len(self.means)
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        self.weights = (w / w.sum()).to(torch.float64)
        c = torch.arange(k) if classes is None else torch.as_tensor(classes, dtype=torch.long)
        if c.shape != (k,) or c.min() < 0:
            raise ValueError(f"classes must be {k} non-negative class labels, got {c.tolist()}")
        self.classes = c

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.classes.max()) + 1

    def sample(self, n: int, generator: torch.Generator | None = None, labels: torch.Tensor | None = None):
        """``n`` samples (float32) and their class labels. With ``labels`` (n,), each sample is drawn from the
        components of its class (weights renormalised within the class)."""
        if labels is None:
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            w = self._class_mask(torch.as_tensor(labels)) * self.weights[None]
            comp = torch.multinomial(w, 1, generator=generator)[:, 0]
        x = self.means[comp] + self.std * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return x.float(), self.classes[comp]

    def _class_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, K) float64: 1 where component k belongs to the sample's class."""
        labels = labels.reshape(-1).long().cpu()
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class labels must be in [0, {self.num_classes}), got {labels.unique().tolist()}")
        return (self.classes[None] == labels[:, None]).double()

    def posterior_mean(self, x_t: torch.Tensor, alpha, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        """E[x0 | x_t] (float64, differentiable in x_t) for per-sample alpha, sigma ((N,) or scalars); with
        ``labels`` (N,), E[x0 | x_t, y]."""
        x = x_t.double().reshape(x_t.shape[0], -1)
        a = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).reshape(-1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        mu = self.means.to(x.device)
        var = a * a * self.std**2 + s * s  # (N, 1): the variance of each component of x_t
        diff = x[:, None, :] - a[:, None, :] * mu[None]  # (N, K, D)
        logw = torch.log(self.weights.to(x.device))[None]
        if labels is not None:
            logw = logw + torch.log(self._class_mask(labels)).to(x.device)
        r = torch.softmax(logw - 0.5 * diff.square().sum(-1) / var, dim=1)  # (N, K)
        comp = mu[None] + (a * self.std**2 / var)[:, None, :] * diff  # (N, K, D): E[x0 | x_t, k]
        return (r[:, :, None] * comp).sum(1).reshape(x_t.shape)

    # ---- metrics --------------------------------------------------------------------------------
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest mean of each sample."""
        return torch.cdist(x.double().reshape(len(x), -1), self.means).argmin(1)

    def off_mode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples farther from every mean than the 99.9% quantile of a component's own spread (chi-square with
        D degrees of freedom, Wilson-Hilferty approximation)."""
        d = self.dim
        z = 3.0902  # the 99.9% normal quantile
        q = d * (1 - 2 / (9 * d) + z * math.sqrt(2 / (9 * d))) ** 3
        d2 = torch.cdist(x.double().reshape(len(x), -1), self.means).min(1).values.square() / self.std**2
        return d2 > q

    def mode_stats(self, x: torch.Tensor) -> dict:
        """min over modes of (share / true share), the per-mode shares, and the off-mode fraction."""
        counts = torch.bincount(self.assign(x), minlength=len(self.means)).double()
        share = counts / len(x)
        return {
            "min_share": float((share / self.weights).min()),
            "shares": [round(float(v), 4) for v in share],
            "off_mode": float(self.off_mode(x).double().mean()),
        }


def toy_mixture(name: str) -> GaussianMixture:
    """``ring`` (alias ``gmm8``): 8 modes on a circle of radius 2, std 0.1 (toy2d:gmm8); ``gmm25``: the 5x5 grid
    on {-2..2}^2, std 0.05 (toy2d:gmm25); ``mix64``: 10 modes in 64-D, means N(0, I) seeded 64, std 0.2."""
    from ..data.toy2d import GMM_STD, gmm_centers

    if name in ("ring", "gmm8"):
        return GaussianMixture(gmm_centers("gmm8").double(), GMM_STD["gmm8"])
    if name == "gmm25":
        return GaussianMixture(gmm_centers("gmm25").double(), GMM_STD["gmm25"])
    if name == "mix64":
        g = torch.Generator().manual_seed(64)
        return GaussianMixture(torch.randn(10, 64, generator=g, dtype=torch.float64), 0.2)
    raise ValueError(f"unknown mixture {name!r}; expected ring, gmm8, gmm25 or mix64")


def ddpm_schedule() -> VPSchedule:
    """The DDPM linear schedule (1000 steps, beta 1e-4 .. 0.02): alpha at timestep 999 is 0.0064."""
    return VPSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})


class MixtureDenoiser(torch.nn.Module):
    """The exact denoiser as a plain callable ``net(x_in, timestep, cond)`` under ``schedule``: it receives what
    a network receives (``schedule.model_input(x_t, t)`` and ``schedule.model_time(t)``; EDM: c_in x_t and c_noise)
    and returns the posterior mean as ``prediction_type``. ``cond``: None or int64 class labels (B,). No
    parameters."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule, prediction_type: str = "v"):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule
        self.prediction_type = schedule.check_prediction_type(normalize_prediction_type(prediction_type))

    def _t(self, timestep: torch.Tensor) -> torch.Tensor:
        ts = torch.as_tensor(timestep, dtype=torch.float64).cpu()
        if self.schedule.kind == "edm":  # c_noise = ln(sigma) / 4
            return self.schedule.t_from_noise_level(torch.exp(4 * ts))
        return self.schedule.timestep_to_t(ts)

    def forward(self, x_in, timestep, cond=None):
        t = self._t(timestep).to(x_in.device)
        t = t.expand(x_in.shape[0]) if t.ndim == 0 else t
        sch = self.schedule
        x_t = x_in.double()
        if sch.kind == "edm":  # undo the preconditioning c_in
            x_t = x_t / sch.scalings(t)[2].reshape(-1, *[1] * (x_in.ndim - 1)).to(x_t)
        a, s = sch.alpha(t).to(x_t), sch.sigma(t).to(x_t)
        x0 = self.mixture.posterior_mean(x_t, a, s, cond)
        if self.prediction_type == "x0":
            return x0.to(x_in.dtype)
        eps = (x_t - a.reshape(-1, *[1] * (x_t.ndim - 1)) * x0) / s.reshape(-1, *[1] * (x_t.ndim - 1))
        return sch.from_x0_eps(x0, eps, x_t, t, self.prediction_type).to(x_in.dtype)


def mixture_teacher(mixture: GaussianMixture, schedule: NoiseSchedule | None = None,
                    prediction_type: str = "v") -> Teacher:
    """A :class:`Teacher` with the exact denoiser (default: DDPM linear VP schedule, v-prediction)."""
    sched = schedule if schedule is not None else ddpm_schedule()
    return Teacher(MixtureDenoiser(mixture, sched, prediction_type), sched, prediction_type)


class MixtureDataset(Dataset):
    """``n`` samples of a mixture as ``{"image": (D,) float32, "label": int64}`` (the component's class): an
    object for the trainers' ``dataset=`` argument."""

    def __init__(self, mixture: GaussianMixture, n: int, seed: int = 0):
        self.x, self.labels = mixture.sample(n, torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.labels[i]}
