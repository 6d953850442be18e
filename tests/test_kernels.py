"""Fused kernels (stepdistill.ops) against their torch references, under Triton's CPU interpreter.

TRITON_INTERPRET must be set before ``@triton.jit`` runs; stepdistill.ops compiles its kernels lazily and
reloads them when the variable changes, and this module sets it before importing anything from the package
and again (autouse fixture) around every test.
Tolerances: float32 kernels vs float32 references <= 1e-6 of the output's scale; the distribution-matching
references compute in float64 (losses.dmd_gradient / vsd_gradient) and the float32 kernels stay within 1e-6 of
max |g| here; bfloat16 inputs <= 1e-2 of the scale (one bf16 rounding of the output).
"""

import os

# Set before stepdistill.ops is imported (its kernels compile lazily and are reloaded whenever this variable
# changes); restored after the imports so that the rest of the session does not run under the interpreter;
# the autouse fixture below sets it again for each test of this module.
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from stepdistill import losses  # noqa: E402
from stepdistill.guidance import CFG_COND, CFG_UNCOND  # noqa: E402
from stepdistill.ops import (  # noqa: E402
    capture_generator,
    fused,
    fused_consistency_step,
    fused_ddim_step,
    fused_dmd_gradient,
    fused_vsd_gradient,
    pseudo_huber_loss,
    resolve_backend,
    step_coefficients,
)
from stepdistill.ops import reference as ref  # noqa: E402
from stepdistill.sampling import consistency_step, ddim_step  # noqa: E402
from stepdistill.schedules import FlowSchedule, VPSchedule, vp_alphas_cumprod  # noqa: E402

if _PREVIOUS_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

pytest.importorskip("triton")

SHAPES = [(3, 5, 7, 9), (2, 4, 3), (1, 1), (2, 3, 37, 29)]  # odd sizes; the last spans several blocks
PRED_TYPES = ["eps", "x0", "v", "flow", "score"]
GUIDANCE = ["none", "uncond+w scalar", "cond+w per-sample", "uncond+w per-sample"]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("STEPDISTILL_KERNELS", raising=False)


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    out, expected = out.detach().double(), expected.detach().double()
    return float((out - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def coefs(batch: int, gen: torch.Generator, pred_type: str = "eps"):
    """Per-sample (alpha, sigma) at t and at an earlier t_prev; rectified flow needs alpha = 1 - sigma."""
    if pred_type == "flow":
        s = 0.2 + 0.7 * torch.rand(batch, generator=gen, dtype=torch.float64)
        sp = s * 0.5
        return 1 - s, s, 1 - sp, sp
    a = 0.1 + 0.85 * torch.rand(batch, generator=gen, dtype=torch.float64)
    ap = a + (0.999 - a) * 0.5
    return a, (1 - a**2).sqrt(), ap, (1 - ap**2).sqrt()


def guidance_kwargs(mode: str, like: torch.Tensor, gen: torch.Generator, key: str = "model_out_uncond") -> dict:
    if mode == "none":
        return {}
    conv = CFG_COND if mode.startswith("cond") else CFG_UNCOND
    w = 1 + 3 * torch.rand(like.shape[0], generator=gen) if "per-sample" in mode else 4.5
    u = torch.randn(like.shape, generator=gen).to(like.dtype)
    return {key: u, "guidance_scale": w, "convention": conv}


def data(shape, n, gen, dtype=torch.float32):
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(n)]


# ------------------------------------------------------------------------------------------------- sampling step


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pred_type", PRED_TYPES)
@pytest.mark.parametrize("mode", GUIDANCE)
def test_ddim_step_fp32(shape, pred_type, mode):
    gen = torch.Generator().manual_seed(0)
    x, out = data(shape, 2, gen)
    a, s, ap, sp = coefs(shape[0], gen, pred_type)
    kw = dict(pred_type=pred_type, **guidance_kwargs(mode, x, gen))
    got = fused_ddim_step(x, out, a, s, ap, sp, backend="triton", **kw)
    want = ref.ddim_step_ref(x, out, a, s, ap, sp, **kw)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert rel_err(got, want) <= 1e-6
    last = fused_ddim_step(x, out, a, s, backend="triton", **kw)  # lands on x0
    assert rel_err(last, ref.ddim_step_ref(x, out, a, s, **kw)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pred_type", ["eps", "v", "flow"])
def test_ddim_step_low_precision(dtype, pred_type):
    gen = torch.Generator().manual_seed(1)
    x, out = data((3, 5, 7, 9), 2, gen, dtype)
    a, s, ap, sp = coefs(3, gen, pred_type)
    kw = dict(pred_type=pred_type, **guidance_kwargs("cond+w per-sample", x, gen))
    got = fused_ddim_step(x, out, a, s, ap, sp, backend="triton", **kw)
    assert got.dtype == dtype
    assert rel_err(got, ref.ddim_step_ref(x, out, a, s, ap, sp, **kw)) <= 1e-2
    # and against the same math on float32 copies of the inputs
    f32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == dtype else v) for k, v in kw.items()}
    assert rel_err(got, ref.ddim_step_ref(x.float(), out.float(), a, s, ap, sp, **f32)) <= 1e-2


def test_ddim_reference_is_the_library_math():
    """The coefficient-schedule reference equals schedule.to_x0_eps + sampling.ddim_step with real times."""
    vp = VPSchedule(vp_alphas_cumprod(1000, 0.00085, 0.012, "scaled_linear"))
    gen = torch.Generator().manual_seed(2)
    x, out, u = data((2, 4, 6, 6), 3, gen)
    t, t_prev = torch.tensor([0.999, 0.6], dtype=torch.float64), torch.tensor([0.5, 0.3], dtype=torch.float64)
    a, s = step_coefficients(vp, t)
    ap, sp = step_coefficients(vp, t_prev)
    from stepdistill.guidance import cfg_combine

    for sched, pred in ((vp, "v"), (vp, "eps"), (FlowSchedule(), "flow")):
        if sched is not vp:
            a, s, ap, sp = 1 - t.float(), t.float(), 1 - t_prev.float(), t_prev.float()
        guided = cfg_combine(out, u, 3.0)
        x0, eps = sched.to_x0_eps(guided, x, t, pred)
        want = ddim_step(sched, x0, eps, t, t_prev)
        got = ref.ddim_step_ref(x, out, a, s, ap, sp, pred_type=pred, model_out_uncond=u, guidance_scale=3.0)
        assert rel_err(got, want) <= 1e-5


# ------------------------------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pred_type", ["x0", "eps", "v"])
@pytest.mark.parametrize("renoise", [True, False])
def test_consistency_step_fp32(shape, pred_type, renoise):
    gen = torch.Generator().manual_seed(3)
    x, out, z = data(shape, 3, gen)
    a, s, an, sn = coefs(shape[0], gen)
    c_skip, c_out = torch.rand(shape[0], generator=gen), 0.7  # per-sample and scalar
    kw = dict(pred_type=pred_type, alpha=a, sigma=s)
    if renoise:
        kw.update(alpha_next=an, sigma_next=sn, noise=z)
    got = fused_consistency_step(x, out, c_skip, c_out, backend="triton", **kw)
    want = ref.consistency_step_ref(x, out, c_skip, c_out, **kw)
    assert got.dtype == x.dtype
    assert rel_err(got, want) <= 1e-6


def test_consistency_step_bf16_and_library():
    gen = torch.Generator().manual_seed(4)
    x, out, z = data((3, 5, 7, 9), 3, gen, torch.bfloat16)
    a, s, an, sn = coefs(3, gen)
    kw = dict(alpha_next=an, sigma_next=sn, noise=z)
    got = fused_consistency_step(x, out, 0.1, torch.tensor([0.9, 0.8, 0.7]), backend="triton", **kw)
    assert got.dtype == torch.bfloat16
    want = ref.consistency_step_ref(x, out, 0.1, torch.tensor([0.9, 0.8, 0.7]), **kw)
    assert rel_err(got, want) <= 1e-2
    # the reference is sampling.consistency_step on a schedule with those coefficients
    vp = VPSchedule(vp_alphas_cumprod())
    t_next = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    an, sn = step_coefficients(vp, t_next)
    xf, of, zf = x.float(), out.float(), z.float()
    lib = consistency_step(vp, xf, of, 0.1, torch.tensor([0.9, 0.8, 0.7]), t_next, zf)
    mine = ref.consistency_step_ref(xf, of, 0.1, torch.tensor([0.9, 0.8, 0.7]), alpha_next=an, sigma_next=sn, noise=zf)
    assert rel_err(mine, lib) <= 1e-6


# ------------------------------------------------------------------------------------------------- DMD2 / VSD


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("preds", [("eps", "eps"), ("x0", "x0"), ("v", "eps"), ("flow", "flow"), ("score", "x0")])
@pytest.mark.parametrize("mode", GUIDANCE)
def test_dmd_gradient_fp32(shape, preds, mode):
    gen = torch.Generator().manual_seed(5)
    x, xt, real, fake = data(shape, 4, gen)
    a, s, _, _ = coefs(shape[0], gen, preds[0])
    kw = dict(real_pred_type=preds[0], fake_pred_type=preds[1], **guidance_kwargs(mode, x, gen, "real_out_uncond"))
    got = fused_dmd_gradient(x, xt, real, fake, a, s, backend="triton", **kw)
    want = ref.dmd_gradient_ref(x, xt, real, fake, a, s, **kw)  # float64 inside, like losses.dmd_gradient
    assert got.dtype == x.dtype and torch.isfinite(got).all()
    assert rel_err(got, want) <= 1e-6


def test_dmd_gradient_block_loop(monkeypatch):
    """Tiny blocks so that the partial-sum reduction loops several times (NBLK > RBLOCK)."""
    monkeypatch.setattr(fused, "BLOCK", 16)
    monkeypatch.setattr(fused, "RBLOCK", 4)
    gen = torch.Generator().manual_seed(6)
    x, xt, real, fake = data((2, 3, 11, 13), 4, gen)
    a, s, _, _ = coefs(2, gen)
    got = fused_dmd_gradient(x, xt, real, fake, a, s, backend="triton")
    assert rel_err(got, ref.dmd_gradient_ref(x, xt, real, fake, a, s)) <= 1e-6
    p = torch.randn(2, 3, 11, 13, generator=gen)
    assert rel_err(pseudo_huber_loss(p, x, 0.5, backend="triton"), ref.pseudo_huber_distance_ref(p, x, 0.5)) <= 1e-6


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_dmd_gradient_bf16_and_zero_norm():
    gen = torch.Generator().manual_seed(7)
    x, xt, real, fake = data((3, 5, 7, 9), 4, gen, torch.bfloat16)
    a, s, _, _ = coefs(3, gen)
    kw = guidance_kwargs("uncond+w per-sample", x, gen, "real_out_uncond")
    got = fused_dmd_gradient(x, xt, real, fake, a, s, backend="triton", **kw)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref.dmd_gradient_ref(x, xt, real, fake, a, s, **kw)) <= 1e-2
    # x == x0_real for sample 0: norm 0, so g = nan_to_num(+-inf / nan) as in the reference
    x, xt, fake = data((3, 4, 5), 3, gen)
    real = x.clone()
    real[1:] += 0.5
    fake[0, 0] = real[0, 0]  # 0 / 0 -> 0 on that row
    for dtype in (torch.float32, torch.bfloat16):
        args = [v.to(dtype) for v in (x, xt, real, fake)]
        got = fused_dmd_gradient(*args, 1.0, 0.5, real_pred_type="x0", backend="triton")
        want = ref.dmd_gradient_ref(*args, 1.0, 0.5, real_pred_type="x0")
        assert torch.equal(got[0], want[0])
        assert got[0].abs().max() == torch.finfo(dtype).max and (got[0, 0] == 0).all()


@pytest.mark.parametrize("preds", [("eps", "eps"), ("v", "x0"), ("flow", "flow")])
@pytest.mark.parametrize("guide", ["none", "real", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vsd_gradient(preds, guide, dtype):
    gen = torch.Generator().manual_seed(8)
    xt, real, fake = data((3, 5, 7, 9), 3, gen, dtype)
    a, s, _, _ = coefs(3, gen, preds[0])
    kw = dict(real_pred_type=preds[0], fake_pred_type=preds[1])
    if guide != "none":
        kw.update(real_out_uncond=torch.randn(xt.shape, generator=gen).to(dtype), guidance_scale=torch.tensor(2.0))
    if guide == "both":
        kw["fake_out_uncond"] = torch.randn(xt.shape, generator=gen).to(dtype)
    got = fused_vsd_gradient(xt, real, fake, a, s, backend="triton", **kw)
    want = ref.vsd_gradient_ref(xt, real, fake, a, s, **kw)
    assert got.dtype == dtype
    assert rel_err(got, want) <= (1e-6 if dtype == torch.float32 else 1e-2)


def test_vsd_reference_is_losses_vsd_gradient():
    gen = torch.Generator().manual_seed(9)
    xt, er, ef = data((2, 3, 4), 3, gen)
    s = torch.tensor([0.3, 0.8])
    want = losses.vsd_gradient(er, ef, s).float()
    assert rel_err(ref.vsd_gradient_ref(xt, er, ef, (1 - s**2).sqrt(), s), want) <= 1e-7


# ------------------------------------------------------------------------------------------------- pseudo-Huber


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pseudo_huber_forward_backward(shape, dtype):
    gen = torch.Generator().manual_seed(10)
    p0, t0 = data(shape, 2, gen, dtype)
    upstream = torch.rand(shape[0], generator=gen) + 0.5  # a non-uniform incoming gradient per sample
    c = 0.03 * (torch.tensor(shape[1:]).prod().item() ** 0.5)  # iCT: c = 0.00054 sqrt(d), scaled up here

    p, t = p0.clone().requires_grad_(), t0.clone().requires_grad_()
    loss = pseudo_huber_loss(p, t, c, backend="triton")
    (loss * upstream).sum().backward()
    pr, tr = p0.clone().requires_grad_(), t0.clone().requires_grad_()
    loss_ref = ref.pseudo_huber_distance_ref(pr, tr, c)
    (loss_ref * upstream).sum().backward()

    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(loss, loss_ref) <= tol
    assert p.grad.dtype == dtype and t.grad.dtype == dtype
    assert rel_err(p.grad, pr.grad) <= tol
    assert rel_err(t.grad, tr.grad) <= tol


def test_pseudo_huber_finite_differences():
    gen = torch.Generator().manual_seed(11)
    p0, t0 = data((2, 3, 4), 2, gen)
    c, h = 1.0, 1e-2
    p = p0.clone().requires_grad_()
    pseudo_huber_loss(p, t0, c, backend="triton").sum().backward()  # target without grad: only d/d pred
    idx = torch.randint(0, p0.numel(), (8,), generator=gen)
    for i in idx.tolist():
        e = torch.zeros(p0.numel())
        e[i] = h
        e = e.reshape(p0.shape)
        up = pseudo_huber_loss(p0 + e, t0, c, backend="triton").sum()
        down = pseudo_huber_loss(p0 - e, t0, c, backend="triton").sum()
        fd = float((up - down) / (2 * h))
        assert abs(fd - float(p.grad.reshape(-1)[i])) <= 1e-3


def test_pseudo_huber_hand_values():
    a, b = torch.tensor([[3.0, 0.0], [1.0, 1.0]]), torch.zeros(2, 2)
    want = torch.tensor([(9 + 4) ** 0.5 - 2, (2 + 4) ** 0.5 - 2])
    assert torch.allclose(ref.pseudo_huber_distance_ref(a, b, 2.0), want)
    assert torch.allclose(pseudo_huber_loss(a, b, 2.0, backend="triton"), want)
    # c = 0 is the L2 norm
    assert torch.allclose(pseudo_huber_loss(a, b, 0.0, backend="triton"), torch.tensor([3.0, 2**0.5]))


# ------------------------------------------------------------------------------------------------- dispatch


def test_non_contiguous_inputs_are_copied():
    gen = torch.Generator().manual_seed(12)
    x, out = (v.transpose(1, 3) for v in data((2, 5, 3, 4), 2, gen))
    assert not x.is_contiguous()
    a, s, ap, sp = coefs(2, gen)
    got = fused_ddim_step(x, out, a, s, ap, sp, backend="triton")
    assert rel_err(got, ref.ddim_step_ref(x, out, a, s, ap, sp)) <= 1e-6


def test_pseudo_huber_non_contiguous():
    gen = torch.Generator().manual_seed(13)
    p0, t0 = (v.transpose(1, 2) for v in data((2, 3, 5), 2, gen))
    p = p0.clone().requires_grad_()
    pseudo_huber_loss(p, t0, 0.5, backend="triton").sum().backward()
    pr = p0.clone().requires_grad_()
    ref.pseudo_huber_distance_ref(pr, t0, 0.5).sum().backward()
    assert p.grad.shape == p0.shape and rel_err(p.grad, pr.grad) <= 1e-6


def test_autograd_contract():
    """Sampling kernels refuse inputs that need gradients; DM gradients are constants on both backends."""
    gen = torch.Generator().manual_seed(14)
    x, out = data((2, 3, 4), 2, gen)
    xg = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable.*x requires grad"):
        fused_ddim_step(xg, out, 0.5, 0.5, backend="triton")
    with pytest.raises(RuntimeError, match="model_out requires grad"):
        fused_consistency_step(x, out.clone().requires_grad_(), 0.5, 0.5, backend="triton")
    with torch.no_grad():
        fused_ddim_step(xg, out, 0.5, 0.5, backend="triton")
    assert fused_ddim_step(xg, out, 0.5, 0.5, backend="torch").requires_grad  # the reference is differentiable
    for backend in ("torch", "triton"):
        assert not fused_dmd_gradient(xg, x, out, xg * 2, 0.6, 0.8, backend=backend).requires_grad
        assert not fused_vsd_gradient(xg, out, xg * 2, 0.6, 0.8, backend=backend).requires_grad


def test_backend_resolution(monkeypatch):
    x = torch.zeros(2, 3)
    assert resolve_backend(None, x) == "torch"  # auto on CPU
    assert resolve_backend("auto", x) == "torch"
    monkeypatch.setenv("STEPDISTILL_KERNELS", "triton")
    assert resolve_backend(None, x) == "triton"  # interpreter on
    assert resolve_backend("torch", x) == "torch"  # the argument wins over the environment
    monkeypatch.setenv("STEPDISTILL_KERNELS", "cuda")
    with pytest.raises(ValueError, match="STEPDISTILL_KERNELS='cuda'"):
        resolve_backend(None, x)
    with pytest.raises(ValueError, match="backend='fast'"):
        resolve_backend("fast", x)
    with pytest.raises(TypeError, match="float64"):
        resolve_backend("triton", x.double())
    assert resolve_backend("auto", x.double()) == "torch"


def test_forced_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_ddim_step(x, x, 0.5, 0.5, backend="triton")
    monkeypatch.setenv("STEPDISTILL_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        pseudo_huber_loss(x, x, 1.0)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_kernels_reload_when_interpreter_flag_changes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused._kernels().INTERPRET_FLAG == "1"
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    assert fused._kernels().INTERPRET_FLAG == "true"
    x = torch.ones(2, 3)
    assert torch.equal(fused_ddim_step(x, x, 1.0, 0.0, pred_type="x0", backend="triton"), x)


def test_bad_inputs():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"model_out has shape \(2, 3, 5\) but x has shape \(2, 3, 4\)"):
        fused_ddim_step(x, torch.zeros(2, 3, 5), 0.5, 0.5)
    with pytest.raises(ValueError, match="dtype torch.bfloat16 but x has dtype torch.float32"):
        fused_ddim_step(x, x.bfloat16(), 0.5, 0.5)
    with pytest.raises(ValueError, match=r"noise has shape \(2, 3\) but x has shape \(2, 3, 4\)"):
        fused_consistency_step(x, x, 0.5, 0.5, alpha_next=0.5, sigma_next=0.5, noise=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"fake_out has shape \(1, 3, 4\) but x has shape \(2, 3, 4\)"):
        fused_dmd_gradient(x, x, x, torch.zeros(1, 3, 4), 0.5, 0.5)
    for backend in ("torch", "triton"):
        for w in (float("inf"), float("nan"), torch.tensor([1.0, float("nan")])):
            with pytest.raises(ValueError, match="finite"):
                fused_ddim_step(x, x, 0.5, 0.5, model_out_uncond=x, guidance_scale=w, backend=backend)
        with pytest.raises(ValueError, match="finite"):
            fused_vsd_gradient(x, x, x, 0.5, 0.5, real_out_uncond=x, guidance_scale=float("inf"), backend=backend)
    with pytest.raises(ValueError, match="without guidance_scale"):
        fused_ddim_step(x, x, 0.5, 0.5, model_out_uncond=x)
    with pytest.raises(ValueError, match="without model_out_uncond"):
        fused_ddim_step(x, x, 0.5, 0.5, guidance_scale=2.0)
    with pytest.raises(ValueError, match="unknown CFG convention"):
        fused_ddim_step(x, x, 0.5, 0.5, model_out_uncond=x, guidance_scale=2.0, convention="w")
    with pytest.raises(ValueError, match=r"alpha must be .* \(2,\) tensor"):
        fused_ddim_step(x, x, torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="edm"):
        fused_ddim_step(x, x, 0.5, 0.5, pred_type="edm")
    with pytest.raises(ValueError, match="alpha_next, sigma_next and noise"):
        fused_consistency_step(x, x, 0.5, 0.5, alpha_next=0.5)
    with pytest.raises(ValueError, match="c must be"):
        pseudo_huber_loss(x, x, -1.0)
    # diffusers' names are accepted
    got = fused_ddim_step(x + 1, x, 0.6, 0.8, 1.0, 0.0, pred_type="epsilon", backend="triton")
    assert torch.allclose(got, (x + 1) / 0.6)


def test_capture_generator_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA graphs exist only on CUDA"):
        capture_generator(lambda z: z * 2, (torch.zeros(2, 3),))
    with pytest.raises(TypeError, match="example_inputs"):
        capture_generator(lambda z: z, 3)


# ---------------------------------------------------------------------------------------------- hot paths
def test_sampler_dispatches_to_the_fused_step(monkeypatch):
    """sampling.sample takes the fused DDIM step when the dispatch picks Triton (CUDA, or forced under the
    interpreter here) and gives what the torch path gives."""
    from stepdistill.sampling import sample

    sched = VPSchedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"})
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))

    def model(x, t):  # any deterministic function of (x, t) stands in for a network
        return torch.tanh(x @ w) * t.float().reshape(-1, 1)

    noise = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    calls = []
    real = fused.fused_ddim_step
    monkeypatch.setattr("stepdistill.ops.fused_ddim_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("STEPDISTILL_KERNELS", backend)
        outs[backend] = sample(model, sched, noise, 4, pred_type="v")
    assert len(calls) == 4  # the triton run, one fused step per sampling step
    assert rel_err(outs["triton"], outs["torch"]) <= 1e-5


def test_dmd2_gradient_dispatches_to_the_fused_kernel(toy_teacher, tmp_path, monkeypatch):
    from stepdistill.config import build_config
    from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer

    trainer = DMD2Trainer(
        build_config(
            DMD2Config,
            dict(teacher=toy_teacher, dataset="toy2d:gmm8", output_dir=str(tmp_path), global_batch=8, progress=False),
        )
    )
    trainer.setup()
    with torch.no_grad():  # a fake score that differs from the teacher, so that g != 0
        for p in trainer.fake.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("STEPDISTILL_KERNELS", backend)
        torch.manual_seed(3)
        x.grad = None
        trainer.dm_loss(x, None).backward()
        grads[backend] = x.grad.clone()
    assert grads["torch"].abs().max() > 0
    assert rel_err(grads["triton"], grads["torch"]) <= 1e-5
