"""f-distill (stepdistill.trainers.fdistill): the weighting functions h(r) against hand-worked values and against
f''(r) r^2 by autograd, the density ratio from the GAN logit, the normalisation, the gradient (DMD2's exactly at
r = 1 and for reverse KL; per-sample h-weighted DMD2 otherwise), the refusals, and a few training steps."""

from __future__ import annotations

import copy

import pytest
import torch

from stepdistill.config import ConfigError, build_config
from stepdistill.models.analytic import mixture_teacher, toy_mixture
from stepdistill.models.toy import ToyMLP
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer
from stepdistill.trainers.fdistill import (
    F_DIVERGENCES,
    FDistillConfig,
    FDistillTrainer,
    density_ratio,
    normalized_weights,
)

# h(4) and h(1/4), worked by hand from h = f''(r) r^2 of each f in the module
HAND = {
    "rkl": (1.0, 1.0),
    "kl": (4.0, 0.25),
    "js": (4 / 5, 0.25 / 1.25),
    "sf": (1 / 5, 1 / 1.25),
    "sh": (1.0, 0.25),
    "jf": (5.0, 1.25),
    "neyman": (0.5, 8.0),
}


def test_every_divergence_has_a_hand_worked_value():
    assert set(HAND) == set(F_DIVERGENCES)


@pytest.mark.parametrize("name", sorted(HAND))
def test_h_hand_worked(name):
    h = F_DIVERGENCES[name][1](torch.tensor([4.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(h, torch.tensor(HAND[name], dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(F_DIVERGENCES))
def test_h_is_second_derivative_of_f_times_r_squared(name):
    f, h = F_DIVERGENCES[name]
    r = torch.tensor([0.1, 0.5, 1.0, 2.0, 7.0], dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    torch.testing.assert_close(d2 * r.detach() ** 2, h(r.detach()))
    assert abs(float(f(torch.tensor(1.0, dtype=torch.float64)))) < 1e-12  # f(1) = 0: a divergence


def test_density_ratio_and_normalisation():
    logits = torch.tensor([0.0, torch.log(torch.tensor(3.0)), 30.0, -5.0])
    r = density_ratio(logits, 0.1, 20.0)
    torch.testing.assert_close(r, torch.tensor([1.0, 3.0, 20.0, 0.1]))  # exp, then clipped to [0.1, 20]
    w = normalized_weights(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 3.0, 6.0]) / 3.0)


def test_refusals():
    with pytest.raises(ConfigError, match="gan_generator_weight must be > 0"):
        build_config(FDistillConfig, dict(gan_generator_weight=0.0))
    with pytest.raises(ConfigError, match="needs real images, but dataset 'prompts.txt'"):
        build_config(FDistillConfig, dict(dataset="prompts.txt"))
    with pytest.raises(ConfigError, match="f_divergence must be one of"):
        build_config(FDistillConfig, dict(f_divergence="tv"))
    with pytest.raises(ConfigError, match="gan_max_timestep >= 980"):
        build_config(FDistillConfig, dict(gan_max_timestep=500))
    # teacher samples stand in for the images of a prompt-only dataset
    assert build_config(FDistillConfig, dict(dataset="prompts.txt", real_data="teacher")).real_data == "teacher"


# ------------------------------------------------------------------------------------------------------------
# the gradient on a toy setup (exact mixture teacher, ToyMLP generator and fake score)
# ------------------------------------------------------------------------------------------------------------
MIX = toy_mixture("ring")
NET = ToyMLP(dim=2, hidden=32, layers=2)


def _trainer(cls, cfg_cls, tmp_path, **kw):
    cfg = dict(output_dir=str(tmp_path), max_steps=2, global_batch=16, checkpoint_every=0, progress=False,
               dfake_gen_update_ratio=1, denoising_timesteps=[399], gan_generator_weight=1e-3)
    cfg.update(kw)
    trainer = cls(build_config(cfg_cls, cfg), teacher=mixture_teacher(MIX), generator=copy.deepcopy(NET),
                  fake_score=copy.deepcopy(NET), dataset=MIX.sample(256, torch.Generator().manual_seed(0))[0],
                  sample_shape=(2,))
    trainer.setup()
    return trainer


def _grad(trainer, x, seed=0):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    (g,) = torch.autograd.grad(trainer.dm_loss(x, None), x)
    return g


@pytest.mark.parametrize("f", ["js", "kl", "sh", "neyman"])
def test_gradient_is_dmd2s_at_r_equal_1(f, tmp_path):
    dmd2 = _trainer(DMD2Trainer, DMD2Config, tmp_path / "d")
    fd = _trainer(FDistillTrainer, FDistillConfig, tmp_path / "f", f_divergence=f, ratio_normalization=False)
    fd.head.load_state_dict(dmd2.head.state_dict())
    with torch.no_grad():  # logit 0 everywhere: r = exp(0) = 1, h(1) / mean h(1) = 1
        fd.head.logit.weight.zero_()
        fd.head.logit.bias.zero_()
    x = MIX.sample(16, torch.Generator().manual_seed(1))[0]
    g_f, g_d = _grad(fd, x), _grad(dmd2, x)
    assert g_d.abs().sum() > 0
    torch.testing.assert_close(g_f, g_d, rtol=1e-6, atol=0)


def test_reverse_kl_is_dmd2_for_any_discriminator(tmp_path):
    dmd2 = _trainer(DMD2Trainer, DMD2Config, tmp_path / "d")
    fd = _trainer(FDistillTrainer, FDistillConfig, tmp_path / "f", f_divergence="rkl")
    x = MIX.sample(16, torch.Generator().manual_seed(1))[0]
    assert torch.equal(_grad(fd, x), _grad(dmd2, x))


def test_forward_kl_weights_each_sample_by_its_ratio(tmp_path):
    dmd2 = _trainer(DMD2Trainer, DMD2Config, tmp_path / "d")
    fd = _trainer(FDistillTrainer, FDistillConfig, tmp_path / "f", f_divergence="kl", ratio_normalization=False)
    fd.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 1), torch.nn.Flatten(0))
    with torch.no_grad():  # a linear discriminator whose logits differ between samples
        fd.head[1].weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
        fd.head[1].bias.zero_()
    seen = []
    handle = fd.head.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    x = MIX.sample(16, torch.Generator().manual_seed(1))[0]
    g_f = _grad(fd, x)
    handle.remove()
    g_d = _grad(dmd2, x)
    r = seen[0].double().exp().clamp(0.1, 20.0)
    assert r.max() / r.min() > 1.5  # the weights really differ between samples
    want = r / r.mean()  # h = r (forward KL), normalised to mean 1
    # the surrogate loss rounds x - sg(x - g) in float32: compare to that precision
    torch.testing.assert_close(g_f, g_d * want[:, None].float(), rtol=1e-4, atol=1e-5 * float(g_d.abs().max()))


def test_ratio_normalisation_divides_by_the_bin_mean(tmp_path):
    fd = _trainer(FDistillTrainer, FDistillConfig, tmp_path, f_divergence="kl")
    t = torch.tensor([0.05, 0.06, 0.55, 0.56], dtype=torch.float64)  # two bins, two samples each
    logits = torch.log(torch.tensor([1.0, 3.0, 2.0, 2.0]))
    w = fd.f_weights(logits, t)
    # r / bin mean = [0.5, 1.5, 1, 1]; h = r; mean 1 already
    torch.testing.assert_close(w.float(), torch.tensor([0.5, 1.5, 1.0, 1.0]))
    torch.testing.assert_close(fd.ratio_bins[[0, 5]], torch.tensor([2.0, 2.0], dtype=torch.float64))


def test_trains_and_logs_weights(tmp_path):
    fd = _trainer(FDistillTrainer, FDistillConfig, tmp_path, f_divergence="js", max_steps=3)
    before = {k: v.clone() for k, v in fd.generator.net.state_dict().items()}
    head = {k: v.clone() for k, v in fd.head.state_dict().items()}
    fd.train()
    assert any(not torch.equal(before[k], v) for k, v in fd.generator.net.state_dict().items())
    assert any(not torch.equal(head[k], v) for k, v in fd.head.state_dict().items())
    log = (tmp_path / "train_log.jsonl").read_text()
    assert "h_min/generator" in log and "loss_gan_d" in log


def test_teacher_samples_as_real_data(tmp_path):
    fd = _trainer(FDistillTrainer, FDistillConfig, tmp_path, real_data="teacher", teacher_samples=8,
                  teacher_sample_steps=2)
    batch = fd.synthetic.batch(4)
    assert batch["image"].shape == (4, 2) and torch.isfinite(batch["image"]).all()
    fd.train()
    assert fd.global_step == 2


def test_cli_refusal_is_one_line_exit_2(tmp_path, capsys):
    from stepdistill.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: fdistill\nteacher: digits\ndataset: digits\ngan_generator_weight: 0\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "gan_generator_weight must be > 0" in err[0]
