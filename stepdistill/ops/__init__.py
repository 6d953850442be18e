"""Fused sampling and distillation kernels (Triton), each mirroring a torch reference built from the library's
own functions (:mod:`stepdistill.ops.reference`).

=============================  ====================================================================
``fused_ddim_step``            CFG combine + (x0, eps) conversion + deterministic DDIM / Euler step
``fused_consistency_step``     c_skip x + c_out F, then re-noise to the next multistep point
``fused_dmd_gradient``         DMD2 gradient (x0_fake - x0_real) / mean|x - x0_real| (two passes)
``fused_vsd_gradient``         VSD gradient sigma^2 (eps_real - eps_fake)
``pseudo_huber_loss``          per-sample pseudo-Huber distance, Triton forward and backward
``capture_generator``          CUDA-graph capture and replay of a static-shape generation call
=============================  ====================================================================

Backends (``backend=`` or $STEPDISTILL_KERNELS): ``auto`` (Triton on CUDA when triton imports, else torch),
``torch``, ``triton``. Triton kernels are compiled lazily on first use, so importing this package never needs
a GPU or triton.
"""

from .fused import (
    BACKENDS,
    ENV_VAR,
    PseudoHuberFunction,
    fused_consistency_step,
    fused_ddim_step,
    fused_dmd_gradient,
    fused_vsd_gradient,
    pseudo_huber_loss,
    resolve_backend,
    step_coefficients,
    triton_available,
)
from .graphs import CapturedGenerator, capture_generator

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "CapturedGenerator",
    "PseudoHuberFunction",
    "capture_generator",
    "fused_consistency_step",
    "fused_ddim_step",
    "fused_dmd_gradient",
    "fused_vsd_gradient",
    "pseudo_huber_loss",
    "resolve_backend",
    "step_coefficients",
    "triton_available",
]
