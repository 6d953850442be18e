"""The trainable score of the generator's distribution (DMD / DMD2, SiD / SIM, VSD)."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch

from .adapters import adapter_active, add_lora
from .denoiser import Denoiser, _unwrap
from .features import can_stop_early, run_to
from .generator import TeacherAnchor
from .teacher import Teacher


class FakeScore(TeacherAnchor, Denoiser):
    """Same ``predict`` API as the teacher, plus ``dsm_loss`` (inherited) to fit it to generated samples.

    Build it from the teacher, either as a full trainable copy or as a LoRA adapter on the teacher's own
    frozen weights (then the teacher runs with adapters off: one copy of the base in memory)::

        fake = FakeScore.from_teacher(teacher, mode="lora", lora_rank=64)
    """

    adapter_name: str | None = None

    @classmethod
    def from_teacher(
        cls,
        teacher: Teacher,
        mode: str = "full",
        *,
        lora_rank: int = 64,
        lora_alpha=None,
        adapter_name: str = "fake_score",
        target_modules=None,
    ) -> "FakeScore":
        if mode == "full":
            net = copy.deepcopy(_unwrap(teacher.net))
            if teacher.offload_device is not None:  # the teacher's weights live on the host; the copy trains
                net.to(teacher.offload_device)
            net.requires_grad_(True).train()
            fake = cls(net, teacher.schedule, teacher.prediction_type, cfg_convention=teacher.cfg_convention)
        elif mode == "lora":
            if teacher.offload_device is not None:
                raise ValueError("a LoRA fake score needs the teacher's base on the device: do not offload the teacher")
            net = _unwrap(teacher.net)
            add_lora(net, lora_rank, lora_alpha, adapter_name=adapter_name, target_modules=target_modules)
            teacher.shares_base = True
            fake = cls(net, teacher.schedule, teacher.prediction_type, cfg_convention=teacher.cfg_convention)
            fake.adapter_name = adapter_name
        else:
            raise ValueError(f"fake score mode must be 'full' or 'lora', got {mode!r}")
        return fake

    def trainable_parameters(self):
        return [p for p in self.net.parameters() if p.requires_grad]

    def _forward(self, x_t, t, kwargs):
        if self.adapter_name is None:
            out = super()._forward(x_t, t, kwargs)
        else:
            with adapter_active(_unwrap(self.net), self.adapter_name):
                out = super()._forward(x_t, t, kwargs)
        return self._anchored(out, x_t, t, kwargs)

    def bottleneck(self, x_t, t, cond=None, module=None):
        """The output of ``module`` (a layer of the network: the GAN head's input) for ``x_t`` at ``t``: the
        network runs only as far as that layer (:func:`~stepdistill.models.features.run_to`), no classifier-free
        guidance. Under a sharded wrapper the full forward runs and the layer's output is read."""
        inner = _unwrap(self.net)
        t = self._time(t, x_t)
        time = self.schedule.model_time(t).to(device=x_t.device, dtype=torch.float32)
        x_in = self.schedule.model_input(x_t, t).to(x_t.dtype)
        kwargs = cond.kwargs if cond is not None else {}
        net = inner if can_stop_early(self.net) else self.net
        ctx = adapter_active(inner, self.adapter_name) if self.adapter_name is not None else nullcontext()
        with ctx:
            if net is inner:
                return run_to(module, lambda: self._call(net, x_in, time, kwargs))
            seen = []
            handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
            try:
                self._call(net, x_in, time, kwargs)
            finally:
                handle.remove()
            return seen[-1]
