"""The frozen teacher."""

from __future__ import annotations

import functools
import inspect
import weakref
from contextlib import contextmanager, nullcontext

import torch

from ..guidance import CFG_UNCOND
from ..schedules import NoiseSchedule
from .adapters import adapters_disabled
from .denoiser import Denoiser, _unwrap, network_call
from .loading import load_network


class Teacher(Denoiser):
    """Frozen pretrained model: eval mode, no parameter requires grad, every call under ``no_grad``.

    ``shares_base=True`` means the network also carries trainable LoRA adapters (a LoRA student or a LoRA
    fake score on the same weights): the teacher is then the base with every adapter switched off, run
    in eval mode, so no second copy of the weights is held.

    Memory options (set by the trainers' ``teacher_dtype`` / ``teacher_offload`` keys):

    * :meth:`cast_weights` stores the frozen weights in bf16 / fp16; the teacher then runs under autocast in
      that dtype and returns outputs in its input's dtype, so callers keep working in fp32;
    * :meth:`offload` keeps the weights on the host and copies them to the execution device for each forward
      pass only (:meth:`resident`; wrap several calls in one ``with teacher.resident():`` to copy once).

    Example::

        teacher = Teacher.from_pretrained("stepdistill/assets/digits_teacher")
        x0 = teacher.predict(x_t, t, cond, target="x0", guidance_scale=2.0)

    A teacher that is not a diffusers folder (an analytic score, a network of one's own) is built from its
    parts: ``Teacher(net, schedule, prediction_type)``. ``net`` is a diffusers network (UNet2DModel, DiT, ...)
    or any callable ``net(x_t, timestep, cond)`` (a function, an ``nn.Module``, with or without parameters)
    that receives

    * ``x_t``: the noisy sample, float32, shape ``(B, *sample_shape)`` (``(B, 2)`` for 2-D points, ``(B, C, H,
      W)`` for images), on the trainer's device; EDM schedules give the preconditioned input c_in(t) x_t;
    * ``timestep``: float32 ``(B,)``, the schedule's network time, not the continuous t in [0, 1]: a VP schedule
      gives t (T - 1) (0 .. 999 for T = 1000), EDM its c_noise, a flow schedule sigma T (``schedule.model_time``);
    * ``cond``: ``None`` (unconditional) or int64 class labels ``(B,)`` when the dataset has labels;

    and returns a float tensor of ``x_t``'s shape: the prediction of ``prediction_type`` ("eps", "x0", "v",
    "flow", "edm"; diffusers' names "epsilon", "sample", "v_prediction" work too) for
    x_t = alpha(t) x0 + sigma(t) eps. The teacher never trains: a module's parameters are frozen here.
    """

    weight_dtype: torch.dtype | None = None  # reduced-precision frozen weights (None: as loaded)
    offload_device: torch.device | None = None  # execution device of an offloaded teacher
    _resident_depth: int = 0

    def __init__(
        self,
        net,
        schedule: NoiseSchedule,
        prediction_type: str,
        *,
        shares_base: bool = False,
        cfg_convention: str = CFG_UNCOND,
    ):
        _check_parts(net, schedule, prediction_type)
        super().__init__(net, schedule, prediction_type, cfg_convention=cfg_convention)
        self.shares_base = shares_base
        if not shares_base and isinstance(net, torch.nn.Module):
            net.eval()
            net.requires_grad_(False)

    def replace_net(self, net) -> None:
        """Run ``net`` from now on (e.g. the shared base after a w-projection was added to it for a guided LoRA
        student); the teacher's prediction type, schedule and options stay."""
        self.net = net
        self._call = network_call(net)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: str | None = None, *, torch_dtype=None, **kw) -> "Teacher":
        net, schedule, pred = load_network(path, subfolder, torch_dtype=torch_dtype, **kw)
        return cls(net, schedule, pred)

    def train(self, mode: bool = True):  # a teacher never leaves eval mode
        if not self.shares_base:
            return super().train(False)
        return self

    # ------------------------------------------------------------------------------------------------
    # memory: reduced-precision weights and host offload
    # ------------------------------------------------------------------------------------------------
    def _slots(self, root=None):
        """(owner dict, name, tensor) of every parameter and buffer of the network (or of its submodule
        ``root``), each module's own."""
        out = []
        for module in (root if root is not None else _unwrap(self.net)).modules():
            for table in (module._parameters, module._buffers):
                out += [(table, name, t) for name, t in table.items() if t is not None]
        return out

    @torch.no_grad()
    def cast_weights(self, dtype: torch.dtype) -> int:
        """Store the frozen floating-point weights in ``dtype`` (in place; returns the bytes saved).

        LoRA adapter weights on a shared base (``shares_base``) stay as they are: they belong to the trainable
        student / fake score. So do the network's ``_keep_in_fp32_modules`` (diffusers' list of layers that
        must stay in fp32). The forward passes then run under autocast in ``dtype``."""
        inner = _unwrap(self.net)
        keep = tuple(getattr(inner, "_keep_in_fp32_modules", None) or ())
        names = {id(t): n for n, t in list(inner.named_parameters()) + list(inner.named_buffers())}
        saved, seen = 0, set()
        for _, _, t in self._slots():
            name = names.get(id(t), "")
            if id(t) in seen or not t.is_floating_point() or t.dtype == dtype or "lora_" in name:
                continue
            if keep and any(part in keep for part in name.split(".")):
                continue
            seen.add(id(t))
            before = t.numel() * t.element_size()
            t.data = t.data.to(dtype)
            saved += before - t.numel() * t.element_size()
        self.weight_dtype = dtype
        if self.offload_device is not None:  # the cast made new host tensors: pin them again
            self.offload(self.offload_device)
        return saved

    @torch.no_grad()
    def offload(self, device) -> None:
        """Keep the weights on the CPU (pinned when ``device`` is CUDA) and run every forward pass on
        ``device``, copying the weights there for its duration only. A teacher that shares its base with a
        trainable LoRA cannot be offloaded (the student needs those weights on the device every step)."""
        if self.shares_base:
            raise ValueError("a teacher sharing its base network with a LoRA student / fake score cannot be offloaded")
        device = torch.device(device)
        pin = device.type == "cuda" and torch.cuda.is_available()
        for _, _, t in self._slots():
            host = t.data.to("cpu")
            if pin and not host.is_pinned():
                host = host.pin_memory()
            t.data = host
        self.offload_device = device

    def _stage(self, t: torch.Tensor) -> torch.Tensor:
        """The execution-device copy of a host tensor (a no-op when the device is the CPU)."""
        return t.detach().to(self.offload_device, non_blocking=True)

    @contextmanager
    def resident(self, module=None):
        """Inside the block the weights of an offloaded teacher (or of its submodule ``module`` only: a
        checkpointed block recomputed in backward) are on its execution device; outside they are on the host
        again. The device copies are new tensors swapped into the modules (the parameters themselves never
        move), so a graph built through the teacher (SiD / SIM's input gradient) keeps the copies it used
        until its backward. Re-entrant; a no-op for a teacher that is not offloaded."""
        if self.offload_device is None or self._resident_depth:
            self._resident_depth += 1
            try:
                yield self
            finally:
                self._resident_depth -= 1
            return
        slots = self._slots(module)
        staged: dict[int, torch.Tensor] = {}
        for table, name, t in slots:
            if id(t) not in staged:
                staged[id(t)] = self._stage(t)
            table[name] = staged[id(t)]
        self._resident_depth = 1
        try:
            yield self
        finally:
            self._resident_depth = 0
            for table, name, t in slots:
                table[name] = t

    def _precision(self, device: torch.device):
        """Autocast in the weights' dtype for a reduced-precision teacher (norms and softmax stay in fp32)."""
        if self.weight_dtype is None or self.weight_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.weight_dtype)

    def _forward(self, x_t, t, kwargs):
        with self.resident(), self._precision(x_t.device):
            out = self._frozen_forward(x_t, t, kwargs)
        if self.weight_dtype is not None and out.is_floating_point() and out.dtype != x_t.dtype:
            out = out.to(x_t.dtype)
        return out

    def _frozen_forward(self, x_t, t, kwargs):
        if not self.shares_base:
            return super()._forward(x_t, t, kwargs)
        inner = _unwrap(self.net)
        modes = _mode_modules(inner)  # eval for the teacher's call: only the modules whose forward reads it
        was = [m.training for m in modes]
        for m in modes:
            m.training = False
        try:
            with adapters_disabled(inner):
                return super()._forward(x_t, t, kwargs)
        finally:
            for m, w in zip(modes, was):
                m.training = w

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


def _check_parts(net, schedule, prediction_type) -> None:
    """One-line errors for parts that cannot make a teacher (the argument named)."""
    from ..config import ObjectError

    if not callable(net):
        raise ObjectError(
            f"Teacher: net must be a network or a callable net(x_t, timestep, cond), got {type(net).__name__}"
        )
    if not isinstance(schedule, NoiseSchedule):
        raise ObjectError(
            "Teacher: schedule must be a stepdistill.schedules.NoiseSchedule (VPSchedule, EDMSchedule, FlowSchedule), "
            f"got {type(schedule).__name__}"
        )
    if not isinstance(prediction_type, str):
        raise ObjectError(f"Teacher: prediction_type must be a string such as 'eps', got {prediction_type!r}")
    try:
        schedule.check_prediction_type(prediction_type)
    except ValueError as e:
        raise ObjectError(f"Teacher: {e}") from None


_MODE_TYPES = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)
_MODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.cache
def _forward_reads_training(cls: type) -> bool:
    """Whether a (non-torch) module class's forward reads ``self.training`` (diffusers' ResnetBlock2D does: it
    makes its input contiguous only in training, which picks other CPU kernels). Unreadable source counts as yes."""
    if cls.__module__.startswith("torch.nn"):
        return False
    try:
        return "self.training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True


def _mode_modules(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules of ``net`` whose forward depends on train / eval (dropout with p > 0, batch norm, blocks
    with a gradient-checkpointing switch, other classes whose forward reads ``self.training``), found once per
    network: ``net.eval()`` on every teacher call walks the whole module tree to change nothing else."""
    found = _MODES.get(net)
    if found is None:
        found = _MODES[net] = [
            m
            for m in net.modules()
            if (isinstance(m, _MODE_TYPES) and getattr(m, "p", 1.0) != 0.0)
            or hasattr(m, "gradient_checkpointing")
            or _forward_reads_training(type(m))
        ]
    return found
