"""SFD: score forgetting distillation (Chen, Zhang, Zhou, ICLR 2025; tqch/score-forgetting-distillation).

Machine unlearning during one-step distillation. SFD is SiD (``sim.py`` with ``distance: l2``) run on two
batches per update: a *remaining* batch whose conditions come from the data without the concept to forget
(labels only, data-free), and a *forget* batch whose condition is the concept to forget c_f. On the forget
batch the teacher is read at the *remapped* (override) condition c_o, so the generator's c_f-conditional
distribution is pulled to the teacher's c_o-conditional one:

    L_fake = w_sr DSM(fake; sg G(z, c), c) + w_sf DSM(fake; sg G(z, c_f), c_f)
    L_G    = w_gr SiD(G(z, c);   teacher(., c),   fake(., c))
           + w_gf SiD(G(z, c_f); teacher(., c_o), fake(., c_f))

(``DDPM/runners/diffusion.py::train_sfd`` and ``DDPM/functions/losses.py::sid_g_loss_conditional`` at
3771028; text-to-image: ``SD/training/training_loop.py``, ``SD/run_sfd.sh``.) Class-conditional teachers:
``forget_labels`` -> ``remap_labels``; text-conditional teachers: prompts matching the regular expression
``forget_concept`` (case-insensitive) are forgotten, and the teacher reads them with the match replaced by
``remap_concept`` (SFD's ``re.sub(concept_to_forget, concept_to_override, prompt, IGNORECASE)``).

Example::

    stepdistill train --config recipes/sfd/digits.yaml
    stepdistill eval --pipeline outputs/sfd_digits/pipeline --forget-label 0 --remap-label 1
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from ..losses import sid_loss, sim_loss
from . import randomness as rnd
from .sim import SIMConfig, SIMTrainer
from .student import DistillDataset

# --------------------------------------------------------------------------------------------------------
# pure pieces
# --------------------------------------------------------------------------------------------------------


def sfd_forget_term(x_forget: torch.Tensor, x0_teacher_override: torch.Tensor, x0_fake_forget: torch.Tensor,
                    alpha: float = 1.2) -> torch.Tensor:
    """SFD's forgetting term (``sid_g_loss_conditional`` with ``p_c`` = the override label, ``sg_c`` = the
    forget label): SiD's loss :func:`stepdistill.losses.sid_loss` with D_real = the teacher at c_o and D_fake =
    the fake score at c_f, both at x_t of the generator's c_f samples."""
    return sid_loss(x_forget, x0_teacher_override, x0_fake_forget, alpha=alpha)


def remap_labels(labels: torch.Tensor, forget: list[int], remap: list[int]) -> torch.Tensor:
    """Each label in ``forget`` replaced by its override (``remap[i]``, or ``remap[0]`` for all when one is
    given); other labels unchanged (SFD's ``label_to_override``)."""
    out = labels.clone()
    for i, f in enumerate(forget):
        out[labels == f] = remap[i] if len(remap) > 1 else remap[0]
    return out


def remap_prompt(prompt: str, pattern: str, replacement: str) -> str:
    """SFD's override prompt: ``re.sub(pattern, replacement, prompt, flags=re.IGNORECASE)``
    (``SD/training/dataset.py``, ``ForgetPromptDataset``)."""
    return re.sub(pattern, replacement, prompt, flags=re.IGNORECASE)


# --------------------------------------------------------------------------------------------------------


@dataclass
class SFDConfig(SIMConfig):
    """SFD settings on top of :class:`~stepdistill.trainers.sim.SIMConfig`. The defaults are the official
    DDPM / CIFAR-10 ones (tqch/score-forgetting-distillation at 3771028, ``DDPM/configs/cifar10_sfd.yml``);
    the recipes adapt them to their budgets.

    > What to forget (one of the two)
    forget_labels (`list[int]`, `[]`): class labels to forget (class-conditional teachers; SFD: 0).
    remap_labels (`list[int]`, `[]`): the override class of each forget label, or one for all (SFD's
        ``label_to_override``: 1). A remap label must be a class of the data and not itself forgotten.
    forget_concept (`str`, `""`): text-conditional teachers: a regular expression (case-insensitive) naming the
        concept to forget (SFD: "brad pitt").
    remap_concept (`str`, `""`): what the teacher reads in its place (SFD: "a middle aged man").
    forget_prompts (`str`, `""`): a prompt file (.txt / .jsonl) of forget prompts, each containing the concept
        (SFD's ``prompts/brad_pitt_prompts.txt``); "": the dataset's prompts that match ``forget_concept``.
        The remaining batch takes the dataset's prompts that do not match.
    > Loss weights (CIFAR: 1, 0.01, 1, 0.01; SD: all 1.0)
    fake_remain_weight / fake_forget_weight (`float`, `1.0` / `0.01`): ``sg_remain_coef`` / ``sg_forget_coef``.
    gen_remain_weight / gen_forget_weight (`float`, `1.0` / `0.01`): ``g_remain_coef`` / ``g_forget_coef``.
    forget_warmup (`float`, `0.0`): fraction of ``max_steps`` during which the forget terms draw their
        timesteps from [0.02 T, 0.98 T) instead of the loss range (SFD's ``forget_warmup``).
    grad_clip_value (`float`, `1.0`): clamp every gradient element to [-v, v] before each optimiser step
        (SFD's ``clip_grad_value_(grad_clip)``, both networks; applied after ``max_grad_norm``; 0: off).
    > Official values set here as defaults (inherited keys)
    distance ``l2`` and sid_alpha 1.2 (``distill.alpha``); denoising_timesteps [440] with generator_input
    ``scaled`` (``t_init: 440``, input sqrt(1 - alpha_bar) z); generator and fake-score timesteps
    ``torch.randint(38, 712)`` = [38, 711]: min_step_percent / fake_min_step_percent 0.038, max_step_percent /
    fake_max_step_percent 0.711; fake score first, then the generator, 1:1, each on fresh samples; Adam lr 1e-5
    for both networks, betas (0, 0.999), no weight decay, no norm clipping; EMA 0.9999. No CFG (SD: 4.5).
    """

    forget_labels: list[int] = field(default_factory=list)
    remap_labels: list[int] = field(default_factory=list)
    forget_concept: str = ""
    remap_concept: str = ""
    forget_prompts: str = ""
    fake_remain_weight: float = 1.0
    fake_forget_weight: float = 0.01
    gen_remain_weight: float = 1.0
    gen_forget_weight: float = 0.01
    forget_warmup: float = 0.0
    grad_clip_value: float = 1.0
    distance: str = "l2"
    sid_alpha: float = 1.2
    denoising_timesteps: list[int] = field(default_factory=lambda: [440])
    generator_input: str = "scaled"
    min_step_percent: float = 0.038
    max_step_percent: float = 0.711
    fake_min_step_percent: float = 0.038
    fake_max_step_percent: float = 0.711
    dfake_gen_update_ratio: int = 1
    update_order: str = "fake_first"
    learning_rate: float = 1e-5
    adam_beta1: float = 0.0
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    ema_decay: float = 0.9999

    def check(self):
        super().check()
        if bool(self.forget_labels) == bool(self.forget_concept):
            raise ConfigError(
                "SFD forgets either class labels or a text concept: set forget_labels (with remap_labels) for a "
                "class-conditional teacher, or forget_concept (with remap_concept) for a text-conditional one"
                + (" (both are set)" if self.forget_labels else "")
            )
        if self.forget_labels:
            self._check_labels()
        else:
            self._check_concept()
        for key in ("fake_remain_weight", "fake_forget_weight", "gen_remain_weight", "gen_forget_weight",
                    "grad_clip_value"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.forget_warmup <= 1:
            raise ConfigError(f"forget_warmup must be a fraction of max_steps in [0, 1], got {self.forget_warmup}")

    def _check_labels(self):
        f, r = list(self.forget_labels), list(self.remap_labels)
        if self.forget_prompts or self.remap_concept:
            raise ConfigError("forget_prompts / remap_concept are for forget_concept (text); with forget_labels "
                              "use remap_labels")
        if any(not isinstance(v, int) or v < 0 for v in f + r):
            raise ConfigError(f"forget_labels and remap_labels must be non-negative class labels, got {f} and {r}")
        if len(set(f)) != len(f):
            raise ConfigError(f"forget_labels lists a label twice: {f}")
        if len(r) not in (1, len(f)):
            raise ConfigError(
                f"remap_labels needs one override label for all forget_labels or one per label ({len(f)}), got {r}"
            )
        for i, label in enumerate(f):
            target = r[i] if len(r) > 1 else r[0]
            if target == label:
                raise ConfigError(f"remap_labels: forget label {label} is remapped to itself; pick another class")
        bad = sorted(set(r) & set(f))
        if bad:
            raise ConfigError(f"remap_labels: {bad} is also in forget_labels {f}; remap to a class that is kept")

    def _check_concept(self):
        if self.remap_labels:
            raise ConfigError("remap_labels is for forget_labels; with forget_concept use remap_concept")
        try:
            re.compile(self.forget_concept)
        except re.error as e:
            raise ConfigError(f"forget_concept: {self.forget_concept!r} is not a regular expression ({e})") from None
        if re.fullmatch(self.forget_concept, self.remap_concept, flags=re.IGNORECASE):
            raise ConfigError(
                f"remap_concept {self.remap_concept!r} is the concept to forget {self.forget_concept!r}; remap it "
                "to another concept"
            )
        if self.cache_text_embeddings:
            raise ConfigError("cache_text_embeddings: true encodes the dataset's prompts only, not SFD's forget and "
                              "override prompts; set it to false with forget_concept")
        if self.forget_prompts and not os.path.isfile(self.forget_prompts):
            raise ConfigError(f"forget_prompts: file {self.forget_prompts!r} does not exist")


class SFDTrainer(SIMTrainer):
    """SiD on a remaining batch plus SFD's forgetting term on a forget batch (override condition)."""

    config_class = SFDConfig
    method_name = "SFD"

    # ---------------------------------------------------------------- setup
    def build(self):
        super().build()
        c = self.config
        if self.conditioner is None:
            raise ConfigError(
                f"SFD forgets a class or a prompt, but teacher {c.teacher!r} is unconditional; use a class- or "
                "text-conditional teacher"
            )
        if c.forget_labels:
            self._build_label_forgetting()
        else:
            self._build_prompt_forgetting()

    def _build_label_forgetting(self):
        c, ds = self.config, self.dataset
        labels = getattr(ds, "labels", None)
        if labels is None:
            raise ConfigError(
                f"forget_labels: dataset {c.dataset!r} has no class labels (text prompts or a stream); SFD reads "
                "the remaining labels from it (use forget_concept for a text-conditional teacher)"
            )
        known = set(int(v) for v in labels.unique())
        for key, values in (("forget_labels", c.forget_labels), ("remap_labels", c.remap_labels)):
            unknown = sorted(set(values) - known)
            if unknown:
                raise ConfigError(f"{key}: label {unknown[0]} is not a class of dataset {c.dataset!r} "
                                  f"(classes {min(known)}..{max(known)})")
        keep = ~torch.isin(labels, torch.tensor(c.forget_labels, dtype=labels.dtype))
        if not keep.any():
            raise ConfigError(f"forget_labels {c.forget_labels}: no class of dataset {c.dataset!r} remains")
        self.remain = DistillDataset(
            labels=labels[keep], images=ds.images[keep] if ds.images is not None else None
        )

    def _build_prompt_forgetting(self):
        from ..data import load_prompts

        c, ds = self.config, self.dataset
        captions = getattr(ds, "captions", None)
        if captions is None:
            raise ConfigError(
                f"forget_concept: dataset {c.dataset!r} has no prompt list (a class dataset or a stream); SFD "
                "reads the remaining prompts from a prompt file (use forget_labels for class labels)"
            )
        hit = re.compile(c.forget_concept, flags=re.IGNORECASE)
        remain = [p for p in captions if not hit.search(p)]
        forget = load_prompts(c.forget_prompts) if c.forget_prompts else [p for p in captions if hit.search(p)]
        where = f"forget_prompts {c.forget_prompts!r}" if c.forget_prompts else f"dataset {c.dataset!r}"
        if not forget:
            raise ConfigError(f"forget_concept: no prompt of {where} matches {c.forget_concept!r}")
        missing = [p for p in forget if not hit.search(p)]
        if missing:
            raise ConfigError(f"forget_prompts: {missing[0]!r} does not contain the concept {c.forget_concept!r}")
        if not remain:
            raise ConfigError(f"forget_concept: every prompt of dataset {c.dataset!r} matches {c.forget_concept!r}; "
                              "no remaining prompt is left")
        self.forget_prompt_list = forget
        self.override_prompt_list = [remap_prompt(p, c.forget_concept, c.remap_concept) for p in forget]
        if self.use_gan:
            raise ConfigError("gan_generator_weight > 0 with forget_concept: the remaining prompts carry no images; "
                              "set gan_generator_weight: 0")
        self.remain = DistillDataset(captions=remain)

    def train_dataset(self):
        """The remaining data: the dataset without the forgotten labels / prompts (SFD's ``get_forget_dataset``)."""
        return self.remain

    def collate(self, items):
        return self.remain.collate(items)

    def on_prepared(self):
        super().on_prepared()
        v = self.config.grad_clip_value
        if v > 0:
            for opt in self.opts.values():
                inner = getattr(opt, "optimizer", opt)
                inner.register_step_pre_hook(lambda o, args, kwargs, v=v: _clamp_grads(o, v))

    # ---------------------------------------------------------------- the forget batch
    def forget_conditions(self, n: int):
        """(c_f, c_o): the forget batch's condition and the teacher's override condition for n samples."""
        c = self.config
        device = self.accelerator.device
        if c.forget_labels:
            pick = rnd.randint(len(c.forget_labels), (n,))
            forget = torch.tensor(c.forget_labels, dtype=torch.long)[pick]
            override = remap_labels(forget, c.forget_labels, c.remap_labels)
            return self.conditioner(forget.to(device)), self.conditioner(override.to(device))
        idx = rnd.randint(len(self.forget_prompt_list), (n,)).tolist()
        forget = self.conditioner([self.forget_prompt_list[i] for i in idx]).to(device)
        override = self.conditioner([self.override_prompt_list[i] for i in idx]).to(device)
        return forget, override

    def forget_times(self, n: int, lo: float, hi: float, device):
        """Times of the forget terms: SFD's warm-up range [0.02 T, 0.98 T) during ``forget_warmup``."""
        if self.global_step < int(self.config.forget_warmup * self.config.max_steps + 0.5):
            lo, hi = 0.02, 0.979
        return self.draw_t(n, lo, hi, device)

    def score_term(self, x, real_cond, fake_cond, t):
        """SiD (or SIM's pseudo-Huber) at x_t of x: the teacher at ``real_cond``, the fake score at ``fake_cond``."""
        c = self.config
        x_t = self.schedule.add_noise(x, rnd.randn_like(x), t)  # gradients reach x through x_t
        d_real = self.teacher.predict_with_input_grad(
            x_t, t, real_cond, target="x0", guidance_scale=c.real_guidance_scale
        )
        d_fake = self.fake.predict(x_t, t, fake_cond, target="x0", guidance_scale=c.fake_guidance_scale)
        if c.distance == "pseudo_huber":
            return sim_loss(x.float(), d_real.float(), d_fake.float(), c=c.huber_c)
        return sfd_forget_term(x.float(), d_real.float(), d_fake.float(), alpha=c.sid_alpha)

    # ---------------------------------------------------------------- hooks
    def generator_loss(self, x, cond):
        loss, out = super().generator_loss(x, cond)  # SiD on the remaining batch
        return self.config.gen_remain_weight * loss, {"loss_remain": out["loss_sim"]}

    def fake_loss(self, x, cond):
        return self.config.fake_remain_weight * super().fake_loss(x, cond)

    def compute_loss(self, batch, phase):
        c = self.config
        out = super().compute_loss(batch, phase)  # the remaining batch, as SIM
        gen = "generator" in phase
        weight = c.gen_forget_weight if gen else c.fake_forget_weight
        if weight <= 0:
            return out
        n = len(batch["_n"])
        forget_cond, override_cond = self.forget_conditions(n)
        fake_batch = {"_n": batch["_n"]}
        if gen:
            x = self.generate(fake_batch, forget_cond, self.global_step, grad=True)
            t = self.forget_times(n, c.min_step_percent, c.max_step_percent, x.device)
            loss = self.score_term(x, override_cond, forget_cond, t)
        else:
            x = self.generate(fake_batch, forget_cond, self.global_step, grad=False)
            t = self.forget_times(n, c.fake_min_step_percent, c.fake_max_step_percent, x.device)
            kw = {}
            if self.schedule.kind == "edm":  # the family's EDM weighting (see DMD2Trainer.fake_loss)
                sd = self.schedule.p.sigma_data
                kw = dict(weighting="x0", weight_fn=lambda t: self.schedule.sigma(t) ** -2 + sd**-2)
            # no condition dropout on the forget term (SFD: cond_drop_prob=0.0 there)
            loss = self.fake.dsm_loss(x.detach(), forget_cond, t=t, guidance_scale=c.fake_guidance_scale, **kw)
        out["loss"] = out["loss"] + weight * loss  # w_r L_remain (+ GAN / regression) + w_f L_forget
        out["loss_forget"] = loss.detach()
        return out


@torch.no_grad()
def _clamp_grads(optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.clamp_(-value, value)
