"""Schedules agree with diffusers' schedulers; conversions round-trip."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)

from stepdistill.sampling import consistency_step, ddim_step, lcm_scalings
from stepdistill.schedules import (
    EDMSchedule,
    FlowSchedule,
    VPSchedule,
    from_diffusers,
    normalize_prediction_type,
)

VP_CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
]
SHAPE = (3, 4, 5, 5)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cfg", VP_CONFIGS)
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, LCMScheduler])
def test_vp_alphas_and_add_noise_match_diffusers(cls, cfg):
    sched = cls(**cfg)
    ours = from_diffusers(sched)
    assert isinstance(ours, VPSchedule)
    torch.testing.assert_close(ours.alphas_cumprod.float(), sched.alphas_cumprod, atol=1e-6, rtol=0)
    x0, eps = torch.randn(SHAPE, generator=_gen(1)), torch.randn(SHAPE, generator=_gen(2))
    timesteps = torch.tensor([0, 417, 999])
    if cls is EulerDiscreteScheduler:  # Euler works on x / alpha; compare in VP coordinates
        return
    ref = sched.add_noise(x0, eps, timesteps)
    got = ours.add_noise(x0, eps, ours.timestep_to_t(timesteps))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_vp_timestep_grids_match_ddim(spacing):
    sched = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ours = from_diffusers(sched)
    for n in (1, 4, 10, 50):
        sched.set_timesteps(n)
        got = ours.t_to_timestep(ours.timesteps(n, spacing)).round().long()
        assert got.tolist() == sched.timesteps.tolist(), (spacing, n)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(pred, eta):
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=pred,
        clip_sample=False,
        timestep_spacing="trailing",
    )
    sched.set_timesteps(10)
    ours = from_diffusers(sched)
    x = torch.randn(SHAPE, generator=_gen(3))
    out = torch.randn(SHAPE, generator=_gen(4))
    for ts, prev in [(699, 599), (99, None)]:
        ref = sched.step(out, ts, x, eta=eta, generator=_gen(5)).prev_sample
        t = ours.timestep_to_t(torch.tensor([ts] * SHAPE[0]))
        t_prev = None if prev is None else ours.timestep_to_t(torch.tensor([prev] * SHAPE[0]))
        x0, e = ours.to_x0_eps(out, x, t, pred)
        noise = torch.randn(SHAPE, generator=_gen(5))
        got = ddim_step(ours, x0, e, t, t_prev, eta=eta if prev is not None else 0.0, noise=noise)
        # the last step (t_prev=None) lands on x0, as diffusers' DDIM does with set_alpha_to_one=True
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_ddpm_step_is_ddim_eta_one():
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type="epsilon")
    sched.set_timesteps(20)  # prev = t - 50
    ours = from_diffusers(sched)
    x, out = torch.randn(SHAPE, generator=_gen(6)), torch.randn(SHAPE, generator=_gen(7))
    ts = 500
    ref = sched.step(out, ts, x, generator=_gen(8)).prev_sample
    noise = torch.randn(SHAPE, generator=_gen(8))
    t, tp = ours.timestep_to_t(torch.full((3,), ts)), ours.timestep_to_t(torch.full((3,), ts - 50))
    x0, e = ours.to_x0_eps(out, x, t, "eps")
    torch.testing.assert_close(ddim_step(ours, x0, e, t, tp, eta=1.0, noise=noise), ref, atol=1e-5, rtol=0)


def test_euler_discrete_step_matches_ddim_in_vp_coordinates():
    sched = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing"
    )
    sched.set_timesteps(8)
    ours = from_diffusers(sched)
    t_int, t_prev_int = int(sched.timesteps[2]), int(sched.timesteps[3])
    sched._step_index = 2
    xv = torch.randn(SHAPE, generator=_gen(9))  # x_t in VP coordinates
    t, tp = ours.timestep_to_t(torch.full((3,), t_int)), ours.timestep_to_t(torch.full((3,), t_prev_int))
    x_euler = xv / ours.alpha(t)[0].float()  # Euler's latent is x_t / alpha
    eps = torch.randn(SHAPE, generator=_gen(10))
    ref = sched.step(eps, sched.timesteps[2], x_euler).prev_sample
    x0, e = ours.to_x0_eps(eps, xv, t, "eps")
    got = ddim_step(ours, x0, e, t, tp) / ours.alpha(tp)[0].float()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_lcm_step_matches_diffusers():
    sched = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(4)
    ours = from_diffusers(sched)
    x, out = torch.randn(SHAPE, generator=_gen(11)), torch.randn(SHAPE, generator=_gen(12))
    ts, nxt = int(sched.timesteps[1]), int(sched.timesteps[2])
    sched._step_index = 1
    ref = sched.step(out, ts, x, generator=_gen(13)).prev_sample
    t, tn = ours.timestep_to_t(torch.full((3,), ts)), ours.timestep_to_t(torch.full((3,), nxt))
    x0, _ = ours.to_x0_eps(out, x, t, "eps")
    c_skip, c_out = lcm_scalings(ours, t)
    noise = torch.randn(SHAPE, generator=_gen(13))
    got = consistency_step(ours, x, x0, c_skip, c_out, tn, noise)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_schedule_matches_flow_match_euler(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    ours = from_diffusers(sched)
    assert isinstance(ours, FlowSchedule)
    for n in (1, 4, 28):
        sched.set_timesteps(n)
        torch.testing.assert_close(ours.timesteps(n).float(), sched.sigmas[:-1], atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.t_to_timestep(ours.timesteps(n)).float(), sched.timesteps, atol=1e-3, rtol=0)
    sched.set_timesteps(4)
    x0, eps = torch.randn(SHAPE, generator=_gen(14)), torch.randn(SHAPE, generator=_gen(15))
    ts = sched.timesteps[1:2].expand(3)
    ref = sched.scale_noise(x0, ts, eps)
    t = ours.timestep_to_t(ts)
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ref, atol=1e-5, rtol=0)
    # one Euler step
    x, u = torch.randn(SHAPE, generator=_gen(16)), torch.randn(SHAPE, generator=_gen(17))
    sched._step_index = 1
    ref = sched.step(u, sched.timesteps[1], x).prev_sample
    tt, tn = sched.sigmas[1].double().expand(3), sched.sigmas[2].double().expand(3)
    x0, e = ours.to_x0_eps(u, x, tt, "flow")
    torch.testing.assert_close(ddim_step(ours, x0, e, tt, tn), ref, atol=1e-5, rtol=0)


SCHEDULES = [
    ("vp", VPSchedule.from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))),
    ("edm", EDMSchedule()),
    ("flow", FlowSchedule(shift=3.0)),
]


@pytest.mark.parametrize("name,sched", SCHEDULES)
def test_convert_round_trips_float64(name, sched):
    x_t = torch.randn(SHAPE, generator=_gen(20), dtype=torch.float64)
    pred = torch.randn(SHAPE, generator=_gen(21), dtype=torch.float64)
    t = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    types = sched.supports
    for a in types:
        for b in types:
            there = sched.convert(pred, x_t, t, a, b)
            back = sched.convert(there, x_t, t, b, a)
            torch.testing.assert_close(back, pred, atol=1e-5, rtol=0, msg=f"{name}: {a}->{b}->{a}")
    # consistency: the x0 implied by each representation is the same point
    x0 = sched.convert(pred, x_t, t, "eps", "x0")
    for b in types:
        rep = sched.convert(pred, x_t, t, "eps", b)
        torch.testing.assert_close(sched.convert(rep, x_t, t, b, "x0"), x0, atol=1e-8, rtol=0)


def test_convert_matches_textbook_formulas():
    sched = VPSchedule.from_config({})
    x0, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    t = torch.full((3,), 0.3, dtype=torch.float64)
    a, s = sched.alpha(t)[0], sched.sigma(t)[0]
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(sched.convert(eps, x_t, t, "eps", "v"), a * eps - s * x0)
    torch.testing.assert_close(sched.convert(eps, x_t, t, "eps", "score"), -eps / s)
    torch.testing.assert_close(sched.convert(eps, x_t, t, "eps", "x0"), x0)
    fl = FlowSchedule()
    xt = fl.add_noise(x0, eps, t)
    torch.testing.assert_close(fl.convert(eps, xt, t, "eps", "flow"), eps - x0)
    edm = EDMSchedule()
    xt = edm.add_noise(x0, eps, t)
    c_skip, c_out, _ = edm.scalings(t)
    F = edm.convert(x0, xt, t, "x0", "edm")
    torch.testing.assert_close(c_skip[0] * xt + c_out[0] * F, x0)


def test_noise_level_inverse_and_samplers():
    for sched in (VPSchedule.from_config({}), EDMSchedule(), FlowSchedule()):
        t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
        torch.testing.assert_close(sched.t_from_noise_level(sched.noise_level(t)), t, atol=1e-6, rtol=0)
        u = sched.sample_t(1000, "uniform", t_min=0.02, t_max=0.98, generator=_gen(0))
        assert u.min() >= 0.02 - 1e-9 and u.max() <= 0.98 + 1e-9
        ln = sched.sample_t(1000, "lognormal", generator=_gen(0))
        assert ((ln >= 0) & (ln <= 1)).all()
    vp = VPSchedule.from_config({})
    u = vp.sample_t(100, "uniform", generator=_gen(0))
    steps = vp.t_to_timestep(u)
    assert torch.equal(steps, steps.round()), "discrete schedules sample integer timesteps"


def test_bad_input_errors_name_the_value():
    with pytest.raises(ValueError, match="'flow'.*VPSchedule"):
        VPSchedule.from_config({}).check_prediction_type("flow")
    with pytest.raises(ValueError, match="'v'.*FlowSchedule"):
        FlowSchedule().convert(torch.zeros(1), torch.zeros(1), 0.5, "v", "x0")
    with pytest.raises(ValueError, match="banana"):
        normalize_prediction_type("banana")
    with pytest.raises(ValueError, match="MyFancyScheduler"):
        from_diffusers({"_class_name": "MyFancyScheduler"})
    with pytest.raises(ValueError, match="cosine_typo"):
        VPSchedule.from_config({"beta_schedule": "cosine_typo"})
    with pytest.raises(FileNotFoundError, match="/no/such/dir"):
        from_diffusers("/no/such/dir")
