"""benchmarks/bench_exact.py (``make bench-exact``): its closed-form mixture teacher and its metrics."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_exact as be  # noqa: E402


@pytest.mark.parametrize("name", ["ring", "mix64"])
def test_posterior_mean_matches_monte_carlo(name):
    """E[x0 | x_t] in closed form equals the self-normalised Monte Carlo estimate sum_i x0_i p(x_t | x0_i) /
    sum_i p(x_t | x0_i) over prior samples x0_i (exact likelihood weights, no kernel)."""
    mix = be.problem(name)
    sched = be.ddpm_schedule()
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(200_000, g)[0].double()
    for timestep in (300.0, 600.0, 900.0):
        t = sched.timestep_to_t(torch.tensor([timestep], dtype=torch.float64))
        a, s = sched.alpha(t), sched.sigma(t)
        # a point x_t drawn from the forward process itself, so that prior samples cover its posterior
        q = a * mix.sample(1, g)[0].double() + s * torch.randn(1, mix.dim, generator=g, dtype=torch.float64)
        logw = -0.5 * (q - a * x0).square().sum(1) / s**2
        w = torch.softmax(logw, 0)
        ess = 1.0 / w.square().sum()
        assert ess > 200, f"too few effective samples ({float(ess):.0f}) for a Monte Carlo check at {timestep}"
        mc = (w[:, None] * x0).sum(0)
        exact = mix.posterior_mean(q, a, s)[0]
        tol = 6 * mix.std / ess.sqrt() + 1e-3 + 4 * (x0.std(0).max() / ess.sqrt()) * (mix.dim > 2)
        assert (mc - exact).abs().max() < tol, f"t={timestep}: {mc[:4]} vs {exact[:4]}"


def test_teacher_returns_the_posterior_mean_in_its_prediction_type():
    mix = be.problem("ring")
    x_t = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    t = torch.rand(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.98 + 0.01
    sched = be.ddpm_schedule()
    want = mix.posterior_mean(x_t, sched.alpha(t), sched.sigma(t)).float()
    for pred in ("v", "x0"):
        teacher = be.exact_teacher(mix, pred)
        assert teacher.prediction_type == pred
        torch.testing.assert_close(teacher.predict(x_t, t, target="x0"), want, atol=1e-4, rtol=1e-4)


def test_exact_teacher_input_gradient_for_sim():
    """SIM differentiates through the teacher: the closed form must carry a gradient to x_t."""
    teacher = be.exact_teacher(be.problem("ring"))
    x = torch.randn(8, 2, requires_grad=True)
    out = teacher.predict_with_input_grad(x, torch.full((8,), 0.5, dtype=torch.float64))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_metrics_on_known_samples():
    mix = be.problem("ring")
    a = mix.sample(3000, torch.Generator().manual_seed(3))[0]
    b = mix.sample(3000, torch.Generator().manual_seed(4))[0]
    assert be.sw(a, a) < 1e-9
    assert be.sw(a, b) < be.sw(a, 0.5 * b)  # a shrunk ring is farther than a fresh draw
    stats = be.mode_stats(mix, a)
    assert stats["min_share"] > 0.8 and stats["off_mode"] < 0.01 and abs(sum(stats["shares"]) - 1) < 1e-6
    # every sample on modes 0..3: half the modes lost
    half = mix.means[torch.arange(3000) % 4].float() + 0.1 * torch.randn(3000, 2)
    lost = be.mode_stats(mix, half)
    assert lost["min_share"] == 0.0 and max(lost["shares"]) == pytest.approx(0.25, abs=0.01)
    # samples at the origin (between every mode) are off-mode
    assert be.mode_stats(mix, torch.zeros(10, 2))["off_mode"] == 1.0


def test_evaluator_floor_is_the_teachers_own_distance():
    mix = be.problem("ring")
    ev = be.Evaluator(mix, 1000)
    res = ev(ev.teacher_x)
    assert res["ratio"] == pytest.approx(1.0) and res["min_share"] > 0.7
    assert ev(torch.full((1000, 2), float("nan")))["ratio"] == float("inf")


def test_continuous_time_rows_start_from_a_copy_with_a_smooth_time_input():
    """sCD and MeanFlow differentiate the student in time. A ToyMLP with the default timestep embedding (up to 1 rad
    per timestep) has an exact time derivative unrelated to its trend over +- 10 timesteps (here at init; the
    fitted teacher copy: 1.3 to 300x the exact teacher's derivative, README "sCM"); the copy those rows start
    from (time_scale SMOOTH_TIME_SCALE) has none of that."""
    rows = {label: over for label, _, _, over in be.ROWS}
    assert rows["sCD"]["copy_time_scale"] == rows["MeanFlow distill"]["copy_time_scale"] == be.SMOOTH_TIME_SCALE
    mix = be.problem("ring")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    ts = 50 + 900 * torch.rand(256, generator=g)

    def wiggle(net):
        with torch.no_grad():
            exact = torch.func.jvp(lambda s: net(x, s), (ts,), (torch.ones_like(ts),))[1]
            trend = (net(x, ts + 10) - net(x, ts - 10)) / 20
        return float((exact - trend).norm() / trend.norm())

    torch.manual_seed(0)
    default = wiggle(be.net_for(mix))
    torch.manual_seed(0)
    smooth = wiggle(be.net_for(mix, be.SMOOTH_TIME_SCALE))
    assert default > 1.0 and smooth < 0.01


def test_teacher_steps_rows(tmp_path):
    """``--teacher-steps``: the exact teacher's own DDIM at N steps (the floor of methods that distil an N-step
    sampler) is further from the data at 4 steps than at 8 or 100 (on 1000 samples, 8 steps is within the
    finite-sample noise of 100)."""
    out = tmp_path / "t.md"
    be.main(["--problems", "ring", "--methods", "none", "--teacher-steps", "4,8", "--eval", "1000", "--out",
             str(out), "--seeds", "1", "--first-seed", "3"])  # fmt: skip
    rows = {int(r.split("|")[3]): float(r.split("|")[5].split()[0]) for r in out.read_text().splitlines()
            if "exact teacher, DDIM" in r}  # fmt: skip
    assert set(rows) == {100, 4, 8} and rows[4] > 1.5 and rows[4] > rows[8] and rows[100] == 1.0
