"""The frozen teacher."""

from __future__ import annotations

import torch

from ..guidance import CFG_UNCOND
from ..schedules import NoiseSchedule
from .adapters import adapters_disabled
from .denoiser import Denoiser, _unwrap
from .loading import load_network


class Teacher(Denoiser):
    """Frozen pretrained model: eval mode, no parameter requires grad, every call under ``no_grad``.

    ``shares_base=True`` means the network also carries trainable LoRA adapters (a LoRA student or a LoRA
    fake score on the same weights): the teacher is then the base with every adapter switched off, run
    in eval mode, so no second copy of the weights is held.

    Example::

        teacher = Teacher.from_pretrained("stepdistill/assets/digits_teacher")
        x0 = teacher.predict(x_t, t, cond, target="x0", guidance_scale=2.0)
    """

    def __init__(
        self,
        net,
        schedule: NoiseSchedule,
        prediction_type: str,
        *,
        shares_base: bool = False,
        cfg_convention: str = CFG_UNCOND,
    ):
        super().__init__(net, schedule, prediction_type, cfg_convention=cfg_convention)
        self.shares_base = shares_base
        if not shares_base and isinstance(net, torch.nn.Module):
            net.eval()
            net.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: str | None = None, *, torch_dtype=None, **kw) -> "Teacher":
        net, schedule, pred = load_network(path, subfolder, torch_dtype=torch_dtype, **kw)
        return cls(net, schedule, pred)

    def train(self, mode: bool = True):  # a teacher never leaves eval mode
        if not self.shares_base:
            return super().train(False)
        return self

    def _forward(self, x_t, t, kwargs):
        if not self.shares_base:
            return super()._forward(x_t, t, kwargs)
        inner = _unwrap(self.net)
        was_training = inner.training
        inner.eval()
        try:
            with adapters_disabled(inner):
                return super()._forward(x_t, t, kwargs)
        finally:
            inner.train(was_training)

    def raw(self, *args, **kwargs):
        with torch.no_grad():
            return super().raw(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with torch.no_grad():
            return super().predict(*args, **kwargs)

    def predict_with_input_grad(self, x_t, t, cond=None, *, target: str = "x0", guidance_scale=None):
        """``predict`` differentiable w.r.t. x_t (the weights stay frozen): for SiD / SIM, whose generator
        gradient flows through the teacher's forward pass. Costs the activation memory of that pass."""
        with torch.enable_grad():
            out = Denoiser.raw(self, x_t, t, cond, guidance_scale)
            t = self._time(t, x_t)
            return self.schedule.convert(out, x_t, t, self.prediction_type, target)
