"""sCM (stepdistill.trainers.scm): the TrigFlow view, the loss against hand-worked values on a tiny linear network,
and the trainer (sCD / sCT) end to end on the analytic mixture teacher."""

import copy
import math

import pytest
import torch
from torch import nn

from stepdistill.cli import main
from stepdistill.config import ConfigError, build_config
from stepdistill.models.analytic import GaussianMixture, MixtureDataset, ddpm_schedule, mixture_teacher, toy_mixture
from stepdistill.models.jvp import JVP
from stepdistill.models.toy import ToyMLP
from stepdistill.schedules import EDMSchedule, FlowSchedule, TrigFlow, VPSchedule, vp_alphas_cumprod
from stepdistill.trainers.scm import (
    LogVarHead,
    SCMConfig,
    SCMTrainer,
    clip_tangent,
    normalize_tangent,
    sample_t_hat,
    scm_loss,
    scm_tangent,
    tangent_warmup,
)

SCHEDULES = {
    "vp": lambda: VPSchedule(vp_alphas_cumprod()),
    "edm": lambda: EDMSchedule(),
    "flow": lambda: FlowSchedule(),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_trigflow_round_trips_and_matches_the_native_forward_process(kind):
    sched = SCHEDULES[kind]()
    trig = TrigFlow(sched, sigma_data=0.7)
    t = torch.tensor([0.02, 0.3, 0.6, 0.95], dtype=torch.float64)
    t_hat = trig.t_hat(t)
    assert ((t_hat > 0) & (t_hat < math.pi / 2)).all()
    torch.testing.assert_close(trig.t_native(t_hat), t, rtol=0, atol=1e-9)
    # the same signal-to-noise ratio: sigma_d tan(that) = sigma / alpha
    torch.testing.assert_close(0.7 * torch.tan(t_hat), sched.noise_level(t))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    x_hat = trig.add_noise(x0, 0.7 * eps, t_hat)
    x_t, t_back = trig.to_native(x_hat, t_hat)
    torch.testing.assert_close(x_t, sched.add_noise(x0, eps, t))  # the native point of the same sample
    torch.testing.assert_close(t_back, t, rtol=0, atol=1e-9)
    x_hat2, t_hat2 = trig.from_native(x_t, t)
    torch.testing.assert_close(x_hat2, x_hat)
    torch.testing.assert_close(t_hat2, t_hat)
    # F <-> x0, and the consistency function is the x0 it was made from
    F = trig.F_from_x0(x_hat, x0, t_hat)
    torch.testing.assert_close(trig.x0_from_F(x_hat, F, t_hat), x0)
    # along the pair's path, dx/dthat = cos z - sin x0, and F of the true x0 is velocity / sigma_d
    torch.testing.assert_close(0.7 * F, trig.velocity(x0, 0.7 * eps, t_hat))


def test_flow_trigflow_reaches_pure_noise():
    trig = TrigFlow(FlowSchedule(), 0.5)
    assert float(trig.t_native(torch.tensor(math.pi / 2, dtype=torch.float64))) == pytest.approx(1.0)
    assert float(trig.t_hat(1.0)) == pytest.approx(math.pi / 2)


# --------------------------------------------------------------------------------------------------------
# the loss on a tiny linear network, by hand
# --------------------------------------------------------------------------------------------------------


class LinearF(nn.Module):
    """F(x, that) = A x + b that: its JVP along (dx, dthat) is A dx + b dthat."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([0.3, -0.6], dtype=torch.float64))

    def forward(self, x, t_hat):
        return x @ self.A.T + t_hat[:, None] * self.b


@pytest.mark.parametrize("mode", ["forward", "finite_difference"])
def test_loss_against_hand_worked_values_on_a_linear_network(mode):
    net, sd = LinearF(), 0.5
    x = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    th = torch.tensor([0.8], dtype=torch.float64)
    dxdt = torch.tensor([[0.2, 0.4]], dtype=torch.float64)  # e.g. the teacher's sigma_d F_teacher
    c, s = math.cos(0.8), math.sin(0.8)
    A, b = net.A.detach(), net.b.detach()
    # by hand: F, its JVP along (cos sin dx/dt, cos sin), the tangent, its normalisation and the loss
    F_hand = x[0] @ A.T + 0.8 * b
    jvp_hand = A @ (c * s * dxdt[0]) + b * (c * s)
    g_hand = -(c**2) * (sd * F_hand - dxdt[0]) - 0.5 * (c * s * x[0] + sd * jvp_hand)  # r = 0.5
    gn_hand = g_hand / (float(g_hand.square().mean().sqrt()) + 0.1)
    w, u = 1 / (sd * math.tan(0.8)), 0.3
    loss_hand = w * math.exp(-u) * float(gn_hand.square().mean()) + u
    grad_A_hand = -(2 * w * math.exp(-u) / 2) * torch.outer(gn_hand, x[0])  # d/dA of w e^-u mean||F - sg F - g||^2

    cs = torch.cos(th) * torch.sin(th)
    F = net(x, th)
    _, F_jvp = JVP(mode, eps=1e-4)(net, (x, th), (cs[:, None] * dxdt, cs))
    torch.testing.assert_close(F[0].detach(), F_hand)
    torch.testing.assert_close(F_jvp[0], jvp_hand, rtol=1e-6, atol=1e-6)
    g = scm_tangent(F.detach(), F_jvp, x, dxdt, th, sd, r=0.5)
    torch.testing.assert_close(g[0], g_hand, rtol=1e-6, atol=1e-6)
    gn = normalize_tangent(g, 0.1)
    torch.testing.assert_close(gn[0], gn_hand, rtol=1e-6, atol=1e-6)
    per = scm_loss(F, gn.detach(), torch.tensor([u], dtype=torch.float64), 1 / (sd * torch.tan(th)))
    assert float(per.detach()) == pytest.approx(loss_hand, rel=1e-6)
    per.sum().backward()
    torch.testing.assert_close(net.A.grad, grad_A_hand, rtol=1e-6, atol=1e-6)


def test_consistency_function_of_a_static_ode_has_zero_tangent():
    """Data N(0, sigma_d^2): every TrigFlow marginal is N(0, sigma_d^2), the teacher's x0 = cos(t) x, dx/dt = 0 and
    the consistency function is f = x, i.e. F = (cos - 1) x / (sigma_d sin): the tangent of that F is 0 at r = 1."""
    sd = 0.5
    x = torch.tensor([[0.7, -1.2, 0.1]], dtype=torch.float64)
    th = torch.tensor([0.3, 1.1], dtype=torch.float64)
    x = x.expand(2, 3)

    def F_cm(x, t):
        return ((torch.cos(t) - 1) / (sd * torch.sin(t)))[:, None] * x

    cs = torch.cos(th) * torch.sin(th)
    F, F_jvp = JVP("forward")(F_cm, (x, th), (torch.zeros_like(x), cs))
    g = scm_tangent(F, F_jvp, x, torch.zeros_like(x), th, sd, r=1.0)
    torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-12)
    # the teacher (F = 0: x0 = cos x) is not consistent: its tangent is -cos sin x
    g0 = scm_tangent(torch.zeros_like(x), torch.zeros_like(x), x, torch.zeros_like(x), th, sd, r=1.0)
    torch.testing.assert_close(g0, -cs[:, None] * x)


def test_small_pieces():
    g = torch.tensor([[3.0, -0.5], [0.2, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(clip_tangent(g), torch.tensor([[1.0, -0.5], [0.2, 0.1]], dtype=torch.float64))
    assert tangent_warmup(0, 10) == 0.0 and tangent_warmup(5, 10) == 0.5 and tangent_warmup(20, 10) == 1.0
    assert tangent_warmup(0, 0) == 1.0
    # no weight, no log-variance: the plain mean of g^2 (the value; the gradient is the tangent's)
    F = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(scm_loss(F, g), g.square().mean(1))
    t = sample_t_hat(20000, -1.0, 1.4, 0.5, 0.002, 80.0)
    sigma = 0.5 * torch.tan(t)
    assert abs(float(sigma.log().mean()) + 1.0) < 0.05 and abs(float(sigma.log().std()) - 1.4) < 0.05
    head = LogVarHead(16)
    out = head(torch.tensor([0.1, 1.0, 1.5], dtype=torch.float64))
    assert out.shape == (3,) and (out == 0).all()  # starts at u = 0


# --------------------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------------------


def _trainer(tmp_path, **over):
    mix = toy_mixture("ring")
    torch.manual_seed(0)
    net = ToyMLP(dim=2, hidden=32, layers=2)
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        global_batch=16,
        learning_rate=1e-3,
        sigma_data=1.4,
        inference_steps=2,
        checkpoint_every=0,
        progress=False,
        tangent_warmup_steps=2,
    )
    settings.update(over)
    return SCMTrainer(
        build_config(SCMConfig, settings),
        teacher=mixture_teacher(mix),
        generator=copy.deepcopy(net),
        dataset=MixtureDataset(mix, 256),
        sample_shape=(2,),
    )


@pytest.mark.parametrize(
    "over",
    [dict(mode="scd"), dict(mode="sct", tangent="clip", jvp="finite_difference", adaptive_weighting=False)],
    ids=["scd", "sct-fd"],
)
def test_trainer_runs_samples_and_exports(tmp_path, over):
    tr = _trainer(tmp_path, **over)
    before = {k: v.clone() for k, v in tr.generator_object.state_dict().items()}
    tr.train()
    assert all(math.isfinite(h["loss"] if "loss" in h else next(iter(h.values()))) for h in tr.history)
    assert tr.jvp.used == ("finite_difference" if over.get("jvp") else "forward")
    after = tr._inner("generator").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert ("logvar" in tr.specs) == over.get("adaptive_weighting", True)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    one, two = tr.sample(noise, steps=1), tr.sample(noise, steps=2, generator=torch.Generator().manual_seed(1))
    assert one.shape == two.shape == (8, 2) and torch.isfinite(two).all()
    assert tr.export_timesteps() == [999, round(float(tr.schedule.t_to_timestep(tr.generator.timesteps[1])))]
    # 1-step: the student's x0 at the first trained time, read from pure noise
    with torch.no_grad():
        ref = tr.generator.predict(tr.generator.initial_noise(noise), torch.ones(8, dtype=torch.float64), None)
    torch.testing.assert_close(one, ref)


def test_student_F_is_the_trigflow_view_of_the_student(tmp_path):
    tr = _trainer(tmp_path)
    tr.setup()
    x_hat = torch.randn(4, 2, generator=torch.Generator().manual_seed(2))
    t_hat = torch.tensor([0.2, 0.7, 1.2, 1.5], dtype=torch.float64)
    F = tr.student_F(x_hat, t_hat, None)
    x_t, t = tr.trig.to_native(x_hat.double(), t_hat)
    x0 = tr.generator.predict(x_t.float(), t, None, target="x0", float64=True)
    torch.testing.assert_close(tr.trig.x0_from_F(x_hat.double(), F, t_hat), x0)
    # the JVP through the whole map (native time, input scaling, network, conversion): forward vs differences
    dx = torch.randn(4, 2, generator=torch.Generator().manual_seed(3))
    d_fwd = tr.F_jvp(x_hat, t_hat, dx, None)
    tr.jvp = JVP("finite_difference", 1e-3)
    d_fd = tr.F_jvp(x_hat, t_hat, dx, None)
    assert float((d_fwd - d_fd).norm() / d_fd.norm()) < 1e-2
    # jvp_time_shift: the time part as a difference over +- that network-time shift; a tiny shift is the exact part
    tr.jvp = JVP("forward")
    tr.config.jvp_time_shift = 1e-3
    d_shift = tr.F_jvp(x_hat, t_hat, dx, None)
    assert float((d_fwd - d_shift).norm() / d_fwd.norm()) < 1e-2
    tr.config.jvp_time_shift = 2.0  # a shift of 2 timesteps reads another (smoothed) time derivative
    assert float((d_fwd - tr.F_jvp(x_hat, t_hat, dx, None)).norm() / d_fwd.norm()) > 1e-3
    # at the top of the time range (1-step sampling starts there) the shift is one-sided over the times reached:
    # from timestep 998.5, +- 1 reaches 999 (clamped) and 997.5
    tr.config.jvp_time_shift = 1.0
    zero = torch.zeros_like(dx)
    ts = lambda k: tr.trig.t_hat(torch.full((4,), k / 999, dtype=torch.float64))  # noqa: E731
    th, hi, lo = ts(998.5), ts(999.0), ts(997.5)
    want = (tr.student_F(x_hat, hi, None) - tr.student_F(x_hat, lo, None)) / (hi - lo)[:, None]
    cs = (torch.cos(th) * torch.sin(th))[:, None]
    torch.testing.assert_close(tr.F_jvp(x_hat, th, zero, None), cs * want, rtol=2e-2, atol=1e-9)  # old: 25% off


@pytest.mark.parametrize(
    "override, message",
    [
        ("mode=ct", "mode must be one of"),
        ("jvp=reverse", "jvp must be one of"),
        ("inference_steps=3", "inference_steps must be 1 or 2"),
        ("tangent=scale", "tangent must be one of"),
        ("jvp_time_shift=-1", "jvp_time_shift must be >= 0"),
        ("mode=sct guidance_scale=3.0", "guidance_scale=3.0 with mode=sct"),
    ],
)
def test_config_errors_are_one_line(tmp_path, capsys, override, message):
    from pathlib import Path

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "scm" / "digits.yaml")
    rc = main(["train", "--config", recipe, f"output_dir={tmp_path}", *override.split()])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_guidance_needs_an_unconditional_branch(tmp_path):
    with pytest.raises(ConfigError, match="unconditional branch"):
        _trainer(tmp_path, guidance_scale=2.0).setup()


class _ExactConsistency(nn.Module):
    """The exact consistency function of data N(mu, s^2 I) under the DDPM schedule as a v-prediction network:
    f(x_t, t) = mu + s (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) (the PF-ODE keeps the standardised point)."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s
        self.schedule = ddpm_schedule()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, timestep, cond=None):
        t = self.schedule.timestep_to_t(torch.as_tensor(timestep, dtype=torch.float64)).expand(x.shape[0])
        a, sg = self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None]
        xd = x.double()
        f = self.mu + self.s * (xd - a * self.mu) / (a * a * self.s**2 + sg * sg).sqrt()
        return ((a * xd - f) / sg + 0 * self.dummy).to(x.dtype)


@pytest.mark.parametrize("shift", [0.0, 10.0])
def test_tangent_vanishes_at_the_exact_consistency_function_through_the_trainer(tmp_path, shift):
    """sCD's whole chain (TrigFlow view of a VP teacher, native-time conversion, the student's JVP, the teacher's
    velocity, the tangent at r = 1) on Gaussian data: a student that is the exact consistency function has g = 0
    at every time."""
    mu, s = torch.tensor([[0.8, -0.3]], dtype=torch.float64), 0.6
    mix = GaussianMixture(mu, s)
    settings = dict(output_dir=str(tmp_path), max_steps=1, global_batch=8, sigma_data=1.4, checkpoint_every=0,
                    progress=False, jvp="forward", jvp_time_shift=shift)
    tr = SCMTrainer(build_config(SCMConfig, settings), teacher=mixture_teacher(mix),
                    generator=_ExactConsistency(mu, s), dataset=MixtureDataset(mix, 16), sample_shape=(2,))
    tr.setup()
    g = torch.Generator().manual_seed(0)
    th = torch.tensor([0.05, 0.3, 0.7, 1.0, 1.3, 1.55], dtype=torch.float64)
    x0 = mix.sample(6, g)[0].double()
    x_hat = tr.trig.add_noise(x0, 1.4 * torch.randn(6, 2, generator=g, dtype=torch.float64), th).float()
    dxdt = tr.teacher_velocity(x_hat, th, None)
    F = tr.student_F(x_hat, th, None).detach()
    F_jvp = tr.F_jvp(x_hat, th, dxdt.float(), None)
    tol = 1e-6 if shift == 0 else 1e-3  # +- 10 timesteps: the central difference's O(h^2) error
    assert float(scm_tangent(F, F_jvp, x_hat.double(), dxdt, th, 1.4, 1.0).abs().max()) < tol
    # a cancellation: each of the two terms alone (r = 0: the first) is far from 0
    assert float(scm_tangent(F, F_jvp, x_hat.double(), dxdt, th, 1.4, 0.0).abs().max()) > 0.1
