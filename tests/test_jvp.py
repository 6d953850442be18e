"""stepdistill.models.jvp: forward-mode JVP through the Denoiser contract, its finite-difference fallback."""

import pytest
import torch
from tiny_models import tiny_dit, tiny_sd3_transformer, tiny_sd_unet, tiny_unet2d
from torch import nn

from stepdistill.config import ConfigError
from stepdistill.models import Cond, Denoiser
from stepdistill.models.adapters import add_lora
from stepdistill.models.jvp import JVP, check_jvp_mode, denoiser_jvp, jvp, time_difference
from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule, vp_alphas_cumprod


class Linear(nn.Module):
    """out = W x + c * timestep: its JVP along (dx, d timestep) is W dx + c d timestep."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.tensor([[1.0, 2.0], [-0.5, 3.0]]))
        self.c = nn.Parameter(torch.tensor([0.25, -1.0]))

    def forward(self, x, timestep, cond=None):
        return x @ self.W.T + timestep[:, None] * self.c


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("mode", ["forward", "finite_difference", "auto"])
def test_hand_worked_linear_network(mode):
    # flow schedule: timestep = 1000 t, so d timestep / dt = 1000; x0 = x_t - t F (F the raw flow output)
    model = Denoiser(Linear(), FlowSchedule(), "flow")
    x = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    dx = torch.tensor([[0.1, 0.2], [-1.0, 0.0]])
    dt = torch.tensor([0.5, -0.25], dtype=torch.float64)
    W, c = model.net.W.detach(), model.net.c.detach()
    raw = x @ W.T + (1000 * t.float())[:, None] * c
    draw = dx @ W.T + (1000 * dt.float())[:, None] * c
    with torch.no_grad():
        out, dout = denoiser_jvp(model, x, t, dx, dt, mode=mode)
    torch.testing.assert_close(out, raw)
    tol = dict(rtol=1e-3, atol=1e-3) if mode == "finite_difference" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dout, draw, **tol)
    # through the conversion: x0 = x - t F, so d x0 = dx - dt F - t dF
    out0, dout0 = denoiser_jvp(model, x, t, dx, dt, target="x0", mode=mode)
    tt, dtt = t.float()[:, None], dt.float()[:, None]
    torch.testing.assert_close(out0, x - tt * raw)
    torch.testing.assert_close(dout0, dx - dtt * raw - tt * draw, **tol)
    assert not dout0.requires_grad  # no graph by default


def _vp():
    return VPSchedule(vp_alphas_cumprod())


def _sd_cond(n):
    g = torch.Generator().manual_seed(3)
    return Cond(kwargs={"encoder_hidden_states": torch.randn(n, 5, 32, generator=g)})


CASES = {
    "unet2d": lambda: (Denoiser(tiny_unet2d(), _vp(), "eps"), (3, 8, 8), Cond({"class_labels": torch.tensor([1, 7])})),
    "sd_unet": lambda: (Denoiser(tiny_sd_unet(), _vp(), "eps"), (4, 8, 8), _sd_cond(2)),
    # train mode: DiT's label dropout draws random numbers; the finite differences must see the same draws
    "dit": lambda: (
        Denoiser(tiny_dit().train(), _vp(), "eps"),
        (4, 8, 8),
        Cond({"class_labels": torch.tensor([1, 2])}),
    ),
    "sd3": lambda: (
        Denoiser(tiny_sd3_transformer(), FlowSchedule(shift=3.0), "flow"),
        (4, 8, 8),
        Cond({"encoder_hidden_states": torch.randn(2, 5, 96), "pooled_projections": torch.randn(2, 64)}),
    ),
}


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *shape, generator=g)
    return x, torch.tensor([0.6, 0.3], dtype=torch.float64), torch.randn(2, *shape, generator=g)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_finite_difference_on_tiny_networks(name):
    torch.manual_seed(0)
    model, shape, cond = CASES[name]()
    x, t, dx = _inputs(shape)
    dt = torch.tensor([0.5, -1.0], dtype=torch.float64)
    torch.manual_seed(1)
    with torch.no_grad():
        out_f, d_f = denoiser_jvp(model, x, t, dx, dt, cond, mode="forward")
    torch.manual_seed(1)
    with torch.no_grad():
        out_d, d_d = denoiser_jvp(model, x, t, dx, dt, cond, mode="finite_difference", eps=1e-3)
    torch.testing.assert_close(out_f, out_d, rtol=1e-4, atol=1e-5)
    assert _rel(d_f, d_d) < 5e-3, (name, _rel(d_f, d_d))
    assert d_f.abs().sum() > 0


def test_edm_denoiser_x0_target_agrees():
    """The EDM preconditioning (c_in, c_noise = ln sigma / 4) and its x0 conversion are differentiated too."""
    model = Denoiser(tiny_unet2d(), EDMSchedule(), "edm")
    x, t, dx = _inputs((3, 8, 8), seed=4)
    cond = Cond({"class_labels": torch.tensor([0, 3])})
    kw = dict(target="x0")
    _, d_f = denoiser_jvp(model, x, t, dx, 0.3, cond, mode="forward", **kw)
    _, d_d = denoiser_jvp(model, x, t, dx, 0.3, cond, mode="finite_difference", **kw)
    assert _rel(d_f, d_d) < 5e-3


def test_lora_network():
    net = tiny_sd_unet()
    add_lora(net, rank=4, init_lora_weights=False)  # random B: the adapters change the output
    model = Denoiser(net, _vp(), "eps")
    x, t, dx = _inputs((4, 8, 8), seed=1)
    _, d_f = denoiser_jvp(model, x, t, dx, 1.0, _sd_cond(2), mode="forward")
    _, d_d = denoiser_jvp(model, x, t, dx, 1.0, _sd_cond(2), mode="finite_difference")
    assert _rel(d_f, d_d) < 5e-3


def test_gradient_checkpointing():
    net = tiny_sd_unet()
    model = Denoiser(net, _vp(), "eps")
    x, t, dx = _inputs((4, 8, 8), seed=2)
    _, ref = denoiser_jvp(model, x, t, dx, 1.0, _sd_cond(2), mode="forward")
    net.enable_gradient_checkpointing()
    net.train()
    # without a graph (what sCM / MeanFlow use): checkpointing is inactive, the JVP is unchanged
    _, d = denoiser_jvp(model, x, t, dx, 1.0, _sd_cond(2), mode="forward")
    torch.testing.assert_close(d, ref)
    # with a graph, forward mode would fail in backward: refused in one line
    with pytest.raises(ValueError, match="gradient checkpointing") as err:
        denoiser_jvp(model, x, t, dx, 1.0, _sd_cond(2), mode="forward", create_graph=True)
    assert "\n" not in str(err.value)
    # auto takes finite differences there, and backward works through them
    runner = JVP("auto")
    out, d = denoiser_jvp(model, x, t, dx, 1.0, _sd_cond(2), mode=runner, create_graph=True)
    assert runner.used == "finite_difference" and d.requires_grad
    (out.square().mean() + d.square().mean()).backward()
    assert net.conv_in.weight.grad is not None and torch.isfinite(net.conv_in.weight.grad).all()
    assert _rel(d.detach(), ref) < 5e-3


class _NoForwardRule(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return 3 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 3 * g


def test_auto_falls_back_once_and_forward_refuses():
    def fn(x):
        return _NoForwardRule.apply(x).sin()

    x, v = torch.tensor([0.1, 0.7]), torch.tensor([1.0, -2.0])
    runner = JVP("auto", eps=1e-4)
    with pytest.warns(UserWarning, match="finite differences"):
        out, d = runner(fn, (x,), (v,))
    assert runner.used == "finite_difference"
    torch.testing.assert_close(d, 3 * (3 * x).cos() * v, rtol=1e-3, atol=1e-3)
    out2, _ = runner(fn, (x,), (v,))  # remembered: no second warning
    torch.testing.assert_close(out2, out)
    with pytest.raises(ValueError, match="forward-mode AD is not available"):
        jvp(fn, (x,), (v,), mode="forward")


def test_finite_difference_leaves_random_state_as_one_forward():
    def fn(x):
        return x + torch.rand(x.shape)

    torch.manual_seed(5)
    ref = fn(torch.zeros(3))
    after_ref = torch.rand(1)
    torch.manual_seed(5)
    out, d = jvp(fn, (torch.zeros(3),), (torch.ones(3),), mode="finite_difference")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.rand(1), after_ref)
    torch.testing.assert_close(d, torch.ones(3), rtol=0, atol=1e-4)  # the same noise in every pass


def test_config_check():
    check_jvp_mode("auto", 1e-3)
    with pytest.raises(ConfigError, match="jvp must be one of"):
        check_jvp_mode("reverse")
    with pytest.raises(ConfigError, match="jvp_eps"):
        check_jvp_mode("finite_difference", 0.0)


def test_forward_mode_bypasses_an_autocast_wrapper():
    """accelerate's mixed precision wraps a prepared network's forward in autocast (keeping ``_original_forward``);
    the forward-mode pass runs in full precision (bf16 autocast weight casts fail under torch.func.jvp on CPU)."""
    import types

    torch.manual_seed(0)
    net = nn.Linear(3, 3)
    exact = net.weight.detach()
    net._original_forward = net.forward
    wrapped = torch.autocast("cpu", dtype=torch.bfloat16)(type(net).forward)
    net.forward = types.MethodType(wrapped, net)
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    assert net(x).dtype == torch.bfloat16  # the wrapper is active outside the JVP
    out, d = jvp(lambda y: net(y), (x,), (v,), mode="forward", nets=(net,))
    assert out.dtype == d.dtype == torch.float32
    torch.testing.assert_close(d, v @ exact.T, rtol=1e-6, atol=1e-6)
    assert net(x).dtype == torch.bfloat16  # restored


def test_time_difference_reads_the_trend_under_timestep_wiggles_and_is_one_sided_at_the_ends():
    """A network time input tau = 1000 t and a function with a wiggle of one network timestep's period: the exact
    derivative is dominated by the wiggle, a difference over +- 10 timesteps reads the trend exactly; at the ends
    of the range the difference is one-sided over the times actually reached."""
    t = torch.tensor([0.3, 0.5, 1.0, 0.0], dtype=torch.float64)
    tau = lambda t_: 1000 * t_  # noqa: E731

    def fn(t_):
        return (2 * t_ + 1e-3 * torch.sin(2 * torch.pi * tau(t_)))[:, None].expand(-1, 3)

    exact = torch.func.jvp(fn, (t,), (torch.ones_like(t),))[1]
    assert float((exact[:2, 0] - 2).abs().min()) > 3  # 2 + 2 pi cos(2 pi tau): the wiggle dominates
    d = time_difference(fn, t, 10.0, tau, (0.0, 1.0))
    assert d.shape == (4, 3)
    torch.testing.assert_close(d, torch.full_like(d, 2.0), rtol=0, atol=1e-9)
    quad = time_difference(lambda t_: (t_ * t_)[:, None], t, 10.0, tau, (0.0, 1.0))[:, 0]
    # interior: central, exact for a quadratic (2 t); ends: one-sided over 0.01, (1 - 0.99^2) / 0.01, 0.01^2 / 0.01
    torch.testing.assert_close(quad, torch.tensor([0.6, 1.0, 1.99, 0.01], dtype=torch.float64))
