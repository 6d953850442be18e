"""MeanFlow (stepdistill.trainers.meanflow, stepdistill.models.meanflow): the JVP, the identity target and the
adaptive loss against hand-worked values on a linear network; the identity on the exact average velocity of Gaussian
data; the (r, t) sampler; the second time input (zero-initialised: the student starts as the teacher's velocity);
1- and 2-step sampling; config refusals."""

import math

import pytest
import torch

from stepdistill.config import ConfigError, build_config
from stepdistill.models.analytic import MixtureDataset, ddpm_schedule, mixture_teacher, toy_mixture
from stepdistill.models.denoiser import Denoiser
from stepdistill.models.jvp import JVP
from stepdistill.models.meanflow import MeanFlowGenerator, flow_range, flow_velocity, with_second_time
from stepdistill.models.toy import ToyMLP
from stepdistill.schedules import FlowSchedule
from stepdistill.trainers.meanflow import (
    MeanFlowConfig,
    MeanFlowTrainer,
    meanflow_jvp,
    meanflow_loss,
    meanflow_target,
    sample_r_t,
)

A = torch.tensor([[1.0, 2.0], [0.0, 3.0]], dtype=torch.float64)
B = torch.tensor([1.0, -1.0], dtype=torch.float64)
C = torch.tensor([0.5, 0.5], dtype=torch.float64)


def linear_u(z, r, t):
    """u(z, r, t) = A z + b t + c r: du/dt along (v, 0, 1) is A v + b."""
    return z @ A.T + t[:, None] * B + r[:, None] * C


@pytest.mark.parametrize("jvp_fn", [JVP("forward"), JVP("finite_difference", 1e-4)], ids=["forward", "finite_diff"])
def test_jvp_target_and_loss_by_hand_on_a_linear_network(jvp_fn):
    z = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    t, r = torch.tensor([0.8], dtype=torch.float64), torch.tensor([0.2], dtype=torch.float64)
    u, du_dt = meanflow_jvp(linear_u, z, r, t, v, jvp_fn)
    # u = A z + 0.8 b + 0.2 c = (3, 3) + (0.8, -0.8) + (0.1, 0.1); du/dt = A v + b = (-3, -6) + (1, -1)
    torch.testing.assert_close(u, torch.tensor([[3.9, 2.3]], dtype=torch.float64))
    torch.testing.assert_close(du_dt, torch.tensor([[-2.0, -7.0]], dtype=torch.float64), rtol=1e-6, atol=1e-6)
    target = meanflow_target(v, du_dt, t, r)  # v - 0.6 du/dt = (1 + 1.2, -2 + 4.2)
    torch.testing.assert_close(target, torch.tensor([[2.2, 2.2]], dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # delta = u - target = (1.7, 0.1), ||delta||^2 = 2.9; p = 1, c = 0.1: w = 1 / 3, loss = 2.9 / 3
    u_req = u.clone().requires_grad_()
    loss = meanflow_loss(u_req, target, p=1.0, c=0.1)
    assert math.isclose(float(loss.detach()), 2.9 / 3.0, rel_tol=1e-5)
    loss.backward()  # the weight is a constant (stop-gradient): d loss / d u = 2 delta / 3
    torch.testing.assert_close(u_req.grad, torch.tensor([[3.4 / 3, 0.2 / 3]], dtype=torch.float64), rtol=1e-5, atol=0)
    # p = 0: the plain squared error; p = 0.5, c = 0: ||delta||
    assert math.isclose(float(meanflow_loss(u, target, p=0.0, c=1.0)), 2.9, rel_tol=1e-5)
    assert math.isclose(float(meanflow_loss(u, target, p=0.5, c=1e-12)), math.sqrt(2.9), rel_tol=1e-5)


def test_identity_recovers_the_exact_average_velocity_of_gaussian_data():
    """x ~ N(0, s^2): the flow's marginal std is m(tau) = sqrt((1 - tau)^2 s^2 + tau^2), the ODE scales z by
    m(r) / m(t), so u(z, r, t) = z (1 - m(r) / m(t)) / (t - r) and v(z, t) = z m'(t) / m(t). The identity's target,
    built from the exact u and v, is the exact u."""
    s = 0.5

    def m(tau):
        return ((1 - tau) ** 2 * s * s + tau * tau).sqrt()

    def u_exact(z, r, t):
        return z * ((1 - m(r) / m(t)) / (t - r))[:, None]

    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.1, 0.4, 0.0], dtype=torch.float64)
    z = torch.tensor([[1.0], [-0.7], [2.0]], dtype=torch.float64)
    dm = (-(1 - t) * s * s + t) / m(t)
    v = z * (dm / m(t))[:, None]
    u, du_dt = meanflow_jvp(u_exact, z, r, t, v)
    torch.testing.assert_close(meanflow_target(v, du_dt, t, r), u, rtol=1e-10, atol=1e-12)
    # and a wrong velocity gives a wrong target (the check has teeth)
    assert not torch.allclose(meanflow_target(1.1 * v, meanflow_jvp(u_exact, z, r, t, 1.1 * v)[1], t, r), u)


def test_r_t_sampler_orders_times_and_keeps_the_ratio():
    g = torch.Generator().manual_seed(0)
    r, t = sample_r_t(20000, -0.6, 1.6, -4.0, 1.6, ratio_r_neq_t=0.75, generator=g)
    assert r.dtype == torch.float64 and (r <= t).all() and ((t > 0) & (t < 1)).all()
    assert abs(float((r < t).float().mean()) - 0.75) < 0.02
    r, t = sample_r_t(2000, ratio_r_neq_t=0.0, generator=g)
    assert torch.equal(r, t)
    # t = max of two logit-normal draws: its median is sigmoid of the median of the max of two N(-0.4, 1)
    r, t = sample_r_t(20000, -0.4, 1.0, -0.4, 1.0, ratio_r_neq_t=1.0, generator=g)
    assert abs(float(torch.logit(t).median()) - (-0.4 + 0.545)) < 0.03  # median of max of 2 N(0,1): 0.545


def _tiny_unets():
    from tiny_models import tiny_sd_unet, tiny_unet2d

    return [tiny_unet2d(sample_size=8), tiny_sd_unet()]


def test_second_time_input_starts_as_the_network_and_refuses_a_w_conditioned_one():
    torch.manual_seed(0)
    toy = ToyMLP(dim=2, hidden=16, layers=2)
    x, ts = torch.randn(3, 2), torch.tensor([10.0, 500.0, 990.0])
    new = with_second_time(toy, 16)
    assert new.config.time_cond_proj_dim == 16
    torch.testing.assert_close(new(x, ts, None, timestep_cond=torch.randn(3, 16)), toy(x, ts))
    unet, sd = _tiny_unets()
    img = torch.randn(2, 3, 8, 8)
    labels = torch.tensor([1, 2])
    g_unet = with_second_time(unet, 32)
    ref = unet(img, ts[:2], class_labels=labels).sample
    torch.testing.assert_close(g_unet(img, ts[:2], class_labels=labels, timestep_cond=torch.randn(2, 32)).sample, ref)
    lat, ehs = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    g_sd = with_second_time(sd, 32)
    torch.testing.assert_close(
        g_sd(lat, ts[:2], encoder_hidden_states=ehs, timestep_cond=torch.randn(2, 32)).sample,
        sd(lat, ts[:2], encoder_hidden_states=ehs).sample,
    )
    with pytest.raises(ValueError, match="already has a timestep_cond"):
        with_second_time(new, 16)


def _student(schedule, pred, seed=0):
    torch.manual_seed(seed)
    teacher_net = ToyMLP(dim=2, hidden=32, layers=2)
    teacher = Denoiser(teacher_net, schedule, pred)
    net = with_second_time(teacher_net, 16)
    with torch.no_grad():  # a trained r-projection, so that u depends on r
        net.cond_proj.weight.normal_(0, 0.3)
    return teacher, MeanFlowGenerator(net, schedule, pred, num_steps=2)


@pytest.mark.parametrize("schedule,pred", [(ddpm_schedule(), "v"), (FlowSchedule(), "flow")], ids=["vp", "flow"])
def test_student_starts_as_the_teacher_velocity_and_its_jvp_matches_a_finite_difference(schedule, pred):
    teacher, gen = _student(schedule, pred)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.6, 0.35, 0.2], dtype=torch.float64)
    r = torch.tensor([0.1, 0.0, 0.3, 0.05], dtype=torch.float64)
    with torch.no_grad():
        gen.net.cond_proj.weight.zero_()  # a fresh second input: u(z, r, t) = v(z, t) for every r
        torch.testing.assert_close(gen.u(z, r, t), flow_velocity(teacher, z, t), rtol=1e-5, atol=1e-6)
        gen.net.cond_proj.weight.normal_(0, 0.3)
        assert not torch.allclose(gen.u(z, r, t), flow_velocity(teacher, z, t), atol=1e-3)
    v = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    u_fn = lambda z_, r_, t_: gen.u(z_, r_, t_)  # noqa: E731
    u, d_fwd = meanflow_jvp(u_fn, z, r, t, v, JVP("forward"))
    _, d_fd = meanflow_jvp(u_fn, z, r, t, v, JVP("finite_difference", 1e-4))
    torch.testing.assert_close(u, gen.u(z, r, t))
    # float32 network, float64 times; VP: t' interpolates alpha_bar linearly between integer timesteps (kinks)
    assert float(((d_fwd - d_fd).norm() / d_fd.norm()).detach()) < 1e-2


def test_one_and_two_step_sampling_follow_the_meanflow_rule():
    _, gen = _student(ddpm_schedule(), "v")
    tau_min, tau_max = flow_range(ddpm_schedule())
    assert 0.009 < tau_min < 0.011 and 0.993 < tau_max < 0.994 and gen.tau_max == tau_max
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    z0 = gen.initial_noise(noise)
    top = torch.ones(1, dtype=torch.float64)
    sched = gen.schedule
    torch.testing.assert_close(z0 * float(sched.alpha(top) + sched.sigma(top)), noise)  # x' = noise at t' = 1
    with torch.no_grad():
        one = gen.sample(noise, num_steps=1)
        t1 = torch.full((5,), tau_max, dtype=torch.float64)
        torch.testing.assert_close(one, z0 - tau_max * gen.u(z0, torch.zeros(5, dtype=torch.float64), t1))
        two = gen.sample(noise)  # the trained count: 2 steps, tau_max -> tau_max / 2 -> 0
        mid = torch.full((5,), tau_max / 2, dtype=torch.float64)
        z_mid = z0 - (tau_max / 2) * gen.u(z0, mid, t1)
        torch.testing.assert_close(two, z_mid - (tau_max / 2) * gen.u(z_mid, torch.zeros_like(mid), mid))


def test_config_refusals():
    with pytest.raises(ConfigError, match="generator_mode"):
        build_config(MeanFlowConfig, {"generator_mode": "lora"})
    with pytest.raises(ConfigError, match="mode: distill"):
        build_config(MeanFlowConfig, {"mode": "data", "guidance_scale": 2.0})
    with pytest.raises(ConfigError, match="jvp must be one of"):
        build_config(MeanFlowConfig, {"jvp": "finite_diff"})
    with pytest.raises(ConfigError, match="ratio_r_neq_t"):
        build_config(MeanFlowConfig, {"ratio_r_neq_t": 1.5})


@pytest.mark.parametrize("mode", ["data", "distill"])
def test_trainer_runs_on_the_analytic_teacher_and_moves_the_one_step_sampler(mode, tmp_path):
    mix = toy_mixture("gmm8")
    cfg = MeanFlowConfig(
        output_dir=str(tmp_path),
        mode=mode,
        max_steps=3,
        global_batch=32,
        checkpoint_every=0,
        progress=False,
        learning_rate=1e-2,
    )
    gen = ToyMLP(dim=2, hidden=16, layers=2)
    tr = MeanFlowTrainer(
        cfg, teacher=mixture_teacher(mix, FlowSchedule(), "flow"), generator=gen, dataset=MixtureDataset(mix, 128)
    )
    tr.train()
    assert isinstance(tr.generator, MeanFlowGenerator) and tr.generator.net.config.time_cond_proj_dim == 256
    assert all(math.isfinite(h["loss"]) for h in tr.history)
    assert tr.generator.net.cond_proj.weight.abs().sum() > 0  # the second input trains


def test_time_shift_reads_du_dt_in_time_over_network_timesteps(tmp_path):
    """``jvp_time_shift``: the z part of du/dt stays the JVP, the t part is a difference over +- that many network
    timesteps (one-sided at the top flow time, where the 1-step sampler starts); a small shift is the exact JVP."""
    with pytest.raises(ConfigError, match="jvp_time_shift must be >= 0"):
        build_config(MeanFlowConfig, {"jvp_time_shift": -1.0})
    mix = toy_mixture("gmm8")
    cfg = MeanFlowConfig(output_dir=str(tmp_path), max_steps=1, global_batch=8, checkpoint_every=0, progress=False,
                         jvp="forward")
    torch.manual_seed(0)
    tr = MeanFlowTrainer(cfg, teacher=mixture_teacher(mix), generator=ToyMLP(dim=2, hidden=16, layers=2),
                         dataset=MixtureDataset(mix, 32))
    tr.setup()
    gen = tr.generator
    with torch.no_grad():
        gen.net.cond_proj.weight.normal_(0, 0.3)
    sched = gen.schedule

    def flow_t(timestep):  # the flow time of a network timestep
        level = sched.noise_level(torch.as_tensor(timestep, dtype=torch.float64) / 999)
        return (level / (1 + level)).clamp(max=gen.tau_max)

    t = flow_t([300.3, 600.6, 998.5])  # between integer timesteps (alpha_bar is interpolated linearly)
    r = torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64)
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    v = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    exact = tr.du_dt(z, r, t, v, None)
    tr.config.jvp_time_shift = 0.05  # small (the network is float32)
    torch.testing.assert_close(tr.du_dt(z, r, t, v, None)[:2], exact[:2], rtol=1e-2, atol=1e-4)
    tr.config.jvp_time_shift = 1.0
    with torch.no_grad():
        dz = torch.func.jvp(lambda z_: gen.u(z_, r, t), (z,), (v,))[1]
        hi, lo = flow_t([301.3, 601.6, 999.0]), flow_t([299.3, 599.6, 997.5])
        want = (dz + (gen.u(z, r, hi) - gen.u(z, r, lo)) / (hi - lo)[:, None]).float()
    got = tr.du_dt(z, r, t, v, None)
    assert float((got - want).norm() / want.norm()) < 1e-2
