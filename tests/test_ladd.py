"""LADD (stepdistill.trainers.ladd): the discriminator's features are the teacher's own forward taps (UNet, DiT,
SD3 and the toy MLP), with the input gradient and no gradient on the teacher's weights; the forward stops after
the last tap; the losses against hand-worked values; the logit-normal noise levels; a few training steps change
the generator and the heads and leave the teacher bit-identical; refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_dit, tiny_sd3_transformer, tiny_unet2d

from stepdistill.config import ConfigError, build_config
from stepdistill.models import Teacher
from stepdistill.models.analytic import ddpm_schedule, toy_mixture
from stepdistill.models.conditioning import Cond
from stepdistill.models.toy import ToyMLP
from stepdistill.schedules import FlowSchedule
from stepdistill.trainers.ladd import (
    LADDConfig,
    LADDTrainer,
    discriminator_loss,
    generator_loss,
    tap_modules,
    teacher_features,
)


def _full_forward_taps(teacher, modules, x_t, t, cond):
    """The same blocks' outputs from a complete teacher forward with plain hooks (the reference)."""
    seen = {}
    handles = [m.register_forward_hook(lambda m, i, o, k=k: seen.setdefault(k, o)) for k, m in enumerate(modules)]
    try:
        with torch.no_grad():
            teacher.raw(x_t, t, cond)
    finally:
        for h in handles:
            h.remove()
    out = []
    for k in range(len(modules)):
        o = seen[k]
        if isinstance(o, tuple):
            o = o[0] if torch.is_tensor(o[0]) and o[0].ndim == 4 else o[-1]
        out.append(o)
    return out


def _kinds():
    g = torch.Generator().manual_seed(0)
    unet = Teacher(tiny_unet2d(), ddpm_schedule(), "eps")
    dit = Teacher(tiny_dit(), ddpm_schedule(), "eps")
    sd3 = Teacher(tiny_sd3_transformer(), FlowSchedule(), "flow")
    toy = Teacher(ToyMLP(dim=2, hidden=16, layers=3), ddpm_schedule(), "v")
    sd3_cond = Cond(kwargs={"encoder_hidden_states": torch.randn(2, 5, 96, generator=g),
                            "pooled_projections": torch.randn(2, 64, generator=g)})
    return {
        "unet": (unet, torch.randn(2, 3, 8, 8, generator=g), Cond(kwargs={"class_labels": torch.tensor([1, 2])})),
        "dit": (dit, torch.randn(2, 4, 8, 8, generator=g), Cond(kwargs={"class_labels": torch.tensor([0, 3])})),
        "sd3": (sd3, torch.randn(2, 4, 8, 8, generator=g), sd3_cond),
        "toy": (toy, torch.randn(2, 2, generator=g), None),
    }


KINDS = _kinds()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_features_are_the_teachers_forward_taps_with_input_gradient(kind):
    teacher, x, cond = KINDS[kind]
    modules = tap_modules(teacher.net)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    want = _full_forward_taps(teacher, modules, x, t, cond)
    x_in = x.clone().requires_grad_()
    got = teacher_features(teacher, modules, x_in, t, cond)
    assert len(got) == len(modules) >= 2 or kind in ("dit", "sd3")
    for a, b in zip(got, want):
        assert torch.equal(a.detach(), b)
    sum(f.float().square().mean() for f in got).backward()
    assert x_in.grad is not None and x_in.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.net.parameters())
    assert not any(p.requires_grad for p in teacher.net.parameters())


def test_unet_forward_stops_after_the_last_tap():
    teacher, x, cond = KINDS["unet"]
    calls = []
    handle = teacher.net.up_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        teacher_features(teacher, tap_modules(teacher.net), x, torch.tensor([0.5, 0.5], dtype=torch.float64), cond)
    finally:
        handle.remove()
    assert calls == []
    assert tap_modules(teacher.net)[-1] is teacher.net.mid_block


def test_losses_hand_worked():
    real, fake = [torch.tensor([2.0, 0.5])], [torch.tensor([-2.0, 0.5])]
    # hinge: mean relu(1 - [2, .5]) = .25, mean relu(1 + [-2, .5]) = .75
    assert float(discriminator_loss(real, fake, "hinge")) == pytest.approx(1.0)
    assert float(generator_loss(fake, "hinge")) == pytest.approx(0.75)  # -mean D(fake)
    sp = torch.nn.functional.softplus
    want = float(sp(-real[0]).mean() + sp(fake[0]).mean())
    assert float(discriminator_loss(real, fake, "nonsaturating")) == pytest.approx(want)
    assert float(generator_loss(fake, "nonsaturating")) == pytest.approx(float(sp(-fake[0]).mean()))


MIX = toy_mixture("ring")


def _trainer(tmp_path, **kw):
    cfg = dict(output_dir=str(tmp_path), max_steps=4, global_batch=16, checkpoint_every=0, progress=False,
               denoising_timesteps=[399], dfake_gen_update_ratio=2, teacher_samples=32, teacher_sample_steps=2,
               learning_rate=1e-3)
    cfg.update(kw)
    net = ToyMLP(dim=2, hidden=32, layers=3)
    trainer = LADDTrainer(build_config(LADDConfig, cfg), teacher=Teacher(net, ddpm_schedule(), "v"),
                          generator=copy.deepcopy(net), dataset=MIX.sample(256, torch.Generator().manual_seed(0))[0],
                          sample_shape=(2,))
    trainer.setup()
    return trainer


def test_logit_normal_noise_levels_lean_to_high_noise(tmp_path):
    trainer = _trainer(tmp_path)
    torch.manual_seed(0)
    t = trainer.disc_times(4000, "cpu")
    assert 0.001 <= float(t.min()) and float(t.max()) <= 0.999
    # log(sigma / alpha) ~ N(1, 1) on the VP teacher: median noise level e
    level = trainer.schedule.noise_level(t.median())
    assert abs(float(level) - 2.718) < 0.1
    # on a rectified-flow schedule that is t = sigmoid(N(1, 1)) itself
    trainer.schedule = FlowSchedule()
    torch.manual_seed(0)
    z = torch.randn(4000, dtype=torch.float64)
    torch.manual_seed(0)
    torch.testing.assert_close(trainer.disc_times(4000, "cpu"), torch.sigmoid(1 + z).clamp(0.001, 0.999))


@pytest.mark.parametrize("real_data", ["teacher", "dataset"])
def test_training_changes_generator_and_heads_not_teacher(real_data, tmp_path):
    trainer = _trainer(tmp_path, real_data=real_data, gan_loss="nonsaturating" if real_data == "dataset" else "hinge",
                       r1_weight=10.0 if real_data == "dataset" else 0.0)
    teacher = {k: v.clone() for k, v in trainer.teacher.net.state_dict().items()}
    gen = {k: v.clone() for k, v in trainer.generator.net.state_dict().items()}
    heads = {k: v.clone() for k, v in trainer.heads.state_dict().items()}
    assert len(trainer.heads.heads) == 3  # one per ToyMLP block
    trainer.train()
    assert all(torch.equal(teacher[k], v) for k, v in trainer.teacher.net.state_dict().items())
    assert all(p.grad is None for p in trainer.teacher.net.parameters())
    assert any(not torch.equal(gen[k], v) for k, v in trainer.generator.net.state_dict().items())
    assert any(not torch.equal(heads[k], v) for k, v in trainer.heads.state_dict().items())
    log = (tmp_path / "train_log.jsonl").read_text()
    assert "loss_gan_g/generator" in log and "loss_gan_d/heads" in log
    assert ("loss_r1" in log) == (real_data == "dataset")


def test_feature_blocks_pick_taps(tmp_path):
    trainer = _trainer(tmp_path, feature_blocks=[0, -1])
    taps = tap_modules(trainer.teacher.net)
    assert trainer.taps == [taps[0], taps[-1]] and len(trainer.heads.heads) == 2
    with pytest.raises(ConfigError, match="feature_blocks: \\[7\\] out of range; the teacher has 3 taps"):
        _trainer(tmp_path / "b", feature_blocks=[7])


def test_refusals():
    with pytest.raises(ConfigError, match="real_data: dataset needs real images, but dataset 'prompts.txt'"):
        build_config(LADDConfig, dict(dataset="prompts.txt", real_data="dataset"))
    with pytest.raises(ConfigError, match="gan_loss must be one of"):
        build_config(LADDConfig, dict(gan_loss="wgan"))
    with pytest.raises(ConfigError, match="disc_t must be one of"):
        build_config(LADDConfig, dict(disc_t="beta"))


def test_toy_recipe_heads_tell_real_from_fake_within_ten_updates(tmp_path):
    """The regression behind the digits collapse: with the paper's discriminator noise (log(sigma / alpha) ~ N(1, 1),
    meant for 128x128 SD3 latents) a small input is buried in noise and the heads stay at chance (hinge loss 2), so
    the generator follows noise. With the toy recipe's noise and head learning rate the heads separate real ring
    samples from the untrained generator's within ten updates."""
    import pathlib

    import yaml

    recipe = yaml.safe_load((pathlib.Path(__file__).parents[1] / "recipes/ladd/toy2d.yaml").read_text())
    keys = ("disc_t_mean", "disc_t_std", "gan_loss", "learning_rate", "head_lr", "head_width")
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, real_data="dataset", max_steps=11, global_batch=64, dfake_gen_update_ratio=10**6,
                       **{k: recipe[k] for k in keys if k in recipe})
    losses = []
    compute = trainer.compute_loss

    def record(batch, phase):
        out = compute(batch, phase)
        if "heads" in phase:
            losses.append(float(out["loss"]))
        return out

    trainer.compute_loss = record
    trainer.train()
    assert len(losses) == 10
    assert sum(losses) / len(losses) < 1.5, losses  # hinge: 2 at chance
