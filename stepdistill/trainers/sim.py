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
        (DMD2's range [20, 980]; SiD-LSG draws [20, 980): 0.02 / 0.979).
    """

    distance: str = "pseudo_huber"
    huber_c: float = 1.0
    sid_alpha: float = 1.2
    dfake_gen_update_ratio: int = 1

    def check(self):
        super().check()
        if self.distance not in ("pseudo_huber", "l2"):
            raise ConfigError(f"distance must be 'pseudo_huber' or 'l2', got {self.distance!r}")
        if self.distance == "pseudo_huber" and self.huber_c <= 0:
            raise ConfigError(f"huber_c must be > 0 for the pseudo-Huber distance, got {self.huber_c}")
        if (self.fake_lr or self.learning_rate) <= 0:
            raise ConfigError("SIM needs a trainable fake score: fake_lr (or learning_rate) must be > 0")


class SIMTrainer(DMD2Trainer):
    """SIM / SiD generator loss on DMD2's shared fake-score machinery."""

    config_class = SIMConfig
    method_name = "SIM"

    def generator_loss(self, x, cond):
        c = self.config
        t = self.draw_t(x.shape[0], c.min_step_percent, c.max_step_percent, x.device)
        x_t = self.schedule.add_noise(x, rnd.randn_like(x), t)  # no detach: gradients reach x through x_t
        d_real = self.teacher.predict_with_input_grad(x_t, t, cond, target="x0", guidance_scale=c.real_guidance_scale)
        # fake-score weights are frozen in this group; SiD-LSG reads it with its own CFG (kappa2 = kappa3)
        d_fake = self.fake.predict(x_t, t, cond, target="x0", guidance_scale=c.fake_guidance_scale)
        if c.distance == "pseudo_huber":
            loss = sim_loss(x.float(), d_real.float(), d_fake.float(), c=c.huber_c)
        else:
            loss = sid_loss(x.float(), d_real.float(), d_fake.float(), alpha=c.sid_alpha)
        return loss, {"loss_sim": loss.detach()}
