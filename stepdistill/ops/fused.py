"""Public fused ops: argument checks, backend choice, and the Triton launchers.

Backend: ``backend=`` on each call, else the environment variable ``STEPDISTILL_KERNELS`` (torch | triton |
auto), else ``auto``. ``auto`` runs Triton for float16 / bfloat16 / float32 CUDA tensors when triton imports,
the torch reference (:mod:`stepdistill.ops.reference`) otherwise (CPU, float64, no triton). ``triton`` forces the
kernels and raises when they cannot run: no triton, float64, or CPU tensors without ``TRITON_INTERPRET=1``
(Triton's CPU interpreter: correct but slow, meant for tests).

Conventions shared by every op:
* tensors are (B, ...) and must agree in shape, dtype and device with ``x`` (or ``x_t`` / ``pred``);
* per-sample coefficients (alpha, sigma, c_skip, ...) are floats, 0-d tensors or (B,) tensors of any float
  dtype on any device (moved to the data's device, as ``schedules._bcast`` does);
* the kernels load any dtype, compute in float32 and write the input dtype; non-contiguous tensors are copied
  to contiguous ones first (pass contiguous tensors to avoid the copy; the [cond; uncond] halves of a
  batched CFG forward, ``out.chunk(2)``, are already contiguous);
* prediction types: eps, x0, v, flow (rectified flow: alpha = 1 - sigma), score, with diffusers' names
  accepted; convert a raw EDM output with the schedule first.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os

import torch

from ..guidance import CFG_COND, CFG_UNCOND, CONVENTIONS, check_guidance_scale
from ..schedules import NoiseSchedule, normalize_prediction_type
from . import reference as ref

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "PseudoHuberFunction",
    "fused_consistency_step",
    "fused_ddim_step",
    "fused_dmd_gradient",
    "fused_vsd_gradient",
    "pseudo_huber_loss",
    "resolve_backend",
    "step_coefficients",
    "triton_available",
]

ENV_VAR = "STEPDISTILL_KERNELS"
BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PRED_CODES = {"eps": 0, "x0": 1, "v": 2, "flow": 3, "score": 4}
_CFG_CODES = {CFG_UNCOND: 1, CFG_COND: 2}
BLOCK = 1024  # elements per program
RBLOCK = 128  # partial sums read per iteration when a kernel reduces a (B, NBLK) buffer

_TRITON_IMPORT_ERROR: str | None = None
_TRITON_CHECKED = False
_KERNELS = None


# ------------------------------------------------------------------------------------------------- backend


def triton_available() -> bool:
    """Whether ``import triton`` works (checked once)."""
    global _TRITON_CHECKED, _TRITON_IMPORT_ERROR
    if not _TRITON_CHECKED:
        try:
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install raising something else
            _TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"
        _TRITON_CHECKED = True
    return _TRITON_IMPORT_ERROR is None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _kernels():
    """The kernel module, (re)loaded so that its ``@triton.jit`` ran under the current TRITON_INTERPRET."""
    global _KERNELS
    flag = os.environ.get("TRITON_INTERPRET", "")
    if _KERNELS is None or _KERNELS.INTERPRET_FLAG != flag:
        mod = importlib.import_module("stepdistill.ops._triton_kernels")
        if mod.INTERPRET_FLAG != flag:
            mod = importlib.reload(mod)
        _KERNELS = mod
    return _KERNELS


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"`` for data tensor ``x``, from ``backend`` or $STEPDISTILL_KERNELS (see module doc)."""
    source = "backend" if backend is not None else ENV_VAR
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    choice = str(choice).strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{source}={choice!r} is not a kernel backend; expected one of {BACKENDS}")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        usable = x.is_cuda and x.dtype in TRITON_DTYPES and triton_available()
        return "triton" if usable else "torch"
    if not triton_available():
        raise RuntimeError(f"{source}='triton' but triton cannot be imported ({_TRITON_IMPORT_ERROR})")
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"{source}='triton' supports float16, bfloat16 and float32 tensors (the kernels compute in float32), "
            f"got {x.dtype}; use backend='torch' for {x.dtype}"
        )
    if not x.is_cuda and not _interpreting():
        raise RuntimeError(
            f"{source}='triton' with tensors on {x.device}: the Triton kernels need CUDA tensors, or "
            "TRITON_INTERPRET=1 (Triton's CPU interpreter, slow, for tests); use backend='torch' on CPU"
        )
    return "triton"


# ------------------------------------------------------------------------------------------------- checks


def _check_like(name: str, t: torch.Tensor | None, ref_name: str, like: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(like.shape)}; they must match"
        )
    if t.dtype != like.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {like.dtype}; they must match")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {like.device}; they must match")


def _check_data(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim < 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_coef(name: str, v, batch: int) -> None:
    if v is None:
        raise ValueError(f"{name} is required")
    if isinstance(v, torch.Tensor):
        if not (v.ndim == 0 or (v.ndim == 1 and v.shape[0] in (1, batch))):
            raise ValueError(f"{name} must be a float, a 0-d tensor or a ({batch},) tensor, got shape {tuple(v.shape)}")
    elif not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(v).__name__}")


def _pred_type(name: str, value: str) -> str:
    key = normalize_prediction_type(value)
    if key not in ref.FUSED_PREDICTION_TYPES:
        raise ValueError(
            f"{name}={value!r} is not supported by the fused ops (expected one of {ref.FUSED_PREDICTION_TYPES}); "
            "convert a raw EDM output with schedule.convert(..., 'edm', 'x0') first"
        )
    return key


def _check_guidance(uncond_names, unconds, w, convention: str, batch: int) -> None:
    given = [n for n, u in zip(uncond_names, unconds) if u is not None]
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown CFG convention {convention!r}; expected one of {CONVENTIONS}")
    if not given:
        if w is not None:
            raise ValueError(f"guidance_scale={w!r} was given without {' / '.join(uncond_names)}")
        return
    if w is None:
        raise ValueError(f"{given[0]} was given without guidance_scale")
    if isinstance(w, torch.Tensor):
        if not (w.ndim == 0 or (w.ndim == 1 and w.shape[0] in (1, batch))):
            raise ValueError(f"guidance_scale must be a float or a ({batch},) tensor, got shape {tuple(w.shape)}")
        if w.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # checking would synchronise, which a CUDA-graph capture forbids
        check_guidance_scale(w.detach())
    elif isinstance(w, (int, float)):
        if not math.isfinite(w):
            raise ValueError(f"guidance scale must be finite, got {w}")
    else:
        raise TypeError(f"guidance_scale must be a float or a tensor, got {type(w).__name__}")


# ------------------------------------------------------------------------------------------------- launch helpers


def _refuse_autograd(op: str, **tensors) -> None:
    """The sampling kernels have no backward: refuse rather than return a result that silently drops gradients."""
    if not torch.is_grad_enabled():
        return
    needs = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if needs:
        raise RuntimeError(
            f"{op} with the Triton backend is not differentiable, but {', '.join(needs)} requires grad; "
            "run it under torch.no_grad() (sampling), detach the inputs, or use backend='torch'"
        )


def _detach(*tensors):
    return tuple(t.detach() if t is not None else None for t in tensors)


def _device_ctx(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _coef_tensor(v, batch: int, device) -> torch.Tensor:
    """A contiguous (B,) tensor on ``device``; its dtype is kept (the kernels cast to float32 after loading)."""
    if isinstance(v, torch.Tensor):
        v = v.detach()
        if v.device != device:
            v = v.to(device, non_blocking=True)
        if v.ndim == 0 or v.shape[0] != batch:
            v = v.reshape(1).expand(batch)
        return v.contiguous()
    return torch.full((batch,), float(v), device=device, dtype=torch.float32)


def _guidance_args(w, batch: int, device, dummy: torch.Tensor):
    """(w_ptr tensor, w scalar, per-sample flag) for the kernels."""
    if w is None:
        return dummy, 0.0, False
    if isinstance(w, torch.Tensor):
        if w.ndim == 0 and not w.is_cuda:
            return dummy, float(w), False
        return _coef_tensor(w, batch, device), 0.0, True
    return dummy, float(w), False


def _grid(n: int, batch: int):
    if batch > 65535:  # CUDA's limit on the second grid dimension, which indexes the sample
        raise ValueError(f"the Triton kernels take at most 65535 samples per call, got {batch}; split the batch")
    return (_cdiv(n, BLOCK), batch)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _finite_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


# ------------------------------------------------------------------------------------------------- ops


def step_coefficients(schedule: NoiseSchedule, t, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha(t), sigma(t)) of ``schedule`` as float32 (B,) tensors on ``device``: compute them once per step,
    outside a CUDA graph, and pass them to the fused ops."""
    t = torch.as_tensor(t, dtype=torch.float64)
    a, s = schedule.alpha(t).reshape(-1), schedule.sigma(t).reshape(-1)
    return a.to(device=device, dtype=torch.float32), s.to(device=device, dtype=torch.float32)


def fused_ddim_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    alpha,
    sigma,
    alpha_prev=None,
    sigma_prev=None,
    *,
    pred_type: str = "eps",
    model_out_uncond: torch.Tensor | None = None,
    guidance_scale=None,
    convention: str = CFG_UNCOND,
    backend: str | None = None,
) -> torch.Tensor:
    """One fused deterministic sampling step from (alpha, sigma) to (alpha_prev, sigma_prev).

    CFG combine of ``model_out`` (conditional) and ``model_out_uncond`` with ``guidance_scale`` (float or (B,),
    ``convention`` "uncond+w" or "cond+w"), conversion of the ``pred_type`` output to (x0, eps) at x_t = ``x``,
    then x_prev = alpha_prev x0 + sigma_prev eps: DDIM (eta = 0), and the Euler step of VP in sigma
    coordinates, EDM and rectified flow. ``alpha_prev = sigma_prev = None`` returns x0 (the last step).
    Reference: :func:`stepdistill.ops.reference.ddim_step_ref` (guidance.cfg_combine, schedules.to_x0_eps,
    sampling.ddim_step)."""
    _check_data("x", x)
    _check_like("model_out", model_out, "x", x)
    _check_like("model_out_uncond", model_out_uncond, "x", x)
    key = _pred_type("pred_type", pred_type)
    batch = x.shape[0]
    _check_coef("alpha", alpha, batch)
    _check_coef("sigma", sigma, batch)
    if (alpha_prev is None) != (sigma_prev is None):
        raise ValueError("pass both alpha_prev and sigma_prev, or neither (land on x0)")
    if alpha_prev is not None:
        _check_coef("alpha_prev", alpha_prev, batch)
        _check_coef("sigma_prev", sigma_prev, batch)
    _check_guidance(("model_out_uncond",), (model_out_uncond,), guidance_scale, convention, batch)
    kw = dict(pred_type=key, model_out_uncond=model_out_uncond, guidance_scale=guidance_scale, convention=convention)
    if resolve_backend(backend, x) == "torch":
        return ref.ddim_step_ref(x, model_out, alpha, sigma, alpha_prev, sigma_prev, **kw)

    _refuse_autograd("fused_ddim_step", x=x, model_out=model_out, model_out_uncond=model_out_uncond)
    x, c = _flat(x), _flat(model_out)
    u = _flat(model_out_uncond) if model_out_uncond is not None else x
    dev, n = x.device, x.numel() // batch
    w_t, w_s, w_ps = _guidance_args(guidance_scale, batch, dev, x)
    a, s = _coef_tensor(alpha, batch, dev), _coef_tensor(sigma, batch, dev)
    to_x0 = alpha_prev is None
    ap = a if to_x0 else _coef_tensor(alpha_prev, batch, dev)
    sp = s if to_x0 else _coef_tensor(sigma_prev, batch, dev)
    out = torch.empty_like(x)
    with _device_ctx(x):
        _kernels().ddim_step_kernel[_grid(n, batch)](
            x,
            c,
            u,
            w_t,
            w_s,
            a,
            s,
            ap,
            sp,
            out,
            n,
            PRED=_PRED_CODES[key],
            CFG=_CFG_CODES[convention] if model_out_uncond is not None else 0,
            W_PER_SAMPLE=w_ps,
            TO_X0=to_x0,
            BLOCK=BLOCK,
        )
    return out


def fused_consistency_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    c_skip,
    c_out,
    *,
    alpha_next=None,
    sigma_next=None,
    noise: torch.Tensor | None = None,
    pred_type: str = "x0",
    alpha=None,
    sigma=None,
    backend: str | None = None,
) -> torch.Tensor:
    """One fused consistency-model step: f = c_skip x + c_out F, then alpha_next f + sigma_next noise.

    ``model_out`` is F (``pred_type="x0"``, the default: CM / EDM-style boundary condition), or an eps / v /
    flow / score prediction converted to x0 at (``alpha``, ``sigma``) first (LCM). Without alpha_next /
    sigma_next / noise the step returns f (the last step). Reference:
    :func:`stepdistill.ops.reference.consistency_step_ref` (sampling.consistency_step)."""
    _check_data("x", x)
    _check_like("model_out", model_out, "x", x)
    _check_like("noise", noise, "x", x)
    key = _pred_type("pred_type", pred_type)
    batch = x.shape[0]
    _check_coef("c_skip", c_skip, batch)
    _check_coef("c_out", c_out, batch)
    renoise = alpha_next is not None or sigma_next is not None or noise is not None
    if renoise:
        if alpha_next is None or sigma_next is None or noise is None:
            raise ValueError("re-noising needs alpha_next, sigma_next and noise together (or none of them)")
        _check_coef("alpha_next", alpha_next, batch)
        _check_coef("sigma_next", sigma_next, batch)
    if key != "x0":
        _check_coef("alpha", alpha, batch)
        _check_coef("sigma", sigma, batch)
    if resolve_backend(backend, x) == "torch":
        return ref.consistency_step_ref(
            x,
            model_out,
            c_skip,
            c_out,
            alpha_next=alpha_next,
            sigma_next=sigma_next,
            noise=noise,
            pred_type=key,
            alpha=alpha,
            sigma=sigma,
        )

    _refuse_autograd("fused_consistency_step", x=x, model_out=model_out, noise=noise)
    x, f = _flat(x), _flat(model_out)
    z = _flat(noise) if renoise else x
    dev, n = x.device, x.numel() // batch
    cs, co = _coef_tensor(c_skip, batch, dev), _coef_tensor(c_out, batch, dev)
    a = _coef_tensor(alpha, batch, dev) if key != "x0" else cs
    s = _coef_tensor(sigma, batch, dev) if key != "x0" else cs
    an = _coef_tensor(alpha_next, batch, dev) if renoise else cs
    sn = _coef_tensor(sigma_next, batch, dev) if renoise else cs
    out = torch.empty_like(x)
    with _device_ctx(x):
        _kernels().consistency_step_kernel[_grid(n, batch)](
            x, f, z, cs, co, a, s, an, sn, out, n, PRED=_PRED_CODES[key], RENOISE=renoise, BLOCK=BLOCK
        )
    return out


def fused_dmd_gradient(
    x: torch.Tensor,
    x_t: torch.Tensor,
    real_out: torch.Tensor,
    fake_out: torch.Tensor,
    alpha,
    sigma,
    *,
    real_out_uncond: torch.Tensor | None = None,
    guidance_scale=None,
    convention: str = CFG_UNCOND,
    real_pred_type: str = "eps",
    fake_pred_type: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """DMD / DMD2 distribution-matching gradient, fused: g = (x0_fake - x0_real) / mean_{C,H,W} |x - x0_real|.

    ``x`` is the generator sample, ``x_t = alpha x + sigma noise`` the point both score networks saw;
    ``real_out`` (guided with ``real_out_uncond`` when given) and ``fake_out`` are converted to x0 at x_t.
    Non-finite values are handled like ``torch.nan_to_num`` in x's dtype. g is a constant (every input is
    detached): apply it with ``losses.distribution_matching_loss(x, g)``.

    Precision: the reference (losses.dmd_gradient) works in float64, the kernels in float32. The kernel error
    is a few float32 roundings of x0_real and x0_fake divided by the normaliser, i.e. of order
    1e-7 * max(|x0_real|, |x0_fake|) / norm; measured <= 7e-7 of max |g| in tests/test_kernels.py with alpha in
    [0.1, 0.95] (x0 from eps grows like 1 / alpha). Two passes: partial sums of |x - x0_real| per block, then
    the gradient (the second pass re-derives x0_real instead of storing it)."""
    _check_data("x", x)
    _check_like("x_t", x_t, "x", x)
    _check_like("real_out", real_out, "x", x)
    _check_like("real_out_uncond", real_out_uncond, "x", x)
    _check_like("fake_out", fake_out, "x", x)
    kr = _pred_type("real_pred_type", real_pred_type)
    kf = _pred_type("fake_pred_type", fake_pred_type or real_pred_type)
    batch = x.shape[0]
    _check_coef("alpha", alpha, batch)
    _check_coef("sigma", sigma, batch)
    _check_guidance(("real_out_uncond",), (real_out_uncond,), guidance_scale, convention, batch)
    x, x_t, real_out, real_out_uncond, fake_out = _detach(x, x_t, real_out, real_out_uncond, fake_out)
    if resolve_backend(backend, x) == "torch":
        return ref.dmd_gradient_ref(
            x,
            x_t,
            real_out,
            fake_out,
            alpha,
            sigma,
            real_out_uncond=real_out_uncond,
            guidance_scale=guidance_scale,
            convention=convention,
            real_pred_type=kr,
            fake_pred_type=kf,
        )

    x, xt, rc, fo = _flat(x), _flat(x_t), _flat(real_out), _flat(fake_out)
    ru = _flat(real_out_uncond) if real_out_uncond is not None else x
    dev, n = x.device, x.numel() // batch
    w_t, w_s, w_ps = _guidance_args(guidance_scale, batch, dev, x)
    a, s = _coef_tensor(alpha, batch, dev), _coef_tensor(sigma, batch, dev)
    cfg = _CFG_CODES[convention] if real_out_uncond is not None else 0
    grid = _grid(n, batch)
    part = torch.empty((batch, grid[0]), device=dev, dtype=torch.float32)
    with _device_ctx(x):
        k = _kernels()
        k.dmd_partial_kernel[grid](
            x,
            xt,
            rc,
            ru,
            w_t,
            w_s,
            a,
            s,
            part,
            n,
            grid[0],
            PRED_R=_PRED_CODES[kr],
            CFG=cfg,
            W_PER_SAMPLE=w_ps,
            BLOCK=BLOCK,
        )
        out = torch.empty_like(x)
        k.dmd_grad_kernel[grid](
            xt,
            rc,
            ru,
            fo,
            w_t,
            w_s,
            a,
            s,
            part,
            out,
            n,
            grid[0],
            _finite_max(x.dtype),
            PRED_R=_PRED_CODES[kr],
            PRED_F=_PRED_CODES[kf],
            CFG=cfg,
            W_PER_SAMPLE=w_ps,
            BLOCK=BLOCK,
            RBLOCK=RBLOCK,
        )
    return out


def fused_vsd_gradient(
    x_t: torch.Tensor,
    real_out: torch.Tensor,
    fake_out: torch.Tensor,
    alpha,
    sigma,
    *,
    real_out_uncond: torch.Tensor | None = None,
    fake_out_uncond: torch.Tensor | None = None,
    guidance_scale=None,
    convention: str = CFG_UNCOND,
    real_pred_type: str = "eps",
    fake_pred_type: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """VSD gradient (SwiftBrush), fused: g = sigma^2 (eps_real - eps_fake), both outputs converted to eps at
    x_t and each guided with the same scale when its unconditional output is given (stepdistill's VSD trainer
    guides both). g is a constant (every input is detached). One pass. Reference: losses.vsd_gradient
    (float64); the kernel works in float32 (measured <= 3e-7 of max |g| in tests/test_kernels.py)."""
    _check_data("x_t", x_t)
    _check_like("real_out", real_out, "x_t", x_t)
    _check_like("real_out_uncond", real_out_uncond, "x_t", x_t)
    _check_like("fake_out", fake_out, "x_t", x_t)
    _check_like("fake_out_uncond", fake_out_uncond, "x_t", x_t)
    kr = _pred_type("real_pred_type", real_pred_type)
    kf = _pred_type("fake_pred_type", fake_pred_type or real_pred_type)
    batch = x_t.shape[0]
    _check_coef("alpha", alpha, batch)
    _check_coef("sigma", sigma, batch)
    _check_guidance(
        ("real_out_uncond", "fake_out_uncond"), (real_out_uncond, fake_out_uncond), guidance_scale, convention, batch
    )
    x_t, real_out, real_out_uncond, fake_out, fake_out_uncond = _detach(
        x_t, real_out, real_out_uncond, fake_out, fake_out_uncond
    )
    if resolve_backend(backend, x_t) == "torch":
        return ref.vsd_gradient_ref(
            x_t,
            real_out,
            fake_out,
            alpha,
            sigma,
            real_out_uncond=real_out_uncond,
            fake_out_uncond=fake_out_uncond,
            guidance_scale=guidance_scale,
            convention=convention,
            real_pred_type=kr,
            fake_pred_type=kf,
        )

    xt, rc, fc = _flat(x_t), _flat(real_out), _flat(fake_out)
    ru = _flat(real_out_uncond) if real_out_uncond is not None else xt
    fu = _flat(fake_out_uncond) if fake_out_uncond is not None else xt
    dev, n = xt.device, xt.numel() // batch
    w_t, w_s, w_ps = _guidance_args(guidance_scale, batch, dev, xt)
    a, s = _coef_tensor(alpha, batch, dev), _coef_tensor(sigma, batch, dev)
    out = torch.empty_like(xt)
    with _device_ctx(xt):
        _kernels().vsd_grad_kernel[_grid(n, batch)](
            xt,
            rc,
            ru,
            fc,
            fu,
            w_t,
            w_s,
            a,
            s,
            out,
            n,
            _finite_max(xt.dtype),
            PRED_R=_PRED_CODES[kr],
            PRED_F=_PRED_CODES[kf],
            CFG_R=_CFG_CODES[convention] if real_out_uncond is not None else 0,
            CFG_F=_CFG_CODES[convention] if fake_out_uncond is not None else 0,
            W_PER_SAMPLE=w_ps,
            BLOCK=BLOCK,
        )
    return out


# ------------------------------------------------------------------------------------------------- pseudo-Huber


class PseudoHuberFunction(torch.autograd.Function):
    """Triton forward / backward of the per-sample pseudo-Huber distance sqrt(||pred - target||^2 + c^2) - c.

    Forward: partial sums of squares per (sample, block), then one program per sample writes the loss and
    r = sqrt(S + c^2). Backward: d/d pred = grad_b (pred - target) / r_b (and its negation for target when
    target requires grad). Not twice differentiable."""

    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
        pred, target = _flat(pred), _flat(target)
        batch = pred.shape[0]
        n = pred.numel() // batch
        grid = _grid(n, batch)
        with _device_ctx(pred):
            k = _kernels()
            part = torch.empty((batch, grid[0]), device=pred.device, dtype=torch.float32)
            k.sqdiff_partial_kernel[grid](pred, target, part, n, grid[0], BLOCK=BLOCK)
            loss = torch.empty(batch, device=pred.device, dtype=torch.float32)
            root = torch.empty_like(loss)
            k.pseudo_huber_finalize_kernel[(batch,)](part, loss, root, float(c), grid[0], RBLOCK=RBLOCK)
        ctx.save_for_backward(pred, target, root)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        pred, target, root = ctx.saved_tensors
        need_p, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_p or need_t):
            return None, None, None
        batch = pred.shape[0]
        n = pred.numel() // batch
        go = grad_loss.to(torch.float32).contiguous()
        gp = torch.empty_like(pred)
        gt = torch.empty_like(target) if need_t else gp
        with _device_ctx(pred):
            _kernels().pseudo_huber_backward_kernel[_grid(n, batch)](
                pred, target, go, root, gp, gt, n, WRITE_GT=need_t, BLOCK=BLOCK
            )
        return (gp if need_p else None), (gt if need_t else None), None


def pseudo_huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float, *, backend: str | None = None):
    """Per-sample pseudo-Huber distance sqrt(||pred - target||^2 + c^2) - c over the non-batch dims, float32 (B,)
    (improved consistency training, Song & Dhariwal 2023), differentiable w.r.t. ``pred`` (and ``target``);
    c = 0 is the L2 norm, whose gradient is undefined (NaN) where pred == target, as in torch autograd.
    Reference: losses.pseudo_huber_distance (via :func:`stepdistill.ops.reference.pseudo_huber_distance_ref`)."""
    _check_data("pred", pred)
    _check_like("target", target, "pred", pred)
    if isinstance(c, torch.Tensor):
        c = float(c)
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
        raise ValueError(f"pseudo-Huber c must be a finite float >= 0 (0: the L2 norm), got {c!r}")
    if resolve_backend(backend, pred) == "torch":
        return ref.pseudo_huber_distance_ref(pred, target, c)
    return PseudoHuberFunction.apply(pred, target, float(c))
