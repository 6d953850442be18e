"""Fidelity of the score methods (DMD2, SIM / SiD-LSG, VSD / SwiftBrush) to their official code: the LR
warm-up unit, the DM timestep range, GAN options and head, flow-teacher times, two-stage DMD2 initialisation,
SiD-LSG and SwiftBrush options, and EDM teachers."""

import pytest
import torch

from stepdistill.config import ConfigError, build_config
from stepdistill.trainers.dmd2 import DMD2Config, DMD2Trainer

TOY = dict(
    dataset="toy2d:gmm8",
    global_batch=64,
    checkpoint_every=0,
    progress=False,
    learning_rate=1e-3,
)


def toy_dmd2(teacher, out, **kw):
    return DMD2Trainer(build_config(DMD2Config, {**TOY, "output_dir": str(out), "teacher": teacher, **kw}))


@pytest.mark.parametrize("unit, expected", [("iteration", 1.0), ("update", 0.3)])
def test_warmup_counts_iterations_by_default(unit, expected, toy_teacher, tmp_path):
    # DMD2 (main/train_sd.py) steps the generator's schedule every iteration: with ratio 5 and warm-up 10 the
    # generator reaches its peak lr after 10 iterations although it was updated only twice (steps 0 and 5)
    kw = {} if unit == "iteration" else {"warmup_unit": unit}
    trainer = toy_dmd2(toy_teacher, tmp_path, max_steps=10, warmup_steps=10, dfake_gen_update_ratio=5, **kw)
    trainer.train()
    for name in ("generator", "fake_score"):
        lr = trainer.opts[name].param_groups[0]["lr"]
        want = 1.0 if name == "fake_score" else expected  # the fake score updates every iteration
        assert lr == pytest.approx(want * 1e-3), (name, lr)


def test_warmup_unit_is_validated(toy_teacher, tmp_path):
    with pytest.raises(ConfigError, match="warmup_unit"):
        toy_dmd2(toy_teacher, tmp_path, warmup_unit="epoch").setup()


def _teacher_times(trainer, fn):
    """Integer timesteps the teacher network sees during ``fn()``."""
    seen = []
    hook = trainer.teacher.net.register_forward_hook(lambda m, i, o: seen.append(i[1].detach().reshape(-1)))
    try:
        fn()
    finally:
        hook.remove()
    return torch.cat(seen)


def test_dm_timesteps_are_dmd2s_inclusive_range(toy_teacher, tmp_path):
    # DMD2: torch.randint(int(0.02 T), min(int(0.98 T) + 1, T)) = [20, 980], every integer equally likely
    trainer = toy_dmd2(toy_teacher, tmp_path, max_steps=1)
    trainer.setup()
    torch.manual_seed(0)
    x = torch.randn(40000, 2)
    ts = _teacher_times(trainer, lambda: trainer.dm_loss(x, None)).round().long()
    assert (ts.min().item(), ts.max().item()) == (20, 980)
    counts = torch.bincount(ts, minlength=981)[20:]
    assert counts[0] > 0.5 * counts.float().mean() and counts[-1] > 0.5 * counts.float().mean()


def test_gan_max_timestep_is_validated_and_clean_gan_is_an_option(toy_teacher, tmp_path):
    with pytest.raises(ConfigError, match="gan_max_timestep must be >= 1.*gan_noise: none"):
        toy_dmd2(toy_teacher, tmp_path, gan_max_timestep=0)
    trainer = toy_dmd2(toy_teacher, tmp_path, max_steps=1, gan_generator_weight=1e-3, gan_noise="none")
    trainer.setup()
    x = torch.randn(8, 2)
    seen = []
    hook = trainer.fake.net.register_forward_hook(lambda m, i, o: seen.append((i[0].clone(), i[1].clone())))
    a, b = trainer.gan_logits(x, None), trainer.gan_logits(x, None)
    hook.remove()
    torch.testing.assert_close(a, b)  # no noise: the same logits twice
    assert all(torch.equal(xi, x) and (t == 0).all() for xi, t in seen)  # clean samples at timestep 0


def test_gan_head_is_dmd2s_cls_pred_branch():
    from stepdistill.trainers.dmd2 import DiscriminatorHead

    # SD1.5's 8x8 bottleneck: Conv 4x4 s2 p1 (8 -> 4), Conv 4x4 s4 p0 (4 -> 1), Conv 1x1 -> 1 logit
    head = DiscriminatorHead(64, 8)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    shape = [(m.kernel_size, m.stride, m.padding, m.out_channels) for m in convs]
    assert shape == [((4, 4), (2, 2), (1, 1), 64), ((4, 4), (4, 4), (0, 0), 64), ((1, 1), (1, 1), (0, 0), 1)]
    # SDXL's 32x32: three stride-2 convs, then the stride-4 one
    strides = [m.stride[0] for m in DiscriminatorHead(64, 32).modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 2, 2, 4, 1]
    assert DiscriminatorHead(64, 8)(torch.randn(3, 64, 8, 8)).shape == (3,)
    pooled = [m.kernel_size[0] for m in DiscriminatorHead(64, 8, kind="pooled").modules() if isinstance(m, torch.nn.Conv2d)]
    assert pooled == [4, 4, 1, 1]


def _toy_flow_teacher(toy_teacher, root):
    import json
    import os
    import shutil

    folder = root / "flow_teacher"
    shutil.copytree(os.path.join(toy_teacher, "unet"), folder / "unet")
    (folder / "scheduler").mkdir(parents=True)
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0, "prediction_type": "flow"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_flow_teacher_generator_starts_at_t_1(toy_teacher, tmp_path):
    teacher = _toy_flow_teacher(toy_teacher, tmp_path)
    trainer = toy_dmd2(teacher, tmp_path / "a", max_steps=1)
    trainer.setup()
    # the generator is fed pure noise: its first time is t = 1 (timestep 1000 = sigma 1), not 0.999
    assert trainer.gen_times.tolist() == [1.0] and trainer.export_timesteps() == [1000]
    with pytest.raises(ConfigError, match="999 on a flow-matching teacher is t = 0.999.*use 1000"):
        toy_dmd2(teacher, tmp_path / "b", max_steps=1, denoising_timesteps=[999]).setup()
    ok = toy_dmd2(teacher, tmp_path / "c", max_steps=1, denoising_timesteps=[1000, 500])
    ok.setup()
    assert ok.gen_times.tolist() == [1.0, 0.5]


DIGITS = dict(
    teacher="digits",
    dataset="digits",
    global_batch=4,
    dfake_gen_update_ratio=2,
    learning_rate=1e-3,
    progress=False,
)


def _state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_dmd2_two_stages_on_digits(tmp_path):
    """Stage 1 (DM only) -> stage 2 (GAN on) from its checkpoint or its export, DMD2's --ckpt_only_path: the
    generator and fake score start from stage 1, the head fresh, the real score is the original teacher, the
    step counter and optimisers are new."""
    from stepdistill.models import Teacher

    s1 = DMD2Trainer(build_config(DMD2Config, {**DIGITS, "output_dir": str(tmp_path / "s1"), "max_steps": 3}))
    s1.train()
    ckpt = s1.save_checkpoint()
    export = s1.export()
    gen1, fake1 = _state(s1.generator.net), _state(s1.fake.net)
    original = _state(Teacher.from_pretrained(s1._teacher_path()).net)
    assert any(not torch.equal(gen1[k], original[k]) for k in gen1), "stage 1 did not train"

    for source in (ckpt, export):
        out = tmp_path / ("s2_ckpt" if source == ckpt else "s2_export")
        stage2 = dict(
            DIGITS,
            output_dir=str(out),
            max_steps=2,
            gan_generator_weight=1e-3,
            learning_rate=5e-4,
            init_generator=source,
            init_fake_score=ckpt,
        )
        s2 = DMD2Trainer(build_config(DMD2Config, stage2))
        s2.setup()
        for k, v in _state(s2.generator.net).items():
            torch.testing.assert_close(v, gen1[k], rtol=0, atol=0)
        for k, v in _state(s2.fake.net).items():
            torch.testing.assert_close(v, fake1[k], rtol=0, atol=0)
        for k, v in _state(s2.teacher.net).items():  # the real score is the original teacher, not stage 1's student
            torch.testing.assert_close(v, original[k], rtol=0, atol=0)
        assert "head" in s2.specs and s2.global_step == 0
        assert all(not o.state for o in s2.opts.values()), "stage 2 starts with fresh optimisers"
        s2.train()
        assert s2.global_step == 2 and len(s2.history) == 2
        assert any("loss_gan_g" in k for k in s2.history[0])
        # stage 2's own checkpoint resumes as usual with the init keys still set
        s2.save_checkpoint()
        again = DMD2Trainer(build_config(DMD2Config, {**stage2, "max_steps": 3, "resume": "latest"}))
        again.train()
        assert again.global_step == 3


def test_init_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="init_generator: folder"):
        build_config(DMD2Config, {**DIGITS, "init_generator": str(tmp_path / "missing")})
    (tmp_path / "pipe").mkdir()
    with pytest.raises(ConfigError, match="init_fake_score: .* is not a checkpoint folder"):
        build_config(DMD2Config, {**DIGITS, "init_fake_score": str(tmp_path / "pipe")})
    with pytest.raises(ConfigError, match="LoRA generator cannot start from"):
        build_config(DMD2Config, {**DIGITS, "generator_mode": "lora", "init_generator": str(tmp_path / "pipe")})
