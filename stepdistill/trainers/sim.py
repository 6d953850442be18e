"""SIM: score implicit matching (Luo et al., NeurIPS 2024), with SiD's L2 / alpha form as an option
(Zhou et al., ICML 2024).

Same machinery as DMD2 (shared fake score trained by denoising score matching on sg(x_g), generator from
the teacher's weights, export); only the generator loss differs: it is differentiated THROUGH the frozen
teacher and fake score into x_g (DMD2 treats both predictions as constants), with the pseudo-Huber
distance d(y) = sqrt(||y||^2 + c^2) - c on y = D_fake - D_real, or SiD's
(D_r - D_f) . ((D_r - x_g) - alpha (D_r - D_f)), both over sg(mean|x_g - D_r|). Data-free: no real images.
Memory: the generator step keeps the activations of two extra network passes (teacher and fake score), about
3x DMD2's generator-step activation memory (`make bench` measures it).

Example::

    stepdistill train --config recipes/sim/digits.yaml
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..losses import sid_loss, sim_loss
from . import randomness as rnd
from .dmd2 import DMD2Config, DMD2Trainer


@dataclass
class SIMConfig(DMD2Config):
    """SIM settings on top of :class:`DMD2Config` (its GAN / regression options stay available, off).

    distance (`str`, `"pseudo_huber"`): "pseudo_huber" (SIM) or "l2" (SiD's alpha form).
    huber_c (`float`, `1.0`): pseudo-Huber c, in the units of x0 summed over a sample (not verified against
        the paper's value: the official SIM code is inference-only).
    sid_alpha (`float`, `1.2`): SiD's alpha (mingyuanzhou/SiD default; 1.0 is SIM's L2 case).
    dfake_gen_update_ratio (`int`, `1`): SiD / SIM alternate fake-score and generator updates 1:1.
    min_step_percent / max_step_percent (`0.02` / `0.98`): generator-loss timesteps [int(min T), int(max T)]
        (DMD2's range [20, 980]; SiD-LSG draws [20, 980): 0.02 / 0.979; SiD on EDM teachers: 0 / 0.8).
    > SiD on EDM teachers (mingyuanzhou/SiD ``sid_train.py``, ``training/sid_loss.py``; off by default, the family's
    > behaviour, since SIM's own code is not public)
    init_sigma (`float`, `0.0`: off): SiD's fixed generator noise level: the one-step generator reads
        init_sigma * z at sigma = init_sigma (SiD: 2.5) instead of sigma_max z at ``denoising_timesteps``' first
        level. EDM teachers, one step, ``generator_input: noise``; the export's trained timestep is its
        (fractional) position on the Karras grid.
    fake_noise (`str`, `"uniform"`): the fake-score loss's noise levels: "uniform" on the integer timesteps of
        ``fake_min_step_percent`` / ``fake_max_step_percent`` (DMD2) or "lognormal" (SiD: EDM's training draw,
        ln sigma ~ N(fake_p_mean, fake_p_std), unclamped; EDM teachers). Both weight |D_fake - x|^2 by
        sigma^-2 + sigma_data^-2 on EDM teachers (DMD2's and SiD's weight).
    fake_p_mean / fake_p_std (`float`, `-1.2` / `1.2`): SiD's (EDM's) P_mean / P_std.
    """

    distance: str = "pseudo_huber"
    huber_c: float = 1.0
    sid_alpha: float = 1.2
    dfake_gen_update_ratio: int = 1
    init_sigma: float = 0.0
    fake_noise: str = "uniform"
    fake_p_mean: float = -1.2
    fake_p_std: float = 1.2

    def check(self):
        super().check()
        if self.distance not in ("pseudo_huber", "l2"):
            raise ConfigError(f"distance must be 'pseudo_huber' or 'l2', got {self.distance!r}")
        if self.distance == "pseudo_huber" and self.huber_c <= 0:
            raise ConfigError(f"huber_c must be > 0 for the pseudo-Huber distance, got {self.huber_c}")
        if (self.fake_lr or self.learning_rate) <= 0:
            raise ConfigError("SIM needs a trainable fake score: fake_lr (or learning_rate) must be > 0")
        if self.fake_noise not in ("uniform", "lognormal"):
            raise ConfigError(f"fake_noise must be 'uniform' or 'lognormal', got {self.fake_noise!r}")
        if self.fake_p_std <= 0:
            raise ConfigError(f"fake_p_std must be > 0, got {self.fake_p_std}")
        if self.init_sigma < 0:
            raise ConfigError(f"init_sigma must be > 0 (SiD: 2.5), or 0 for off; got {self.init_sigma}")
        if self.init_sigma > 0 and (self.denoising_timesteps or self.generator_input != "noise"):
            raise ConfigError(
                "init_sigma (SiD's fixed generator noise level) sets the one generator step itself; leave "
                f"denoising_timesteps empty (got {self.denoising_timesteps}) and generator_input: noise "
                f"(got {self.generator_input!r})"
            )


class SIMTrainer(DMD2Trainer):
    """SIM / SiD generator loss on DMD2's shared fake-score machinery."""

    config_class = SIMConfig
    method_name = "SIM"

    def _require_edm(self, key: str, value) -> None:
        if self.schedule.kind != "edm":
            raise ConfigError(
                f"{key}={value} is SiD's setting for EDM teachers; this teacher's schedule is {self.schedule.kind!r}"
            )

    def generator_times(self) -> torch.Tensor:
        """SiD's ``init_sigma``: the single generator time is the (off-grid) Karras time of sigma = init_sigma."""
        c = self.config
        if c.init_sigma <= 0:
            return super().generator_times()
        self._require_edm("init_sigma", c.init_sigma)
        p = self.schedule.p
        if not p.sigma_min < c.init_sigma <= p.sigma_max:
            raise ConfigError(
                f"init_sigma={c.init_sigma} is outside the teacher's (sigma_min, sigma_max] = "
                f"({p.sigma_min}, {p.sigma_max}]"
            )
        return self.schedule.t_from_noise_level(torch.tensor([c.init_sigma], dtype=torch.float64))

    def fake_times(self, n: int, device=None) -> torch.Tensor:
        """SiD's ``fake_noise: lognormal``: ln sigma ~ N(P_mean, P_std), not clamped to [sigma_min, sigma_max]
        (EDM's sigma(t) extends past [0, 1]), as SiD's ``SID_EDMLoss.__call__``."""
        c = self.config
        if c.fake_noise != "lognormal":
            return super().fake_times(n, device)
        self._require_edm("fake_noise", c.fake_noise)
        p = self.schedule.p
        sigma = torch.exp(c.fake_p_mean + c.fake_p_std * rnd.randn(n, dtype=torch.float64))
        lo, hi = p.sigma_min ** (1 / p.rho), p.sigma_max ** (1 / p.rho)
        return ((sigma ** (1 / p.rho) - lo) / (hi - lo)).to(device)

    def generator_loss(self, x, cond):
        c = self.config
        t = self.draw_t(x.shape[0], c.min_step_percent, c.max_step_percent, x.device)
        x_t = self.schedule.add_noise(x, rnd.randn_like(x), t)  # no detach: gradients reach x through x_t
        w = c.real_guidance_scale
        d_real = self.real_score.predict_with_input_grad(x_t, t, cond, target="x0", guidance_scale=w)
        # fake-score weights are frozen in this group; SiD-LSG reads it with its own CFG (kappa2 = kappa3)
        d_fake = self.fake.predict(x_t, t, cond, target="x0", guidance_scale=c.fake_guidance_scale)
        if c.distance == "pseudo_huber":
            loss = sim_loss(x.float(), d_real.float(), d_fake.float(), c=c.huber_c)
        else:
            loss = sid_loss(x.float(), d_real.float(), d_fake.float(), alpha=c.sid_alpha)
        return loss, {"loss_sim": loss.detach()}
