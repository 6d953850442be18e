"""DMD2: the loss functions against hand-worked values and autograd, the 2-D mixture distillation, exact
resume with two networks and two update groups, and bad input."""

import math
import os

import pytest
import torch

from stepdistill.config import ConfigError, build_config
from stepdistill.data import mode_coverage, sample_toy2d, sliced_wasserstein
from stepdistill.losses import (
    distribution_matching_loss,
    dmd_gradient,
    gan_discriminator_loss,
    gan_generator_loss,
)
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer


def test_dmd_gradient_hand_worked():
    # one sample, 2 elements: x = [1, 3], x0_real = [0, 1] -> |x - real| = [1, 2], mean 1.5
    # x0_fake = [0.5, 4] -> g = (fake - real) / 1.5 = [0.5 / 1.5, 3 / 1.5] = [1/3, 2]
    x = torch.tensor([[1.0, 3.0]])
    g = dmd_gradient(x, torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 4.0]]))
    torch.testing.assert_close(g, torch.tensor([[1 / 3, 2.0]], dtype=torch.float64))
    # the normaliser is per sample: a second sample with 10x the residual gets 1/10 of the gradient
    x2 = torch.tensor([[1.0, 3.0], [10.0, 30.0]])
    g2 = dmd_gradient(x2, torch.tensor([[0.0, 1.0], [0.0, 10.0]]), torch.tensor([[0.5, 4.0], [5.0, 40.0]]))
    torch.testing.assert_close(g2[1], torch.tensor([1 / 3, 2.0], dtype=torch.float64))
    # x == x0_real (zero normaliser) gives 0, not NaN
    assert torch.isfinite(dmd_gradient(torch.ones(1, 3), torch.ones(1, 3), torch.zeros(1, 3))).all()


def test_dm_loss_gradient_is_g_over_numel():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    real, fake = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    g = dmd_gradient(x, real, fake)
    loss = distribution_matching_loss(x, g)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad.double(), g / x.numel(), atol=1e-7, rtol=1e-5)
    # and its value is 0.5 * mean(g^2)
    torch.testing.assert_close(loss.double(), 0.5 * (g**2).mean(), atol=1e-6, rtol=1e-5)


def test_gan_losses_hand_worked():
    zero = torch.zeros(4)
    torch.testing.assert_close(gan_generator_loss(zero), torch.tensor(math.log(2.0)))
    torch.testing.assert_close(gan_discriminator_loss(zero, zero), torch.tensor(2 * math.log(2.0)))
    # a confident, correct discriminator has a small loss; the generator's loss is then large
    big = torch.full((4,), 20.0)
    assert gan_discriminator_loss(big, -big) < 1e-6 and gan_generator_loss(-big) > 19


def toy_dmd2(teacher, out, **kw):
    base = dict(
        output_dir=str(out),
        teacher=teacher,
        dataset="toy2d:gmm8",
        max_steps=500,
        global_batch=256,
        learning_rate=1e-3,
        warmup_steps=0,
        checkpoint_every=0,
        progress=False,
    )
    base.update(kw)
    return DMD2Trainer(build_config(DMD2Config, base))


def test_dmd2_matches_a_gaussian_mixture(toy_teacher, tmp_path):
    trainer = toy_dmd2(toy_teacher, tmp_path)
    trainer.setup()
    ref, _ = sample_toy2d("gmm8", 2000, torch.Generator().manual_seed(1))
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    teacher_before = [p.detach().clone() for p in trainer.teacher.net.parameters()]
    gen_before = [p.detach().clone() for p in trainer.generator.net.parameters()]
    sw = lambda x: sliced_wasserstein(x, ref, generator=torch.Generator().manual_seed(0))  # noqa: E731
    d0 = sw(trainer.generator.sample(z))
    trainer.train()
    x = trainer.generator.sample(z)
    d1 = sw(x)
    frac, counts = mode_coverage(x, "gmm8")
    assert d1 < 0.5 * d0, f"sliced W2 {d0:.3f} -> {d1:.3f}: not halved"
    assert frac == 1.0, f"modes missed: {counts.tolist()}"
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, trainer.teacher.net.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, trainer.generator.net.parameters()))
    # two-time-scale rule: the generator trained at 1 step in 5, the fake score at every step
    gen_steps = [h for h in trainer.history if "loss_dm/generator" in h]
    assert len(gen_steps) == 100 and all("loss/fake_score" in h for h in trainer.history)


def test_dmd2_resume_is_exact_with_two_networks(toy_teacher, tmp_path):
    full = toy_dmd2(toy_teacher, tmp_path / "a", max_steps=12, checkpoint_every=6, denoising_timesteps=[999, 499])
    full.train()
    part = toy_dmd2(toy_teacher, tmp_path / "b", max_steps=6, checkpoint_every=6, denoising_timesteps=[999, 499])
    part.train()
    rest = toy_dmd2(
        toy_teacher, tmp_path / "b", max_steps=12, checkpoint_every=6, denoising_timesteps=[999, 499], resume="latest"
    )
    rest.train()
    a = [h.get("loss/fake_score") for h in full.history]
    b = [h.get("loss/fake_score") for h in part.history + rest.history]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-6, rtol=0)
    for p, q in zip(full.generator.net.parameters(), rest.generator.net.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_dmd2_generator_loss_leaves_fake_score_without_gradient(toy_teacher, tmp_path):
    trainer = toy_dmd2(toy_teacher, tmp_path, max_steps=1)
    trainer.setup()
    batch = next(iter(trainer.loader))
    with torch.no_grad():  # at initialisation fake == teacher and g == 0: move the fake score first
        for p in trainer.fake.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer._set_phase(("generator",))
    out = trainer.compute_loss(batch, ("generator",))
    out["loss"].backward()
    assert all(p.grad is None for p in trainer.fake.net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.generator.net.parameters())
    assert all(p.grad is None for p in trainer.teacher.net.parameters())


def test_dmd2_bad_input(toy_teacher, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="needs real images.*prompts.txt"):
        build_config(DMD2Config, dict(dataset="prompts.txt", gan_generator_weight=1e-3))
    with pytest.raises(ConfigError, match="decreasing"):
        build_config(DMD2Config, dict(denoising_timesteps=[249, 999]))
    with pytest.raises(ConfigError, match="1500 is outside the teacher's schedule"):
        toy_dmd2(toy_teacher, tmp_path, denoising_timesteps=[1500, 999]).setup()
    with pytest.raises(ConfigError, match="teacher: path"):
        build_config(DMD2Config, dict(teacher=str(tmp_path / "nope")))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed.*FSDP"):
        toy_dmd2(toy_teacher, tmp_path).setup()


def test_dmd2_bf16_tensorboard_samples_and_regression_warm_start(toy_teacher, tmp_path):
    """The loop's optional parts on the toy: bf16 autocast, a tensorboard tracker, the DMD v1 regression
    term on teacher noise / image pairs."""
    trainer = toy_dmd2(toy_teacher, tmp_path, max_steps=5, dfake_gen_update_ratio=1, mixed_precision="bf16",
                       report_to="tensorboard", log_every=1, regression_weight=0.25, regression_pairs=64,
                       regression_steps=4, regression_batch=16)
    trainer.train()
    assert all(math.isfinite(h["loss_reg/generator"]) for h in trainer.history)
    assert trainer.pairs[1].shape == (64, 2)
    events = [f for _, _, files in os.walk(tmp_path) for f in files if f.startswith("events.out")]
    assert events, "no tensorboard event file written"


def test_periodic_sample_grid(tmp_path):
    from stepdistill.train import make_trainer

    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "dmd2", "digits.yaml")
    trainer = make_trainer(recipe, [f"output_dir={tmp_path}", "max_steps=2", "global_batch=4", "sample_every=2",
                                    "checkpoint_every=0", "progress=false"])
    trainer.train()
    assert (tmp_path / "samples" / "step_0000002.png").stat().st_size > 0
