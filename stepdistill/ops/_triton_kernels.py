"""Triton kernels of :mod:`stepdistill.ops`. Imported lazily by :func:`stepdistill.ops.fused._kernels`, never at
package import: ``@triton.jit`` reads ``TRITON_INTERPRET`` when it runs, so this module is (re)loaded whenever
that variable differs from its value here.

Layout: every tensor is contiguous and viewed as (B, N) with N = numel / B; the grid is (cdiv(N, BLOCK), B),
so a program owns one block of one sample and loads that sample's coefficients as scalars. Values are loaded
in their own dtype, computed in float32 and stored in the output's dtype. Reductions write one float32 partial
sum per program into a (B, NBLK) buffer, which the next kernel sums (deterministic, no atomics).

Divisions and square roots use the IEEE round-to-nearest forms (tl.div_rn, tl.sqrt_rn) rather than Triton's
faster approximate defaults, so that the kernels round like torch; the cost is invisible in memory-bound code.

Integer codes (constexpr): prediction 0 eps, 1 x0, 2 v, 3 flow, 4 score; CFG 0 none, 1 "uncond+w", 2 "cond+w".
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

#: TRITON_INTERPRET as seen when the kernels below were defined
INTERPRET_FLAG = os.environ.get("TRITON_INTERPRET", "")


@triton.jit
def _load(ptr, base, offs, mask):
    return tl.load(ptr + base + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _coef(ptr, b):
    return tl.load(ptr + b).to(tl.float32)


@triton.jit
def _guided(c_ptr, u_ptr, w_ptr, w_scalar, b, base, offs, mask, CFG: tl.constexpr, W_PER_SAMPLE: tl.constexpr):
    """The (optionally guided) model output, as guidance.cfg_combine writes it."""
    out = _load(c_ptr, base, offs, mask)
    if CFG != 0:
        u = _load(u_ptr, base, offs, mask)
        if W_PER_SAMPLE:
            w = _coef(w_ptr, b)
        else:
            w = w_scalar
        if CFG == 1:
            out = u + w * (out - u)
        else:
            out = out + w * (out - u)
    return out


@triton.jit
def _to_x0_eps(pred, x, a, s, PRED: tl.constexpr):
    """(x0, eps) implied by ``pred`` at x_t = x, as NoiseSchedule.to_x0_eps / FlowSchedule compute them."""
    if PRED == 0:  # eps
        eps = pred
        x0 = tl.div_rn(x - s * eps, a)
    elif PRED == 1:  # x0
        x0 = pred
        eps = tl.div_rn(x - a * x0, s)
    elif PRED == 2:  # v = alpha eps - sigma x0
        norm = a * a + s * s
        x0 = tl.div_rn(a * x - s * pred, norm)
        eps = tl.div_rn(s * x + a * pred, norm)
    elif PRED == 3:  # flow u = eps - x0 with t = sigma (alpha = 1 - sigma)
        x0 = x - s * pred
        eps = x + (1 - s) * pred
    else:  # score = -eps / sigma
        eps = -s * pred
        x0 = tl.div_rn(x - s * eps, a)
    return x0, eps


@triton.jit
def _finite(g, maxv):
    """torch.nan_to_num into a dtype whose largest finite value is ``maxv``."""
    g = tl.where(g != g, 0.0, g)
    return tl.minimum(tl.maximum(g, -maxv), maxv)


@triton.jit
def _add(a, b):
    return a + b


# tl.sum's own combine function where this triton has one (the interpreter recognises it and sums with numpy
# instead of element by element in Python); a local one otherwise.
_sum_combine = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def _sum(v):
    """tl.sum written with tl.reduce: tl.sum and tl.zeros are @triton.jit functions of triton.language, which
    the interpreter can only call when triton itself was imported after TRITON_INTERPRET was set; a test
    session cannot always arrange that, so these kernels call core builtins only."""
    return tl.reduce(v, 0, _sum_combine)


@triton.jit
def _row_sum(part_ptr, b, NBLK, RBLOCK: tl.constexpr):
    acc = tl.full([RBLOCK], 0.0, tl.float32)
    row = part_ptr + b.to(tl.int64) * NBLK
    for start in range(0, NBLK, RBLOCK):
        r = start + tl.arange(0, RBLOCK)
        acc += tl.load(row + r, mask=r < NBLK, other=0.0)
    return _sum(acc)


# ------------------------------------------------------------------------------------------------- sampling


@triton.jit
def ddim_step_kernel(
    x_ptr,
    c_ptr,
    u_ptr,
    w_ptr,
    w_scalar,
    a_ptr,
    s_ptr,
    ap_ptr,
    sp_ptr,
    out_ptr,
    N,
    PRED: tl.constexpr,
    CFG: tl.constexpr,
    W_PER_SAMPLE: tl.constexpr,
    TO_X0: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    x = _load(x_ptr, base, offs, mask)
    pred = _guided(c_ptr, u_ptr, w_ptr, w_scalar, b, base, offs, mask, CFG, W_PER_SAMPLE)
    x0, eps = _to_x0_eps(pred, x, _coef(a_ptr, b), _coef(s_ptr, b), PRED)
    if TO_X0:
        out = x0
    else:
        out = _coef(ap_ptr, b) * x0 + _coef(sp_ptr, b) * eps
    tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def consistency_step_kernel(
    x_ptr,
    f_ptr,
    z_ptr,
    cs_ptr,
    co_ptr,
    a_ptr,
    s_ptr,
    an_ptr,
    sn_ptr,
    out_ptr,
    N,
    PRED: tl.constexpr,
    RENOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    x = _load(x_ptr, base, offs, mask)
    pred = _load(f_ptr, base, offs, mask)
    if PRED == 1:
        x0 = pred
    else:
        x0, _eps = _to_x0_eps(pred, x, _coef(a_ptr, b), _coef(s_ptr, b), PRED)
    out = _coef(cs_ptr, b) * x + _coef(co_ptr, b) * x0
    if RENOISE:
        out = _coef(an_ptr, b) * out + _coef(sn_ptr, b) * _load(z_ptr, base, offs, mask)
    tl.store(out_ptr + base + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------- distribution matching


@triton.jit
def dmd_partial_kernel(
    x_ptr,
    xt_ptr,
    rc_ptr,
    ru_ptr,
    w_ptr,
    w_scalar,
    a_ptr,
    s_ptr,
    part_ptr,
    N,
    NBLK,
    PRED_R: tl.constexpr,
    CFG: tl.constexpr,
    W_PER_SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 1: partial sums of |x - x0_real| per (sample, block)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    xt = _load(xt_ptr, base, offs, mask)
    real = _guided(rc_ptr, ru_ptr, w_ptr, w_scalar, b, base, offs, mask, CFG, W_PER_SAMPLE)
    x0_real, _eps = _to_x0_eps(real, xt, _coef(a_ptr, b), _coef(s_ptr, b), PRED_R)
    d = tl.where(mask, tl.abs(_load(x_ptr, base, offs, mask) - x0_real), 0.0)
    tl.store(part_ptr + b.to(tl.int64) * NBLK + pid, _sum(d))


@triton.jit
def dmd_grad_kernel(
    xt_ptr,
    rc_ptr,
    ru_ptr,
    f_ptr,
    w_ptr,
    w_scalar,
    a_ptr,
    s_ptr,
    part_ptr,
    out_ptr,
    N,
    NBLK,
    maxv,
    PRED_R: tl.constexpr,
    PRED_F: tl.constexpr,
    CFG: tl.constexpr,
    W_PER_SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    """Pass 2: normaliser from the partial sums, then g = (x0_fake - x0_real) / norm."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    norm = _row_sum(part_ptr, b, NBLK, RBLOCK) / N
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    a = _coef(a_ptr, b)
    s = _coef(s_ptr, b)
    xt = _load(xt_ptr, base, offs, mask)
    real = _guided(rc_ptr, ru_ptr, w_ptr, w_scalar, b, base, offs, mask, CFG, W_PER_SAMPLE)
    x0_real, _e1 = _to_x0_eps(real, xt, a, s, PRED_R)
    x0_fake, _e2 = _to_x0_eps(_load(f_ptr, base, offs, mask), xt, a, s, PRED_F)
    g = _finite(tl.div_rn(x0_fake - x0_real, norm), maxv)
    tl.store(out_ptr + base + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def vsd_grad_kernel(
    xt_ptr,
    rc_ptr,
    ru_ptr,
    fc_ptr,
    fu_ptr,
    w_ptr,
    w_scalar,
    a_ptr,
    s_ptr,
    out_ptr,
    N,
    maxv,
    PRED_R: tl.constexpr,
    PRED_F: tl.constexpr,
    CFG_R: tl.constexpr,
    CFG_F: tl.constexpr,
    W_PER_SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """g = sigma^2 (eps_real - eps_fake)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    a = _coef(a_ptr, b)
    s = _coef(s_ptr, b)
    xt = _load(xt_ptr, base, offs, mask)
    real = _guided(rc_ptr, ru_ptr, w_ptr, w_scalar, b, base, offs, mask, CFG_R, W_PER_SAMPLE)
    fake = _guided(fc_ptr, fu_ptr, w_ptr, w_scalar, b, base, offs, mask, CFG_F, W_PER_SAMPLE)
    _x1, eps_real = _to_x0_eps(real, xt, a, s, PRED_R)
    _x2, eps_fake = _to_x0_eps(fake, xt, a, s, PRED_F)
    g = _finite((s * s) * (eps_real - eps_fake), maxv)
    tl.store(out_ptr + base + offs, g.to(out_ptr.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------------------------------- pseudo-Huber


@triton.jit
def sqdiff_partial_kernel(p_ptr, t_ptr, part_ptr, N, NBLK, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    d = _load(p_ptr, base, offs, mask) - _load(t_ptr, base, offs, mask)
    tl.store(part_ptr + b.to(tl.int64) * NBLK + pid, _sum(d * d))


@triton.jit
def pseudo_huber_finalize_kernel(part_ptr, loss_ptr, root_ptr, c, NBLK, RBLOCK: tl.constexpr):
    """loss_b = sqrt(S_b + c^2) - c; root_b = sqrt(S_b + c^2) is kept for the backward pass."""
    b = tl.program_id(0)
    root = tl.sqrt_rn(_row_sum(part_ptr, b, NBLK, RBLOCK) + c * c)
    tl.store(root_ptr + b, root)
    tl.store(loss_ptr + b, root - c)


@triton.jit
def pseudo_huber_backward_kernel(
    p_ptr,
    t_ptr,
    go_ptr,
    root_ptr,
    gp_ptr,
    gt_ptr,
    N,
    WRITE_GT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """d loss_b / d pred = (pred - target) / root_b, scaled by the incoming gradient of loss_b."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    scale = tl.div_rn(_coef(go_ptr, b), _coef(root_ptr, b))
    g = scale * (_load(p_ptr, base, offs, mask) - _load(t_ptr, base, offs, mask))
    tl.store(gp_ptr + base + offs, g.to(gp_ptr.dtype.element_ty), mask=mask)
    if WRITE_GT:
        tl.store(gt_ptr + base + offs, (-g).to(gt_ptr.dtype.element_ty), mask=mask)
