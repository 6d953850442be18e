"""Forward-mode derivatives (Jacobian-vector products) of networks along a tangent, for the continuous-time
methods (sCM: Lu & Song 2024; MeanFlow: Geng et al. 2025), which need d/ds f(x + s dx, t + s dt) at s = 0.

Three modes (the recipes' ``jvp`` key):

* ``forward``: ``torch.func.jvp`` (forward-mode AD, one pass carrying the tangent), in full precision (no
  autocast: accelerate's bf16 wrapper of the ``nets`` passed is bypassed), with PyTorch's math
  attention kernel selected: the fused scaled-dot-product kernels (flash / memory-efficient, the default on CPU
  and GPU) have no forward-AD formula; the math kernel is composed of matmuls and a softmax, which have (FastGen
  switches fused attention off for its JVP too). Works through UNet2DModel, UNet2DConditionModel, DiT and SD3
  transformers (tests/test_jvp.py) and peft LoRA layers.
* ``finite_difference``: the central difference (f(p + eps v) - f(p - eps v)) / (2 eps), three forward passes
  (primal and two shifted) that each start from the same random state, so dropout masks (and DiT's label
  dropout) agree. For layers without forward-mode support. Its error is O(eps^2) plus the network dtype's
  rounding / eps (float32: about 1e-4 relative at eps = 1e-3).
* ``auto``: forward mode, falling back to finite differences (with one warning naming the failing op) the
  first time forward mode raises a "not implemented" error; the fallback is remembered by the :class:`JVP`
  object.

The JVP runs without a graph by default (the methods stop its gradient): gradient checkpointing is then inactive
(diffusers checkpoints only with grad enabled) and works. ``create_graph=True`` keeps the graph of the primal
and tangent outputs; forward mode then refuses a network with gradient checkpointing switched on (torch's
checkpoint recomputes a different number of tensors under forward AD: backward fails), finite differences work.

API (stable; MeanFlow's trainer builds on it)::

    out, dout = jvp(fn, (x, t), (dx, dt), mode="auto", eps=1e-3)          # any fn of tensors
    j = JVP(mode="auto", eps=1e-3); out, dout = j(fn, primals, tangents)  # remembers an auto fallback
    out, dout = denoiser_jvp(model, x_t, t, dx, dt, cond, target="x0")   # the Denoiser contract
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..config import ConfigError

JVP_MODES = ("auto", "forward", "finite_difference")
DEFAULT_FD_EPS = 1e-3

__all__ = [
    "JVP", "JVP_MODES", "DEFAULT_FD_EPS", "check_jvp_mode", "denoiser_jvp", "jvp", "time_difference", "time_step",
]


def check_jvp_mode(mode, eps=DEFAULT_FD_EPS, key: str = "jvp"):
    """Raise a one-line :class:`~stepdistill.config.ConfigError` for a bad ``jvp`` / ``jvp_eps`` value."""
    if mode not in JVP_MODES:
        raise ConfigError(f"{key} must be one of {', '.join(JVP_MODES)}, got {mode!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ConfigError(f"{key}_eps must be a number > 0 (the finite-difference step), got {eps!r}")


def _forward_ad_missing(err: BaseException) -> bool:
    """Is ``err`` PyTorch's "this op / autograd.Function has no forward-mode rule" error?"""
    msg = str(err).lower()
    if isinstance(err, NotImplementedError):
        return True
    return "functorch transforms" in msg or ("forward ad" in msg and "not" in msg and "implement" in msg)


def _checkpointing_nets(nets: Sequence) -> list[str]:
    from .denoiser import _unwrap

    found = []
    for net in nets:
        inner = _unwrap(net)
        if isinstance(inner, nn.Module) and any(getattr(m, "gradient_checkpointing", False) for m in inner.modules()):
            found.append(type(inner).__name__)
    return found


@contextmanager
def _math_attention():
    """Select the math scaled-dot-product-attention kernel (the fused kernels have no forward-AD formula)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


class _SameRandomness:
    """Each ``with`` block starts from the random state captured at construction (CPU and CUDA)."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )

    @contextmanager
    def __call__(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        yield


@contextmanager
def _full_precision(nets: Sequence):
    """No autocast in the forward-mode pass (its weight casts break under torch.func.jvp; FastGen's
    ``precision_amp_jvp: None``): autocast off, and accelerate's autocast wrapper of a prepared network's forward
    (``_original_forward`` kept beside it) swapped out for the duration."""
    from .denoiser import _unwrap

    swapped = []
    for net in nets:
        for m in {id(net): net, id(_unwrap(net)): _unwrap(net)}.values():
            original = getattr(m, "_original_forward", None)
            if isinstance(m, nn.Module) and original is not None and "forward" in m.__dict__:
                swapped.append((m, m.__dict__["forward"]))
                m.forward = original
    cuda = torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else nullcontext()
    try:
        with torch.autocast("cpu", enabled=False), cuda:
            yield
    finally:
        for m, fwd in swapped:
            m.forward = fwd


def _forward_jvp(fn, primals, tangents, nets=()):
    with _math_attention(), _full_precision(nets):
        return torch.func.jvp(fn, primals, tangents)


def _finite_difference_jvp(fn, primals, tangents, eps):
    """Central difference along the tangent (one step ``eps`` for all primals), or, with a step per primal, the
    sum of one central difference per primal (2 passes each). The primal pass runs last so that the random
    state afterwards is the one a single forward pass leaves."""
    same = _SameRandomness()
    steps = tuple(float(e) for e in eps) if isinstance(eps, (tuple, list)) else (float(eps),) * len(primals)
    groups = [tuple(range(len(primals)))] if len(set(steps)) == 1 else [(i,) for i in range(len(primals))]
    total = None
    for group in groups:
        h = steps[group[0]]
        if all(not tangents[i].any() for i in group):
            continue
        shifted = []
        for sign in (1.0, -1.0):
            args = (p + sign * h * v if i in group else p for i, (p, v) in enumerate(zip(primals, tangents)))
            with same():
                shifted.append(fn(*args))
        part = (shifted[0] - shifted[1]) / (2 * h)
        total = part if total is None else total + part
    with same():
        out = fn(*primals)
    return out, total if total is not None else torch.zeros_like(out)


def _prepare(primals, tangents):
    primals, tangents = tuple(p.contiguous() if torch.is_tensor(p) else p for p in primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    out = []
    for i, (p, v) in enumerate(zip(primals, tangents)):
        if not torch.is_tensor(p) or not p.is_floating_point():
            raise ValueError(f"jvp: primal {i} must be a floating-point tensor, got {type(p).__name__}")
        v = torch.as_tensor(v, device=p.device)
        if v.shape != p.shape:
            v = v.expand_as(p) if v.ndim <= p.ndim else v
        if v.shape != p.shape:
            raise ValueError(f"jvp: tangent {i} has shape {tuple(v.shape)}, its primal {tuple(p.shape)}")
        out.append(v.to(p.dtype).contiguous())  # expanded (overlapping) tensors cannot be dual tensors
    return primals, tuple(out)


class JVP:
    """A JVP strategy: ``mode`` in :data:`JVP_MODES`, ``eps`` the finite-difference step (along the tangent:
    primals +- eps tangents). ``JVP(...)(fn, primals, tangents)`` returns ``(fn(*primals), J_fn tangents)``.
    ``used`` is the mode that ran last ("forward" or "finite_difference"); an ``auto`` object that fell back
    stays on finite differences. ``nets``: the networks ``fn`` calls, checked for gradient checkpointing when
    ``create_graph`` is asked in forward mode. ``steps``: a finite-difference step per primal instead of
    ``eps`` (then one central difference per primal, summed: 2 passes each)."""

    def __init__(self, mode: str = "auto", eps: float = DEFAULT_FD_EPS):
        if mode not in JVP_MODES:
            raise ValueError(f"jvp mode must be one of {', '.join(JVP_MODES)}, got {mode!r}")
        if not eps > 0:
            raise ValueError(f"jvp finite-difference eps must be > 0, got {eps}")
        self.mode, self.eps = mode, float(eps)
        self.used: str | None = None
        self._fell_back = False

    def __call__(
        self,
        fn: Callable,
        primals,
        tangents,
        *,
        create_graph: bool = False,
        nets: Sequence = (),
        steps: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        primals, tangents = _prepare(primals, tangents)
        forward = self.mode == "forward" or (self.mode == "auto" and not self._fell_back)
        if forward and create_graph:
            bad = _checkpointing_nets(nets)
            if bad and self.mode == "forward":
                raise ValueError(
                    f"jvp: forward mode with a graph (create_graph) through {bad[0]} with gradient checkpointing "
                    "fails in backward (checkpoint recomputation under forward AD); set gradient_checkpointing: "
                    "false or jvp: finite_difference"
                )
            forward = not bad
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            if forward:
                try:
                    out = _forward_jvp(fn, primals, tangents, nets)
                    self.used = "forward"
                    return out
                except (NotImplementedError, RuntimeError) as e:
                    if not _forward_ad_missing(e):
                        raise
                    first = (str(e).splitlines() or [""])[0]
                    if self.mode == "forward":
                        raise ValueError(
                            f"jvp: forward-mode AD is not available ({first[:160]}); set jvp: auto or finite_difference"
                        ) from e
                    warnings.warn(
                        f"jvp: forward-mode AD is not available ({first[:160]}); using central finite differences "
                        f"(eps={self.eps:g}) from now on",
                        stacklevel=2,
                    )
                    self._fell_back = True
            self.used = "finite_difference"
            return _finite_difference_jvp(fn, primals, tangents, self.eps if steps is None else steps)


def jvp(
    fn: Callable,
    primals,
    tangents,
    *,
    mode: str = "auto",
    eps: float = DEFAULT_FD_EPS,
    create_graph: bool = False,
    nets: Sequence = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(*primals), d/ds fn(*(p + s v)) at s = 0)`` by ``mode`` (see the module docstring)."""
    return JVP(mode, eps)(fn, primals, tangents, create_graph=create_graph, nets=nets)


TIME_SHIFT = 0.05  # the largest finite-difference shift of a network's time input (see time_step)


def time_step(model, t: torch.Tensor, dt: torch.Tensor, eps: float) -> float:
    """The finite-difference step along ``dt`` for a Denoiser: ``eps``, or less where that would move the
    network's time input (diffusers' integer-scale timestep: 999 per unit of t) by more than 0.05: sinusoidal
    time embeddings have frequencies up to 1 per timestep, so a larger shift makes the central difference
    inaccurate (a shift of 0.5 gives about 5% error on the tiny UNets of tests/test_jvp.py, 0.05 about 0.05%)."""
    h = 1e-6
    tau = model.schedule.model_time
    rate = float(((tau(t + h * dt) - tau(t - h * dt)) / (2 * h)).abs().max())
    return min(float(eps), TIME_SHIFT / rate) if rate > 0 else float(eps)


def time_difference(fn: Callable, t: torch.Tensor, shift: float, model_time: Callable, bounds) -> torch.Tensor:
    """d fn / dt as a central difference that moves the network's time input ``model_time(t)`` by +- ``shift``
    per sample: a smoothed time derivative for networks conditioned on integer timesteps through sinusoids
    (frequencies up to 1 per timestep: DDPM, SD, the toy teacher), whose exact time derivative is dominated by
    timestep-scale wiggles (the continuous-time methods' ``jvp_time_shift``). ``t`` (B,) float64 in
    ``bounds`` (lo, hi); the shifted times are clamped there (one-sided at the ends: the quotient uses the times
    reached)."""
    lo, hi = bounds
    h = 1e-6
    up, down = (t + h).clamp(max=hi), (t - h).clamp(min=lo)
    rate = ((model_time(up) - model_time(down)) / (up - down)).abs().clamp_min(1e-12)
    t_plus, t_minus = (t + shift / rate).clamp(max=hi), (t - shift / rate).clamp(min=lo)
    diff = fn(t_plus) - fn(t_minus)
    gap = (t_plus - t_minus).to(diff.dtype).reshape(-1, *[1] * (diff.ndim - 1))
    return diff / gap


def denoiser_jvp(
    model,
    x_t: torch.Tensor,
    t,
    dx: torch.Tensor,
    dt,
    cond=None,
    *,
    target: str | None = None,
    guidance_scale=None,
    mode: str | JVP = "auto",
    eps: float = DEFAULT_FD_EPS,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """JVP of a :class:`~stepdistill.models.Denoiser` along (dx, dt) in its continuous time t in [0, 1]:
    returns (the output, its derivative). ``target`` None: the raw network output (its own prediction type);
    else ``model.predict(..., target=target)`` (the conversion is differentiated too). ``mode`` may be a
    :class:`JVP` object (keeps an auto fallback across calls; its ``eps`` is used). Finite differences step
    ``eps`` along dx and :func:`time_step` along dt."""
    t = model._time(t, x_t).to(x_t.device)
    dt = torch.as_tensor(dt, dtype=t.dtype, device=t.device).expand_as(t)

    def fn(x, tt):
        if target is None:
            return model.raw(x, tt, cond, guidance_scale)
        return model.predict(x, tt, cond, target=target, guidance_scale=guidance_scale)

    runner = mode if isinstance(mode, JVP) else JVP(mode, eps)
    steps = (runner.eps, time_step(model, t.detach(), dt, runner.eps))
    return runner(fn, (x_t, t), (dx, dt), create_graph=create_graph, nets=(model.net,), steps=steps)
