"""SiD / SIM / VSD generator losses: hand-worked values, SiD's own formula, finite differences, and the
pseudo-Huber -> L2 limit."""

import pytest
import torch

from stepdistill.losses import distribution_matching_loss, sid_loss, sim_loss, vsd_gradient


def linear_denoisers(seed=0, n=6):
    """Two fixed linear 'denoisers' D(x_t) = M x_t and a VP-style x_t = a x + s eps (all float64), so that the
    generator losses are explicit functions of x that finite differences can check."""
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(n, dtype=torch.float64) * 0.8 + 0.05 * torch.randn(n, n, generator=g, dtype=torch.float64)
    B = torch.eye(n, dtype=torch.float64) * 0.7 + 0.05 * torch.randn(n, n, generator=g, dtype=torch.float64)
    eps = torch.randn(3, n, generator=g, dtype=torch.float64)
    a, s = 0.8, 0.6

    def parts(x):
        x_t = a * x + s * eps
        return x_t @ A.T, x_t @ B.T  # D_real, D_fake

    return parts


@pytest.mark.parametrize("alpha", [1.0, 1.2])  # 1.0: SIM's L2 case; 1.2: SiD's default
def test_sid_loss_matches_sids_own_formula(alpha):
    torch.manual_seed(0)
    x, yr, yf = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    # SiD (sid_loss.py): loss = (y_r - y_f) * ((y_r - x) - alpha (y_r - y_f)) / wf, wf = mean|x - y_r| per
    # sample, summed over elements; loss_scaling 100 / batch -> here: divided by the batch only
    wf = (x - yr).abs().mean(dim=(1, 2, 3), keepdim=True)
    ref = ((yr - yf) * ((yr - x) - alpha * (yr - yf)) / wf).sum() / x.shape[0]
    torch.testing.assert_close(sid_loss(x, yr, yf, alpha), ref)


def test_sim_l2_limit_is_sid_alpha_one_direction():
    parts = linear_denoisers()
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    d_r, d_f = parts(x)
    (g_sid,) = torch.autograd.grad(sid_loss(x, d_r, d_f, alpha=1.0), x)
    for c, tol in ((1e3, 1e-3), (1e5, 1e-7)):
        d_r, d_f = parts(x)
        (g_sim,) = torch.autograd.grad(sim_loss(x, d_r, d_f, c=c) * c, x)
        cos = torch.nn.functional.cosine_similarity(g_sim.flatten(), g_sid.flatten(), dim=0)
        assert 1 - cos < tol, (c, float(cos))
    # and with c = 1 the direction really differs (the test above is not vacuous)
    d_r, d_f = parts(x)
    (g1,) = torch.autograd.grad(sim_loss(x, d_r, d_f, c=0.01), x)
    assert 1 - torch.nn.functional.cosine_similarity(g1.flatten(), g_sid.flatten(), dim=0) > 1e-3


def test_sim_gradient_matches_finite_differences():
    parts = linear_denoisers(seed=3)
    x0 = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def loss_with_frozen_normaliser(x, wf_from):
        # the normaliser is a stop-gradient: evaluate it at the base point for the finite differences
        d_r, d_f = parts(x)
        d_r0, _ = parts(wf_from)
        wf = (wf_from - d_r0).abs().mean(dim=1, keepdim=True)
        y = d_f - d_r
        norm = ((y * y).sum(dim=1, keepdim=True) + 0.5**2).sqrt()
        return (-(y / norm) * (d_f - x) / wf).sum(dim=1).mean()

    x = x0.clone().requires_grad_(True)
    d_r, d_f = parts(x)
    (auto,) = torch.autograd.grad(sim_loss(x, d_r, d_f, c=0.5), x)
    fd = torch.zeros_like(x0)
    h = 1e-6
    for i in range(x0.numel()):
        e = torch.zeros_like(x0).flatten()
        e[i] = h
        e = e.reshape(x0.shape)
        fd.view(-1)[i] = (loss_with_frozen_normaliser(x0 + e, x0) - loss_with_frozen_normaliser(x0 - e, x0)) / (2 * h)
    torch.testing.assert_close(auto, fd, atol=1e-7, rtol=1e-6)


def test_sim_rejects_non_positive_c():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="c must be > 0"):
        sim_loss(z, z, z, c=0.0)


def test_vsd_gradient_hand_worked():
    # sigma = 0.5 -> w = 0.25; eps_real - eps_fake = [2, -4] -> g = [0.5, -1]
    g = vsd_gradient(torch.tensor([[3.0, -1.0]]), torch.tensor([[1.0, 3.0]]), torch.tensor([0.5]))
    torch.testing.assert_close(g, torch.tensor([[0.5, -1.0]], dtype=torch.float64))
    x = torch.zeros(1, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(distribution_matching_loss(x, g), x)
    torch.testing.assert_close(grad.double(), g / 2)
